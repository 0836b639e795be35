#!/usr/bin/env python3
"""Model placement: cold loads, throughput and p99 through ollama-sidecar, through nginx
`least_conn`, and through two fixed placements, in front of the same kind of swapping mocks
(issue 15's workload).

Two mock instances, each holding two models (OLLAMA_MAX_LOADED_MODELS=2, eviction of an idle
model as Ollama's scheduler does), each loaded model serving two requests at once
(OLLAMA_NUM_PARALLEL=2 per runner, as in Ollama's server/sched.go, so an instance holding two
models runs up to four), a 1 s cold load, answers of about 200 ms (8 tokens, 25 ms apart).
Eight closed-loop clients ask for four models, 240 requests in all, in two mixes: `uniform`
(each model equally often) and `skewed` (one hot model 70 %, three cold ones 10 % each). Each
(mix, target) run gets fresh mocks, so cold loads start from zero; the request sequence is drawn
from a fixed seed and is the same for every target. Every request carries `X-Model: <model>`
(ignored by the sidecar and by Ollama) so nginx can route by model without reading bodies.

Targets (`--targets`, all four by default):
- `sidecar`: ollama-sidecar's model-aware dispatch.
- `nginx`: nginx `least_conn` over both mocks, blind to models: the baseline the issue's
  targets are relative to.
- `static`: nginx routing by model, m1 and m2 to mock 0, m3 and m4 to mock 1: the placement a
  person would choose (two models per instance, four cold loads, no swaps).
- `static-hot-both`: m1 (the skewed mix's hot model) to both mocks by `least_conn`, m2 to
  mock 0, m3 and m4 to mock 1: the hot model everywhere, the cold ones sharing the rest (mock 1
  swaps between three models).
The two fixed placements are measured, not estimated: they are the bounds for the issue's
targets ("cold loads at most 2x the best static placement", "the best placement allows about
5x nginx's throughput"). After each mix, one summary line per target gives its cold loads,
throughput and p99 against the `nginx` run of the same mix (also `summary` in --json).

Usage: benches/harness/placement.py [--bin-dir target/release] [--requests 240] [--json out.json]
                                    [--mixes uniform,skewed] [--targets sidecar,nginx,...]
Needs nginx on PATH (or /usr/sbin/nginx). Starts everything on free loopback ports and stops it.
"""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Procs, free_port, http, wait_ready  # noqa: E402

MODELS = ["m1", "m2", "m3", "m4"]
MIXES = {
    "uniform": [0.25, 0.25, 0.25, 0.25],
    "skewed": [0.7, 0.1, 0.1, 0.1],
}
CLIENTS = 8
MOCK_ENV = {
    "MOCK_MODELS": ",".join(MODELS),
    "OLLAMA_NUM_PARALLEL": "2",
    "OLLAMA_MAX_LOADED_MODELS": "2",
    "MOCK_LOAD_DELAY_MS": "1000",
    "MOCK_TOKENS": "8",
    "MOCK_TOKEN_DELAY_MS": "25",
    "MOCK_NO_REQUEST_LOG": "1",
    "OLLAMA_KEEP_ALIVE": "-1",
}

# Where each nginx target sends each model: an upstream name (`both`: least_conn over the two
# mocks; `mock0`, `mock1`: one mock). None: every request to `both`, blind to models.
NGINX_ROUTES = {
    "nginx": None,
    "static": {"m1": "mock0", "m2": "mock0", "m3": "mock1", "m4": "mock1"},
    "static-hot-both": {"m1": "both", "m2": "mock0", "m3": "mock1", "m4": "mock1"},
}
TARGETS = ["sidecar"] + list(NGINX_ROUTES)

NGINX_CONF = """
{user}
worker_processes 2;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream both {{
        least_conn;
        server 127.0.0.1:{p0};
        server 127.0.0.1:{p1};
        keepalive 32;
    }}
    upstream mock0 {{
        server 127.0.0.1:{p0};
        keepalive 32;
    }}
    upstream mock1 {{
        server 127.0.0.1:{p1};
        keepalive 32;
    }}
{routing}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host localhost;
            proxy_buffering off;
            proxy_read_timeout 1h;
        }}
    }}
}}
"""


