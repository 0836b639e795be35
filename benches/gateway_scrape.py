#!/usr/bin/env python3
"""What one scrape of the admin listener costs the sidecar: /metrics/gateway (the three gauges
an inference gateway's endpoint picker reads every 50 ms) against the full /metrics.

    cargo build --bins && python3 benches/gateway_scrape.py            # debug build
    cargo build --release --bins && python3 benches/gateway_scrape.py --profile release

Starts two mock Ollamas and the sidecar on free loopback ports, sends 60 requests on three
routes and two models (so the histograms have series), then times N kept-alive GETs of each
path and reads the sidecar's CPU time from /proc. Stops everything it started.
"""
import argparse
import http.client
import json
import os
import socket
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("the sidecar did not become ready")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="debug", choices=["debug", "release"])
    ap.add_argument("-n", type=int, default=2000, help="scrapes per path (default 2000)")
    args = ap.parse_args()
    bins = os.path.join(ROOT, "target", args.profile)
    mocks = [free_port(), free_port()]
    proxy, admin = free_port(), free_port()
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "sidecar.yaml")
        with open(config, "w") as f:
            f.write(f"listen: 127.0.0.1:{proxy}\nadmin:\n  listen: 127.0.0.1:{admin}\n"
                    "log:\n  access: false\ninstances:\n")
            for i, port in enumerate(mocks):
                f.write(f"  - name: m{i}\n    url: http://127.0.0.1:{port}\n    num_parallel: 2\n")
        try:
            for port in mocks:
                procs.append(subprocess.Popen(
                    [os.path.join(bins, "mock-ollama"), "serve"],
                    env={**os.environ, "OLLAMA_HOST": f"127.0.0.1:{port}"},
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            sidecar = subprocess.Popen([os.path.join(bins, "ollama-sidecar"), "--config", config],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(sidecar)
            wait_ready(admin)
            time.sleep(1.5)  # the model allow-list (model labels) is read at start
            c = http.client.HTTPConnection("127.0.0.1", proxy, timeout=30)
            for i in range(60):
                model = ["llama3.2", "qwen2.5:0.5b"][i % 2]
                path, body = [
                    ("/api/chat", {"model": model, "messages": [{"role": "user", "content": "hi"}]}),
                    ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]}),
                    ("/api/generate", {"model": model, "prompt": "hi", "stream": False}),
                ][i % 3]
                c.request("POST", path, json.dumps(body), {"content-type": "application/json"})
                c.getresponse().read()
            print(f"{args.profile} build, {os.cpu_count()} CPUs, {args.n} scrapes per path")
            for path in ("/metrics/gateway", "/metrics"):
                c = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
                c.request("GET", path)
                size = len(c.getresponse().read())
                cpu0, t0 = cpu_seconds(sidecar.pid), time.perf_counter()
                for _ in range(args.n):
                    c.request("GET", path)
                    c.getresponse().read()
                wall = time.perf_counter() - t0
                cpu = cpu_seconds(sidecar.pid) - cpu0
                print(f"{path:17} {size:6d} bytes  {wall / args.n * 1e6:6.0f} us wall  "
                      f"{cpu / args.n * 1e6:6.0f} us sidecar CPU per scrape  "
                      f"({cpu / args.n * 20 * 100:.2f}% of a core at 20 scrapes/s)")
        finally:
            for p in procs:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
