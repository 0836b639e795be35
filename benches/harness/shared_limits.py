#!/usr/bin/env python3
"""What limits counted in Redis (`shared_state`) cost a request, against the same limits counted
in the process, in one run; and how close two sidecars sharing one Redis hold a key to its limit.

Started by benches/shared_limits.sh (which builds the release binaries and installs wrk and
redis-server). Everything runs on 127.0.0.1 and is stopped on exit: a redis-server, the mock
(no request log), and sidecars with one API key.

- Cost: `POST /api/embed` (an inference route: the key's requests, tokens and concurrency slot are
  all checked, and the end of each request charges tokens and gives the slot back) with wrk at
  c=1 and c=64, rounds interleaved between the local-limits sidecar and the Redis one.
- Error: two Redis-backed sidecars with `requests_per_minute: R`, wrk on both at once on
  `/api/tags`; admitted (2xx) against what the bucket allows over the run, R * (1 + T / 60).
  The same with two sidecars without `shared_state`, for comparison.
"""

import argparse
import datetime
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (the harness's process, wrk and /proc helpers)

KEY = "bench-key-0123456789abcdef"
AUTH = f"Authorization: Bearer {KEY}"
BEGIN, END = "<!-- shared-limits:begin -->", "<!-- shared-limits:end -->"


def key_config(requests_per_minute, redis_url=None):
    sha = hashlib.sha256(KEY.encode()).hexdigest()
    text = (f"auth:\n  keys:\n    - name: bench\n      sha256: {sha}\n"
            f"      requests_per_minute: {requests_per_minute}\n"
            f"      tokens_per_minute: 1000000000000\n      max_concurrent: 100000\n")
    if redis_url:
        text += f"shared_state:\n  redis: {redis_url}\n"
    return text


def scrape(admin_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        return r.read().decode()


def call_histogram(text):
    """(count, sum, [(le, cumulative)]) of shared_state_call_duration_seconds."""
    buckets, count, total = [], 0, 0.0
    for line in text.splitlines():
        m = re.match(r'ollama_sidecar_shared_state_call_duration_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
        if m:
            buckets.append((float(m.group(1)), float(m.group(2))))
        elif line.startswith("ollama_sidecar_shared_state_call_duration_seconds_count "):
            count = float(line.split()[1])
        elif line.startswith("ollama_sidecar_shared_state_call_duration_seconds_sum "):
            total = float(line.split()[1])
    return count, total, buckets


def bucket_quantile(buckets, count, q):
    """The upper bound of the bucket holding quantile q."""
    for le, cum in buckets:
        if cum >= q * count:
            return le
    return float("inf")


def admin_port_of(path):
    with open(path) as f:
        return int(re.search(r"admin: \{listen: 127\.0\.0\.1:(\d+)\}", f.read()).group(1))


def start_sidecar(procs, workdir, args, name, mock_port, extra):
    """A sidecar whose routes all need the key: ready when its admin `/readyz` says so."""
    path, port = bench.write_sidecar_config(workdir, name, mock_port, 64, extra)
    p = procs.start(name, [os.path.join(args.bin_dir, "ollama-sidecar"), "--config", path])
    admin = admin_port_of(path)
    bench.wait_ready(admin, "/readyz", p, name, workdir)
    return p, port, admin


def wrk(port, path, conns, threads, duration, body=None):
    return bench.run_wrk(f"http://127.0.0.1:{port}{path}", conns, duration, threads,
                         "POST" if body else None, body, headers=[AUTH])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bin-dir", required=True, help="holds ollama-sidecar and mock-ollama")
    ap.add_argument("--doc", required=True, help="the report to rewrite between its markers")
    ap.add_argument("--cmdline", default="benches/shared_limits.sh")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds (medians)")
    ap.add_argument("--limit", type=int, default=6000, help="requests_per_minute for the error run")
    ap.add_argument("--max-wait", type=float, default=60,
                    help="longest wait (s) for a quiet machine before each measurement")
    args = ap.parse_args()

    workdir = tempfile.mkdtemp(prefix="ollama-sidecar-shared-limits.")
    procs = bench.Procs(workdir)
    log = lambda m: print(m, flush=True)  # noqa: E731
    started = time.time()
    try:
        redis_port = bench.free_port()
        redis = procs.start("redis", ["redis-server", "--port", str(redis_port), "--bind",
                                      "127.0.0.1", "--save", "", "--appendonly", "no",
                                      "--dir", workdir])
        redis_url = f"redis://127.0.0.1:{redis_port}"
        mock_port = bench.free_port()
        mock = procs.start("mock", [os.path.join(args.bin_dir, "mock-ollama"), "serve"],
                           env={"OLLAMA_HOST": f"127.0.0.1:{mock_port}",
                                "OLLAMA_NUM_PARALLEL": "16384", "MOCK_NO_REQUEST_LOG": "1"})
        bench.wait_ready(mock_port, "/api/version", mock, "mock", workdir)
        version = subprocess.run(["redis-server", "--version"], capture_output=True,
                                 text=True).stdout.split()[2]

        huge = 10**9
        targets = {}
        for name, url in [("local", None), ("redis", redis_url)]:
            targets[name] = start_sidecar(procs, workdir, args, f"sidecar-{name}", mock_port,
                                          key_config(huge, url))

        # Cost: interleaved rounds.
        runs = {}
        workloads = [("embed c=1", 1, 1), ("embed c=64", 64, 2)]
        for rep in range(args.reps):
            for wname, conns, threads in workloads:
                for tname, (p, port, _) in targets.items():
                    busy = bench.quiet_machine(0.3, args.max_wait, log)
                    pids = [p.pid]
                    cpu0, rcpu0 = bench.cpu_seconds(pids), bench.cpu_seconds([redis.pid])
                    r = wrk(port, "/api/embed", conns, threads, args.duration, bench.EMBED_BODY)
                    r["cpu_us"] = (bench.cpu_seconds(pids) - cpu0) / max(r["requests"], 1) * 1e6
                    r["redis_cpu_us"] = ((bench.cpu_seconds([redis.pid]) - rcpu0)
                                         / max(r["requests"], 1) * 1e6)
                    r["busy_before"] = busy
                    non2xx = r["errors"]["status"]
                    if non2xx:
                        sys.exit(f"{tname} {wname}: {non2xx} non-2xx answers")
                    runs.setdefault((wname, tname), []).append(r)
                    log(f"  round {rep + 1} {wname} {tname}: {r['rps']:.0f} req/s "
                        f"p50 {r['p50_us']} µs p99 {r['p99_us']} µs cpu {r['cpu_us']:.1f} µs/req")
        count, total, buckets = call_histogram(scrape(targets["redis"][2]))

        # Error: two sidecars sharing one Redis, and two that do not.
        limit = args.limit
        pairs = {}
        for name, url in [("shared", redis_url), ("separate", None)]:
            pair = []
            for i in range(2):
                _, port, _ = start_sidecar(procs, workdir, args, f"error-{name}-{i}", mock_port,
                                           key_config(limit, url))
                pair.append(port)
            results = [None, None]

            def one(i, port):
                results[i] = wrk(port, "/api/tags", 16, 1, args.duration)

            threads = [threading.Thread(target=one, args=(i, port)) for i, port in enumerate(pair)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            admitted = sum(r["requests"] - r["errors"]["status"] for r in results)
            sent = sum(r["requests"] for r in results)
            seconds = max(r["duration_us"] for r in results) / 1e6
            allowed = limit * (1 + seconds / 60)
            pairs[name] = dict(admitted=admitted, sent=sent, seconds=seconds, allowed=allowed,
                               each=[r["requests"] - r["errors"]["status"] for r in results],
                               error=admitted / allowed - 1)
            log(f"  {name}: {admitted} admitted of {sent} in {seconds:.1f} s; allowed {allowed:.0f}")
    finally:
        procs.stop_all()

    write_report(args, runs, workloads, (count, total, buckets), pairs, version,
                 time.time() - started)


def write_report(args, runs, workloads, histogram, pairs, redis_version, took):
    med = bench.med
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=bench.ROOT).stdout.strip()
    busy = [r["busy_before"] for rs in runs.values() for r in rs]
    busy_median, busy_max = med(busy), max(busy)
    lines = [BEGIN, "",
             f"Run {now}, commit `{commit}`, redis-server {redis_version}, "
             f"{os.cpu_count()} cores shared by wrk, the mock, Redis and the sidecars. "
             f"Took {took:.0f} s. Command: `{args.cmdline}`. Machine CPU use by other work before "
             f"the measurements (median, max): {busy_median:.0%}, {busy_max:.0%}; 1-minute load "
             f"at the end: {os.getloadavg()[0]:.2f}.", "",
             f"`wrk -H 'Authorization: Bearer ...' -d{args.duration}s` on `POST /api/embed` "
             "(`-t1 -c1` and `-t2 -c64`), through two sidecars running side by side with the same "
             "key (`requests_per_minute`, `tokens_per_minute`, `max_concurrent` all set, never "
             "reached): one counts in the process, one in Redis (`shared_state`). "
             f"{args.reps} interleaved rounds, medians. Each request through the Redis sidecar "
             "makes one `EVALSHA` before it is admitted and one after it ends (tokens, slot).", "",
             "| workload | limits | req/s | p50 ms | p99 ms | p99.9 ms | sidecar CPU µs/req | "
             "Redis CPU µs/req | added p50 ms | added p99 ms |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for wname, _, _ in workloads:
        base = runs[(wname, "local")]
        for tname in ("local", "redis"):
            rs = runs[(wname, tname)]
            p50, p99 = med([r["p50_us"] for r in rs]), med([r["p99_us"] for r in rs])
            added = ""
            if tname == "redis":
                d50 = (p50 - med([r["p50_us"] for r in base])) / 1000
                d99 = (p99 - med([r["p99_us"] for r in base])) / 1000
                added = f"{d50:+.3f} | {d99:+.3f}"
            else:
                added = " | "
            lines.append(
                f"| {wname} | {'Redis' if tname == 'redis' else 'local'} | "
                f"{med([r['rps'] for r in rs]):.0f} | {p50 / 1000:.3f} | {p99 / 1000:.3f} | "
                f"{med([r['p999_us'] for r in rs]) / 1000:.3f} | "
                f"{med([r['cpu_us'] for r in rs]):.1f} | "
                f"{med([r['redis_cpu_us'] for r in rs]):.1f} | {added} |")
    count, total, buckets = histogram
    if count:
        lines += ["",
                  f"The Redis sidecar's own `shared_state_call_duration_seconds` over the run "
                  f"({count:.0f} calls, admissions and ends): mean {total / count * 1e6:.0f} µs, "
                  f"p50 ≤ {bucket_quantile(buckets, count, 0.5) * 1e6:.0f} µs, "
                  f"p99 ≤ {bucket_quantile(buckets, count, 0.99) * 1e6:.0f} µs, "
                  f"p99.9 ≤ {bucket_quantile(buckets, count, 0.999) * 1e6:.0f} µs "
                  "(bucket upper bounds)."]
    lines += ["",
              f"Limit error: `requests_per_minute: {args.limit}`, wrk `-t1 -c16 -d{args.duration}s` "
              "on `/api/tags` at two sidecars at once; allowed = the limit × (1 + run time / 60 s) "
              "(a full bucket, refilled during the run).", "",
              "| sidecars | sent | admitted (each) | allowed | error |",
              "|---|--:|--:|--:|--:|"]
    for name, label in [("shared", "two, sharing one Redis"), ("separate", "two, limits per process")]:
        p = pairs[name]
        lines.append(f"| {label} | {p['sent']} | {p['admitted']} ({p['each'][0]} + {p['each'][1]}) "
                     f"| {p['allowed']:.0f} | {p['error'] * 100:+.1f}% |")
    lines += ["", END]
    section = "\n".join(lines)
    with open(args.doc) as f:
        doc = f.read()
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + section + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n## Shared limits (Redis)\n\n" + section + "\n"
    with open(args.doc, "w") as f:
        f.write(doc)
    print(section)


if __name__ == "__main__":
    main()
