#!/usr/bin/env python3
"""Model placement: cold loads, throughput and p99 through ollama-sidecar and through nginx
`least_conn`, in front of the same kind of swapping mocks (issue 15's workload).

Two mock instances, each serving two requests at once (OLLAMA_NUM_PARALLEL=2) and holding two
models (OLLAMA_MAX_LOADED_MODELS=2, eviction of an idle model as Ollama's scheduler does), a
1 s cold load, answers of about 200 ms (8 tokens, 25 ms apart). Eight clients ask for four
models, 240 requests in all, in two mixes: `uniform` (each model equally often) and `skewed`
(one hot model 70 %, three cold ones 10 % each). Each (mix, target) run gets fresh mocks, so
cold loads start from zero; the request sequence is drawn from a fixed seed and is the same for
both targets. The best static placement (two models per instance) needs 4 cold loads.

Usage: benches/harness/placement.py [--bin-dir target/release] [--requests 240] [--json out.json]
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
    upstream ollama {{
        least_conn;
        server 127.0.0.1:{p0};
        server 127.0.0.1:{p1};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host localhost;
            proxy_buffering off;
            proxy_read_timeout 1h;
        }}
    }}
}}
"""


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


def start_nginx(procs, tag, mock_ports):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix = os.path.join(procs.workdir, f"nginx-{tag}")
    os.makedirs(prefix, exist_ok=True)
    port = free_port()
    conf = NGINX_CONF.format(user="user root root;" if os.geteuid() == 0 else "", prefix=prefix,
                             p0=mock_ports[0], p1=mock_ports[1], listen=port)
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
                                         headers={"Content-Type": "application/json"})
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=None)
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--json", default=None)
    ap.add_argument("--mixes", default="uniform,skewed")
    ap.add_argument("--targets", default="sidecar,nginx")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.bin_dir is None:
        rel = os.path.join(root, "target", "release")
        args.bin_dir = rel if os.path.exists(os.path.join(rel, "ollama-sidecar")) else \
            os.path.join(root, "target", "debug")
    workdir = tempfile.mkdtemp(prefix="placement-bench-")
    procs = Procs(workdir)
    results = {"bin_dir": args.bin_dir, "requests": args.requests, "runs": []}
    try:
        for mix in args.mixes.split(","):
            weights = MIXES[mix]
            rng = random.Random(f"{args.seed}-{mix}")
            sequence = rng.choices(MODELS, weights=weights, k=args.requests)
            for target in args.targets.split(","):
                tag = f"{mix}-{target}"
                mocks = start_mocks(procs, args, tag)
                admin = None
                if target == "sidecar":
                    proc, port, admin = start_sidecar(procs, args, tag, mocks)
                else:
                    proc, port = start_nginx(procs, tag, mocks)
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
                }
                if admin:
                    status = json.loads(http(admin, "/status")[1])
                    run["placement"] = {i["name"]: i.get("placement") for i in status["instances"]}
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
                procs.stop_all()
    finally:
        procs.stop_all()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
