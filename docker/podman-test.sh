#!/usr/bin/env bash
# Builds docker/Dockerfile's two images with podman from base images made on this machine (no
# registry: Debian 12 debootstrapped from the machine's own apt mirror) and runs them:
#   sidecar     in front of a mock Ollama container reached by name (`ollama` on a network made
#               here, as compose does; conf/docker.yaml unchanged): /api/tags, a streamed chat,
#               the official Python client, the image's HEALTHCHECK, /metrics, and `podman stop`
#               during a stream (the stream ends, the container exits 0);
#   supervised  on a local stand-in for ollama/ollama whose `ollama` is the project's mock: the
#               sidecar starts `ollama serve`, restarts it after `kill -9`, leaves nothing on stop.
# Run as root (podman rootful), from anywhere: `docker/podman-test.sh`. .ci/run runs it.
#
# Cached between runs on one machine (podman storage under $STATE): the debootstrapped base image
# and the builder base (cmake, gcc); both are keyed by their recipe. Never cached: the image build
# itself (--no-cache, and cargo's cache mounts land in a fresh directory removed on exit).
# Everything else it creates (containers, network, images under test, work directory) is removed
# on exit, pass or fail. Podman's configuration is in files written below, read through
# CONTAINERS_CONF / CONTAINERS_STORAGE_CONF: the machine's own podman setup is left alone.
#
# Environment: OLLAMA_SIDECAR_PODMAN_STATE (default /var/lib/ollama-sidecar-podman),
# DEBIAN_MIRROR (default: this machine's apt source for its release), RUST_TOOLCHAIN (a rustup
# toolchain directory; default: `rustc --print sysroot`).
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=${OLLAMA_SIDECAR_PODMAN_STATE:-/var/lib/ollama-sidecar-podman}
SUITE=bookworm                          # the release of rust:1-bookworm and distroless cc-debian12
LOCAL=localhost/ollama-sidecar-test     # every image this script names
NET=ollama-sidecar-test
SIDECAR_CTR=ollama-sidecar-test
SUPERVISED_CTR=ollama-sidecar-supervised-test
STOP_TIMEOUT=45                         # as compose's stop_grace_period: drain 30 s + margin
CA_BUNDLE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}

started=$(date +%s.%N)
current_step=setup
work=""