def nginx_routing(routes):
    """(`map` block, proxy_pass upstream) for a target's routes. A variable proxy_pass naming
    an `upstream` block uses that block (no resolver); requests without X-Model (readiness
    checks) go to `both`."""
    if routes is None:
        return "", "both"
    lines = "".join(f"        {model} {upstream};\n" for model, upstream in routes.items())
    return f"    map $http_x_model $model_upstream {{\n        default both;\n{lines}    }}", \
        "$model_upstream"


def start_mocks(procs, args, tag):
    ports = []
    for i in range(2):
        port = free_port()
        env = dict(MOCK_ENV, OLLAMA_HOST=f"127.0.0.1:{port}")
        p = procs.start(f"mock-{tag}-{i}", [os.path.join(args.bin_dir, "mock-ollama"), "serve"], env)
        wait_ready(port, "/api/version", p, f"mock-{tag}-{i}", procs.workdir)
        ports.append(port)
    return ports


def start_sidecar(procs, args, tag, mock_ports):
    port, admin = free_port(), free_port()
    path = os.path.join(procs.workdir, f"sidecar-{tag}.yaml")
    with open(path, "w") as f:
        f.write(f"listen: 127.0.0.1:{port}\nadmin: {{listen: 127.0.0.1:{admin}}}\n"
                "log: {level: warn}\ninstances:\n")
        for i, mp in enumerate(mock_ports):
            f.write(f"  - {{name: m{i}, url: 'http://127.0.0.1:{mp}', num_parallel: 2}}\n")
    p = procs.start(f"sidecar-{tag}", [os.path.join(args.bin_dir, "ollama-sidecar"), "--config", path])
    wait_ready(port, "/api/version", p, f"sidecar-{tag}", procs.workdir)
    # Both instances checked healthy and listed.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            tags = json.loads(http(port, "/api/tags")[1])
            if len(tags.get("models", [])) == len(MODELS):
                break
        except OSError:
            pass
        time.sleep(0.2)
    return p, port, admin


def start_nginx(procs, tag, mock_ports, routes):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix = os.path.join(procs.workdir, f"nginx-{tag}")
    os.makedirs(prefix, exist_ok=True)
    port = free_port()
    routing, upstream = nginx_routing(routes)
    conf = NGINX_CONF.format(user="user root root;" if os.geteuid() == 0 else "", prefix=prefix,
                             p0=mock_ports[0], p1=mock_ports[1], listen=port, routing=routing,
                             upstream=upstream)
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    p = procs.start(f"nginx-{tag}", [nginx, "-p", prefix, "-e", os.path.join(prefix, "nginx-error.log"),
                                      "-c", path])
    wait_ready(port, "/api/version", p, f"nginx-{tag}", procs.workdir)
    return p, port


def drive(port, sequence):
    """Runs `sequence` (model names) from CLIENTS threads, each taking the next request as it
    finishes one; returns (wall seconds, latencies, failures)."""
    lock = threading.Lock()
    queue = list(reversed(sequence))
    latencies, failures = [], []

    def client():
        while True:
            with lock:
                if not queue:
                    return
                model = queue.pop()
            body = json.dumps({"model": model, "prompt": "hi", "stream": False}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/generate", data=body,
                                         headers={"Content-Type": "application/json",
                                                  "X-Model": model})
            t = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    r.read()
                    ok = r.status == 200
            except OSError as e:
                ok = False
                failures.append(str(e))
            with lock:
                if ok:
                    latencies.append(time.monotonic() - t)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0, latencies, failures


def p99(values):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(0.99 * (len(v) - 1))))] if v else float("nan")


def ratio(value, base):
    return round(value / base, 3) if base else None


def summarize(runs):
    """Each run of one mix against that mix's `nginx` run (ratios None without one)."""
    base = next((r for r in runs if r["target"] == "nginx"), None)
    out = []
    for r in runs:
        out.append({
            "mix": r["mix"], "target": r["target"],
            "cold_loads": r["cold_loads"], "req_per_s": r["req_per_s"], "p99_s": r["p99_s"],
            "ok": r["ok"], "failed": r["failed"],
            "cold_loads_vs_nginx": ratio(r["cold_loads"], base and base["cold_loads"]),
            "throughput_vs_nginx": ratio(r["req_per_s"], base and base["req_per_s"]),
            "p99_vs_nginx": ratio(r["p99_s"], base and base["p99_s"]),
        })
    return out


def summary_line(s):
    def x(v):
        return "n/a" if v is None else f"{v}x"
    failed = f", {s['failed']} FAILED" if s["failed"] else ""
    return (f"summary {s['mix']:<7} {s['target']:<15} cold loads {s['cold_loads']:>3} "
            f"({x(s['cold_loads_vs_nginx'])} nginx), {s['req_per_s']:>6} req/s "
            f"({x(s['throughput_vs_nginx'])} nginx), p99 {s['p99_s']} s "
            f"({x(s['p99_vs_nginx'])} nginx){failed}")


def mock_figures(stats):
    """What one mock saw: generate requests, peak concurrency in all and per model (the mock
    counts each loaded model's slots apart, so the sum over models may exceed num_parallel)."""
    return {
        "generate": stats["requests"].get("/api/generate", 0),
        "cold_loads": stats["cold_loads"],
        "peak_in_flight": stats["peak_inference_in_flight"],
        "peak_by_model": dict(sorted(stats["peak_by_model"].items())),
        "loaded_at_end": sorted(stats["loaded"]),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=None)
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--json", default=None)
    ap.add_argument("--mixes", default="uniform,skewed")
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help=f"comma-separated, from {', '.join(TARGETS)}")
    args = ap.parse_args()
    mixes, targets = args.mixes.split(","), args.targets.split(",")
    for name, chosen, known in (("mix", mixes, MIXES), ("target", targets, TARGETS)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            ap.error(f"unknown {name} {', '.join(unknown)} (known: {', '.join(known)})")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.bin_dir is None:
        rel = os.path.join(root, "target", "release")
        args.bin_dir = rel if os.path.exists(os.path.join(rel, "ollama-sidecar")) else \
            os.path.join(root, "target", "debug")
    workdir = tempfile.mkdtemp(prefix="placement-bench-")
    procs = Procs(workdir)
    results = {"bin_dir": args.bin_dir, "requests": args.requests, "runs": [], "summary": []}
    try:
        for mix in mixes:
            weights = MIXES[mix]
            rng = random.Random(f"{args.seed}-{mix}")
            sequence = rng.choices(MODELS, weights=weights, k=args.requests)
            mix_runs = []
            for target in targets:
                tag = f"{mix}-{target}"
                mocks = start_mocks(procs, args, tag)
                admin = None
                if target == "sidecar":
                    proc, port, admin = start_sidecar(procs, args, tag, mocks)
                else:
                    proc, port = start_nginx(procs, tag, mocks, NGINX_ROUTES[target])
                wall, lat, failures = drive(port, sequence)
                stats = [json.loads(http(mp, "/mock/stats")[1]) for mp in mocks]
                run = {
                    "mix": mix, "target": target,
                    "cold_loads": sum(s["cold_loads"] for s in stats),
                    "evictions": sum(s["evictions"] for s in stats),
                    "ok": len(lat), "failed": len(failures),
                    "req_per_s": round(len(lat) / wall, 2),
                    "p50_s": round(sorted(lat)[len(lat) // 2], 3) if lat else None,
                    "p99_s": round(p99(lat), 3),
                    "wall_s": round(wall, 2),
                    "mocks": [mock_figures(s) for s in stats],
                }
                if failures:
                    run["first_failure"] = failures[0]
                if admin:
                    status = json.loads(http(admin, "/status")[1])
                    run["placement"] = {i["name"]: i.get("placement") for i in status["instances"]}
                mix_runs.append(run)
                print(json.dumps(run), flush=True)
                procs.stop_all()
            results["runs"] += mix_runs
            for s in summarize(mix_runs):
                results["summary"].append(s)
                print(summary_line(s), flush=True)
    finally:
        procs.stop_all()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