say() { echo "podman-test: $*"; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
# step NAME COMMAND...: runs one named, timed step; a failure names it and ends the script.
step() {
  local name=$1 t0
  shift
  current_step=$name
  t0=$(date +%s.%N)
  say "--> $name"
  "$@"
  say "<-- $name: ok in $(elapsed "$t0") s"
}
die() { echo "podman-test: FAILED: $*" >&2; exit 1; }

# --- tools and podman's configuration -------------------------------------------------------------
install_tools() {
  local missing=()
  command -v podman >/dev/null || missing+=(podman)
  command -v runc >/dev/null || missing+=(runc)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v catatonit >/dev/null || [ -x /usr/libexec/podman/catatonit ] || missing+=(catatonit)
  command -v iptables >/dev/null || missing+=(iptables)  # netavark's port forwarding
  [ -x /usr/lib/podman/netavark ] || missing+=(netavark)
  [ -x /usr/lib/podman/aardvark-dns ] || missing+=(aardvark-dns)  # DNS by container name
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  say "$(podman --version), $(runc --version | head -1), debootstrap $(dpkg-query -W -f '${Version}' debootstrap)"
}

configure_podman() {
  mkdir -p "$STATE/networks"
  # runc and cgroupfs: what works here (crun and the systemd cgroup manager need a systemd host).
  # Cgroups stay enabled: `cgroups = "disabled"` breaks `podman run`.
  # Without CAP_SYS_RESOURCE (this machine) a container cannot get limits above podman's own:
  # rootful podman asks for 1048576 files and processes, and podman 4.3 was seen lowering its own
  # process limit to 32768. Ask for what the host allows.
  local nofile nproc
  nofile=$(ulimit -Hn)
  [ "$nofile" != unlimited ] || nofile=1048576
  nproc=$(ulimit -Hu)
  [ "$nproc" != unlimited ] && [ "$nproc" -lt 32768 ] || nproc=32768
  cat >"$STATE/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
log_driver = "k8s-file"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
[network]
network_backend = "netavark"
network_config_dir = "$STATE/networks"
EOF
  cat >"$STATE/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$STATE/storage"
runroot = "/run/ollama-sidecar-podman"
EOF
  export CONTAINERS_CONF="$STATE/containers.conf" CONTAINERS_STORAGE_CONF="$STATE/storage.conf"
  # Build-time temporary files, cargo's cache mounts among them: a directory of this run only.
  export TMPDIR="$work"
  say "podman by hand on the same storage: CONTAINERS_CONF=$CONTAINERS_CONF CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF podman ..."
}

# Leftovers of an interrupted earlier run would hold the names used here.
# Every container in this script's own storage is its own, build containers of an interrupted
# `podman build` included (--external).
remove_containers() {
  podman ps -aq --external | xargs -r podman rm -f -t 0 >/dev/null 2>&1 || true
  podman network rm -f "$NET" >/dev/null 2>&1 || true
}

# The images under test and their dangling build layers (the cached base images stay).
# PODMAN_TEST_REUSE=1 keeps them and skips their build when present: for working on the checks
# only, never in CI (the build is what must be proven).
remove_images() {
  [ "${PODMAN_TEST_REUSE:-0}" = 1 ] && return
  podman rmi -f "$LOCAL/sidecar:test" "$LOCAL/supervised:test" "$LOCAL/ollama-standin:test" >/dev/null 2>&1 || true
  podman image prune -f >/dev/null 2>&1 || true
}

remove_leftovers() {
  remove_containers
  remove_images
  find /var/tmp -maxdepth 1 -name 'ollama-sidecar-podman.*' ! -path "$work" -exec rm -rf {} + 2>/dev/null || true
}

reused() {
  [ "${PODMAN_TEST_REUSE:-0}" = 1 ] && podman image exists "$1" && say "PODMAN_TEST_REUSE=1: reusing $1"
}

# --- base images (cached) --------------------------------------------------------------------------
# The Debian mirror this machine's apt uses for its own release.
debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local codename
  # shellcheck disable=SC1091
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  # shellcheck disable=SC2016  # apt's own $(FIELD) template
  apt-get indextargets --format '$(SITE) $(RELEASE)' 'Identifier: Packages' 2>/dev/null \
    | awk -v c="$codename" '$2 == c { print $1; exit }'
}

key_of() { sha256sum | cut -c1-12; }

debian_base() {
  local mirror tag rootfs t0
  mirror=$(debian_mirror)
  [ -n "$mirror" ] || die "no Debian mirror in this machine's apt sources; set DEBIAN_MIRROR"
  tag="$LOCAL/debian:$SUITE-$(printf '%s %s minbase v1' "$SUITE" "$mirror" | key_of)"
  DEBIAN_IMAGE=$tag
  if podman image exists "$tag"; then say "cached: $tag"; return; fi
  rootfs="$work/rootfs"
  t0=$(date +%s.%N)
  debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap $SUITE from $mirror"; }
  say "debootstrap --variant=minbase $SUITE: $(elapsed "$t0") s"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  tar -C "$rootfs" -c . | podman import -q --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
  rm -rf "$rootfs"
}

# Stands in for rust:1-bookworm: Debian with cmake and a C compiler; Rust is this machine's own
# toolchain, mounted read-only at /opt/rust during the build (Debian's rustc is too old for
# Cargo.lock). CARGO_HOME is the rust image's, where the Dockerfile's registry cache mount points.
BUILDER_RECIPE='RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev make cmake \
    && rm -rf /var/lib/apt/lists/*
ENV CARGO_HOME=/usr/local/cargo \
    PATH=/opt/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

builder_base() {
  local tag
  tag="$LOCAL/rust-builder:$SUITE-$(printf '%s\n%s' "$DEBIAN_IMAGE" "$BUILDER_RECIPE" | key_of)"
  BUILDER_IMAGE=$tag
  if podman image exists "$tag"; then say "cached: $tag"; return; fi
  printf 'FROM %s\n%s\n' "$DEBIAN_IMAGE" "$BUILDER_RECIPE" \
    | podman build -q --pull=never --network host -t "$tag" -f - "$work" >/dev/null
}

# --- the images under test (never cached) ------------------------------------------------------------
# This machine's Rust toolchain (a rustup toolchain directory), mounted into the build.
find_toolchain() {
  local dir=${RUST_TOOLCHAIN:-$(rustc --print sysroot 2>/dev/null)}
  [ -x "$dir/bin/cargo" ] || die "no cargo in '$dir' (set RUST_TOOLCHAIN to a rustup toolchain directory)"
  TOOLCHAIN=$(readlink -f "$dir")
  say "$TOOLCHAIN: $("$TOOLCHAIN/bin/rustc" --version)"
}

# The published build with local base images: the same Dockerfile, only its base-image arguments
# differ. The host's CA bundle is mounted for the build only (the crate registry's TLS chain).
build_target() {
  local target=$1 tag=$2
  shift 2
  if ! podman build --pull=never --format docker --network host "$@" \
    -v "$TOOLCHAIN:/opt/rust:ro" -v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" \
    --build-arg "RUST_IMAGE=$BUILDER_IMAGE" --build-arg "RUNTIME_IMAGE=$DEBIAN_IMAGE" \
    --build-arg "OLLAMA_IMAGE=$LOCAL/ollama-standin:test" \
    --ignorefile docker/Dockerfile.dockerignore -f docker/Dockerfile --target "$target" -t "$tag" . \
    >"$work/build-$target.log" 2>&1 || ! podman image exists "$tag"; then
    tail -40 "$work/build-$target.log" >&2
    die "podman build --target $target"
  fi
  say "$tag: $(podman image inspect --format '{{.Size}}' "$tag" | awk '{ printf "%.1f MB", $1 / 1e6 }')"
}

build_sidecar() { reused "$LOCAL/sidecar:test" || build_target sidecar "$LOCAL/sidecar:test" --no-cache; }

# ollama/ollama as far as the supervised image needs it: `ollama` on PATH (/usr/bin/ollama) that
# serves the API on OLLAMA_HOST (default 0.0.0.0:11434), run as `ollama serve`. The mock comes
# from the sidecar image just built.
build_ollama_standin() {
  reused "$LOCAL/ollama-standin:test" && return
  podman build -q --pull=never --no-cache -t "$LOCAL/ollama-standin:test" -f - "$work" >/dev/null <<EOF
FROM $DEBIAN_IMAGE
COPY --from=$LOCAL/sidecar:test /usr/local/bin/mock-ollama /usr/bin/ollama
ENV OLLAMA_HOST=0.0.0.0:11434
EXPOSE 11434
ENTRYPOINT ["/usr/bin/ollama"]
CMD ["serve"]
EOF
}

# The builder stage's layers are the ones the sidecar build made moments ago in this run.
build_supervised() { reused "$LOCAL/supervised:test" || build_target supervised "$LOCAL/supervised:test"; }

# --- checks --------------------------------------------------------------------------------------
# podman run, its stderr kept for the failure report: without systemd, podman logs an error for
# the healthcheck timer it cannot create (the script runs the check itself, `podman healthcheck run`).
run_container() {
  podman run -d --pull never "$@" >/dev/null 2>>"$work/podman-run.err" || { cat "$work/podman-run.err" >&2; die "podman run $*"; }
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
checks() { python3 docker/podman_checks.py "$@"; }

# A network of this run's own, as compose makes one: its DNS (aardvark-dns) answers container names.
create_network() { podman network create "$NET" >/dev/null; }

start_sidecar_pair() {
  # Tokens every 40 ms: long enough to see a stream arrive in pieces and to stop mid-stream.
  run_container --name ollama --network "$NET" \
    -e MOCK_TOKENS=40 -e MOCK_TOKEN_DELAY_MS=40 "$LOCAL/ollama-standin:test"
  PORT=$(free_port)
  ADMIN_PORT=$(free_port)
  run_container --name "$SIDECAR_CTR" --network "$NET" --stop-timeout "$STOP_TIMEOUT" \
    -p "127.0.0.1:$PORT:11434" -p "127.0.0.1:$ADMIN_PORT:11435" "$LOCAL/sidecar:test"
  checks ready "http://127.0.0.1:$ADMIN_PORT" 60 \
    || die "the sidecar never became ready: it reaches its instance as http://ollama:11434 (conf/docker.yaml)"
}

check_tags() { checks tags "http://127.0.0.1:$PORT"; }
check_stream() { checks stream "http://127.0.0.1:$PORT" 40 0.04; }

check_python_client() {
  local venv=target/clients-venv
  if [ ! -x "$venv/bin/pytest" ] || [ tests/clients/requirements.txt -nt "$venv/.installed" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r tests/clients/requirements.txt
    touch "$venv/.installed"
  fi
  OLLAMA_SIDECAR_URL="http://127.0.0.1:$PORT" "$venv/bin/pytest" -q -p no:cacheprovider \
    tests/clients/test_ollama_python.py
}

# The image's own HEALTHCHECK command, run the way the engine runs it (exec in the container).
check_healthcheck() {
  local status
  podman image inspect --format '{{json .Config.Healthcheck.Test}}' "$LOCAL/sidecar:test" \
    | grep -q '"ollama-sidecar\|/ollama-sidecar"' || die "the image has no HEALTHCHECK (built without --format docker?)"
  status=$(podman healthcheck run "$SIDECAR_CTR" 2>>"$work/podman-run.err") || die "podman healthcheck run: ${status:-unhealthy}"
  say "podman healthcheck run: ${status:-healthy}; State.Health: $(podman inspect --format '{{.State.Health.Status}}' "$SIDECAR_CTR")"
}

check_metrics() { checks metrics "http://127.0.0.1:$ADMIN_PORT"; }

# SIGTERM during a stream: the sidecar drains it (it ends with its final chunk) and exits 0,
# well before the stop timeout would SIGKILL it.
check_stop_during_stream() {
  local t0 took code
  checks stream-bg "http://127.0.0.1:$PORT" "$work/drain.jsonl" &
  local client=$!
  checks wait-chunks "$work/drain.jsonl" 3 10 || die "the stream to stop did not start"
  t0=$(date +%s.%N)
  podman stop -t "$STOP_TIMEOUT" "$SIDECAR_CTR" >/dev/null 2>>"$work/podman-run.err"
  took=$(elapsed "$t0")
  wait "$client" || die "the stream in flight at SIGTERM did not finish (see $work/drain.jsonl)"
  code=$(podman inspect --format '{{.State.ExitCode}}' "$SIDECAR_CTR")
  [ "$code" = 0 ] || die "the sidecar container exited $code after SIGTERM"
  awk -v t="$took" -v max="$STOP_TIMEOUT" 'BEGIN { exit !(t < max - 5) }' \
    || die "podman stop took $took s: the container was killed at the stop timeout"
  say "podman stop took $took s; the stream finished; exit code 0"
}

start_supervised() {
  PORT=$(free_port)
  ADMIN_PORT=$(free_port)
  run_container --name "$SUPERVISED_CTR" --network "$NET" --init --stop-timeout "$STOP_TIMEOUT" \
    -p "127.0.0.1:$PORT:11434" -p "127.0.0.1:$ADMIN_PORT:11435" "$LOCAL/supervised:test"
  checks ready "http://127.0.0.1:$ADMIN_PORT" 60 || die "the supervised container never became ready"
  checks tags "http://127.0.0.1:$PORT"
}

# "pid:start time" of a host process: the same process even if the pid is later reused.
proc_id() { echo "$1:$(awk '{ print $22 }' "/proc/$1/stat" 2>/dev/null)"; }
still_running() { [ "$(proc_id "${1%%:*}")" = "$1" ]; }

# Host pid of the container's `ollama serve`, the sidecar's child.
ollama_serve_pid() {
  podman top "$SUPERVISED_CTR" hpid args 2>/dev/null | awk '$2 ~ /ollama$/ && $3 == "serve" { print $1; exit }'
}

check_restart_after_kill() {
  local old new sidecar_pid
  old=$(ollama_serve_pid)
  [ -n "$old" ] || { podman top "$SUPERVISED_CTR" hpid args >&2; die "no \`ollama serve\` in the container"; }
  sidecar_pid=$(podman top "$SUPERVISED_CTR" hpid args | awk '$2 ~ /ollama-sidecar$/ { print $1; exit }')
  [ "$(awk '{ print $4 }' "/proc/$old/stat")" = "$sidecar_pid" ] \
    || die "\`ollama serve\` (host pid $old) is not the sidecar's ($sidecar_pid) child"
  say "\`ollama serve\` is host pid $old, child of the sidecar (host pid $sidecar_pid): kill -9"
  kill -9 "$old"
  for _ in $(seq 1 300); do
    new=$(ollama_serve_pid)
    if [ -n "$new" ] && [ "$new" != "$old" ] && checks tags "http://127.0.0.1:$PORT" >/dev/null 2>&1; then
      break
    fi
    sleep 0.2
  done
  { [ -n "$new" ] && [ "$new" != "$old" ]; } || die "\`ollama serve\` was not restarted within 60 s"
  checks tags "http://127.0.0.1:$PORT" || die "the restarted instance does not answer"
  checks restarts "http://127.0.0.1:$ADMIN_PORT" ollama 1
  SUPERVISED_PROCS="$(proc_id "$sidecar_pid") $(proc_id "$new")"
  say "restarted as host pid $new"
}

check_supervised_stop() {
  local code proc stops init
  init=$(proc_id "$(podman inspect --format '{{.State.Pid}}' "$SUPERVISED_CTR")")
  stops=$(podman logs "$SUPERVISED_CTR" 2>&1 | grep -c 'instance process stopped' || true)
  podman stop -t "$STOP_TIMEOUT" "$SUPERVISED_CTR" >/dev/null 2>>"$work/podman-run.err"
  code=$(podman inspect --format '{{.State.ExitCode}}' "$SUPERVISED_CTR")
  [ "$code" = 0 ] || die "the supervised container exited $code after SIGTERM"
  for proc in $init $SUPERVISED_PROCS; do
    ! still_running "$proc" || die "host pid ${proc%%:*} ($(tr '\0' ' ' <"/proc/${proc%%:*}/cmdline")) is still running"
  done
  [ "$(podman logs "$SUPERVISED_CTR" 2>&1 | grep -c 'instance process stopped')" -gt "$stops" ] \
    || die "the sidecar exited without stopping \`ollama serve\` first"
  say "exit code 0; the sidecar stopped \`ollama serve\`; host processes (pid:start) $init (init) $SUPERVISED_PROCS are gone"
}

# --- exit: logs on failure, then remove what this run made ----------------------------------------
finish() {
  local rc=$?
  set +e
  if [ "$rc" != 0 ]; then
    echo "podman-test: FAILED in step '$current_step' (exit $rc)" >&2
    for c in ollama "$SIDECAR_CTR" "$SUPERVISED_CTR"; do
      podman container exists "$c" 2>/dev/null || continue
      echo "----- podman logs $c ($(podman inspect --format '{{.State.Status}} exit {{.State.ExitCode}}' "$c")) -----" >&2
      podman logs "$c" 2>&1 | tail -60 >&2
    done
    if [ -s "$work/podman-run.err" ]; then
      echo "----- podman's own messages -----" >&2
      tail -20 "$work/podman-run.err" >&2
    fi
  fi
  if command -v podman >/dev/null && [ -n "${CONTAINERS_CONF:-}" ]; then remove_leftovers; fi
  [ -n "$work" ] && rm -rf "$work"
  say "total $(elapsed "$started") s: $([ "$rc" = 0 ] && echo passed || echo FAILED)"
  exit "$rc"
}

[ "$(id -u)" = 0 ] || { echo "podman-test: run as root (rootful podman)" >&2; exit 1; }
mkdir -p "$STATE"
# One run at a time: the names and the storage are shared.
exec 9>"$STATE/lock"
flock -w 600 9 || { echo "podman-test: another run holds $STATE/lock" >&2; exit 1; }
work=$(mktemp -d /var/tmp/ollama-sidecar-podman.XXXXXX)
trap finish EXIT

step "install podman, runc, debootstrap" install_tools
step "configure podman" configure_podman
step "remove leftovers" remove_leftovers
step "debootstrap base image" debian_base
step "builder base image" builder_base
step "Rust toolchain" find_toolchain
step "build the sidecar image" build_sidecar
step "build the ollama/ollama stand-in" build_ollama_standin
step "build the supervised image" build_supervised
step "create network $NET" create_network
# The supervised image first: its instance is on loopback, so a failure to reach an instance by
# name (the sidecar image's case) leaves everything else tested.
step "supervised: start it" start_supervised
step "supervised: kill -9 \`ollama serve\`, restarted" check_restart_after_kill
step "supervised: podman stop leaves nothing" check_supervised_stop
step "sidecar: start it and \`ollama\` on network $NET" start_sidecar_pair
step "sidecar: /api/tags" check_tags
step "sidecar: streamed /api/chat, chunk by chunk" check_stream
step "sidecar: official ollama Python client" check_python_client
step "sidecar: the image's HEALTHCHECK" check_healthcheck
step "sidecar: /metrics" check_metrics
step "sidecar: podman stop during a stream" check_stop_during_stream
say "all checks passed"
