#!/usr/bin/env python3
"""Overhead of ollama-sidecar against direct Ollama (the mock) and against nginx, on loopback.

Run through `benches/run.sh`, which installs wrk and nginx, builds the release binaries and raises
the file limit. This script starts the mock, the sidecar and nginx on free loopback ports, measures
interleaved repetitions (direct, sidecar, nginx, rotating the order each round), stops everything it
started, and writes the results between markers in docs/benchmarks.md (plus a JSON file).

Workloads:
  small     wrk, GET /api/tags and POST /api/embed, 16 connections (and 1 connection for latency
            without queueing): req/s, p50/p99, proxy CPU time per request, responses >= 30 ms.
            Two references join these runs: the sidecar with `threads: 1`, and Pingora alone
            (examples/pingora_floor.rs, when --bin-dir holds it), the floor under our overhead.
  stream    POST /api/chat, 200 chunks 1 ms apart, one stream at a time, raw sockets: time to the
            first byte, per-chunk delivery latency (arrival minus the mock's `created_at`,
            nanoseconds, same clock), gaps between chunks.
  memory    sidecar VmRSS idle, with 1,000 idle streams, with 10,000 queued requests.
  reject    queue full (`admission.max_queued: 1`): latency of the 503s under a wrk flood.
"""

import argparse
import datetime
import json
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LUA = os.path.join(HERE, "wrk_report.lua")
CLK_TCK = os.sysconf("SC_CLK_TCK")

CHAT_MODEL = "llama3.2"
EMBED_BODY = '{"model":"nomic-embed-text","input":"The quick brown fox jumps over the lazy dog"}'
# Seconds between closing the memory test's connections and reading RSS again.
AFTER_CLOSE_S = 5.0
CHAT_BODY = '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true}'

# ---------------------------------------------------------------------------------------------
# Processes


class Procs:
    """Every process this run starts, stopped in reverse order on exit."""

    def __init__(self, workdir, pidfile=None):
        self.workdir = workdir
        self.pidfile = pidfile
        self.items = []

    def start(self, name, cmd, env=None):
        log = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        full_env = dict(os.environ)
        full_env.pop("RUST_LOG", None)  # would override the sidecar's `log.level`
        full_env.update(env or {})
        p = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        self.items.append((name, p))
        if self.pidfile:
            with open(self.pidfile, "a") as f:
                f.write(f"{p.pid}\n")
        return p

    def stop(self, p, timeout=5.0):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.items = [(n, q) for n, q in self.items if q is not p]

    def stop_all(self):
        for _, p in reversed(list(self.items)):
            self.stop(p)


def log_tail(workdir, name, n=20):
    try:
        with open(os.path.join(workdir, f"{name}.log"), "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
    except OSError:
        return ""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http(port, path, method="GET", body=None, timeout=5.0):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=body.encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def wait_ready(port, path, proc, what, workdir, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}:\n{log_tail(workdir, what)}")
        try:
            if http(port, path, timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"{what} did not answer {path} on port {port} within {timeout}s:\n"
             f"{log_tail(workdir, what)}")


def family(pid):
    """A process and its children (nginx: master and workers)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == pid:
                    pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def cpu_seconds(pids):
    """utime + stime of the processes (all their threads), from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except OSError:
            pass
    return total / CLK_TCK


def proc_kib(pids, name, field):
    """The sum over pids of a `field:  N kB` line of /proc/PID/name (a process that is gone
    counts 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/{name}") as f:
                for line in f:
                    if line.startswith(field):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def rss_kib(pids):
    return proc_kib(pids, "status", "VmRSS:")


def pss_kib(pids):
    """Proportional set size: shared pages split between the processes (nginx's workers)."""
    return proc_kib(pids, "smaps_rollup", "Pss:")


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cpu_busy(seconds=1.0):
    """Share of the machine's CPU in use over `seconds` (everything, ours included)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v), idle
    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return 0.0 if t1 == t0 else 1.0 - (i1 - i0) / (t1 - t0)


def quiet_machine(max_busy, max_wait, log):
    """Waits (bounded) until other work on the machine (compiles) leaves the CPU mostly idle."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > max_busy and time.monotonic() < deadline:
        log(f"  machine busy ({busy:.0%} CPU while our processes idle); waiting")
        time.sleep(4)
        busy = cpu_busy()
    return busy


# ---------------------------------------------------------------------------------------------
# Measuring clients


def run_wrk(url, conns, duration, threads, method=None, body=None, headers=()):
    env = dict(os.environ)
    if method:
        env["WRK_METHOD"] = method
    if body:
        env["WRK_BODY"] = body
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--timeout", "5s", "--latency"]
    for header in headers:
        cmd += ["-H", header]
    cmd += ["-s", LUA, url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            r = json.loads(line[8:])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            return r
    raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")


def request_bytes(port, path, body, keepalive=False):
    b = body.encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(b)}\r\n"
            f"Connection: {'keep-alive' if keepalive else 'close'}\r\n\r\n")
    return head.encode() + b


CREATED_AT = re.compile(rb'"created_at":"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?Z"')


def rfc3339_ns(m):
    y, mo, d, h, mi, s = (int(x) for x in m.groups()[:6])
    frac = (m.group(7) or b"").decode()
    days = (datetime.date(y, mo, d) - datetime.date(1970, 1, 1)).days
    return ((days * 86400 + h * 3600 + mi * 60 + s) * 1_000_000_000
            + int((frac + "000000000")[:9]))


def one_stream(port, path, body):
    """One streamed request on a fresh connection; times every recv() that returns data."""
    req = request_bytes(port, path, body)
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    perf, wall, chunks = [], [], []
    t0 = time.perf_counter_ns()
    s.sendall(req)
    while True:
        d = s.recv(65536)
        if not d:
            break
        perf.append(time.perf_counter_ns())
        wall.append(time.time_ns())
        chunks.append(d)
    s.close()
    data = b"".join(chunks)
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream failed: {data[:200]!r}")
    ends, total = [], 0
    for c in chunks:
        total += len(c)
        ends.append(total)
    lines = []  # (perf arrival, one-way latency ns) per NDJSON line
    i = 0
    for m in CREATED_AT.finditer(data):
        line_end = data.find(b"\n", m.end())
        while ends[i] <= line_end:
            i += 1
        lines.append((perf[i], wall[i] - rfc3339_ns(m)))
    return {
        "ttfb_ns": perf[0] - t0,
        "first_chunk_ns": lines[0][0] - t0 if lines else None,
        "chunk_latency_ns": [lat for _, lat in lines],
        "gaps_ns": [b[0] - a[0] for a, b in zip(lines, lines[1:])],
        "lines": len(lines),
    }


def open_streams(port, path, body, n, wait_first_chunk, timeout=60.0):
    """Opens n connections, sends one request on each, and (optionally) waits until every one has
    received a response line. Returns the sockets (the caller closes them)."""
    socks = []
    req = request_bytes(port, path, body)
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(req)
        s.setblocking(False)
        socks.append(s)
    if not wait_first_chunk:
        return socks
    sel = selectors.DefaultSelector()
    seen = {}
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
        seen[s] = b""
    pending = set(socks)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            try:
                d = s.recv(65536)
            except BlockingIOError:
                continue
            if not d:
                sel.unregister(s)
                pending.discard(s)
                seen[s] = seen[s] + b"<closed>"
                continue
            seen[s] += d
            if b'"created_at"' in seen[s]:
                sel.unregister(s)
                pending.discard(s)
    sel.close()
    bad = [v for v in seen.values() if not v.startswith(b"HTTP/1.1 200") or v.endswith(b"<closed>")]
    if pending or bad:
        close_all(socks)
        raise RuntimeError(f"{len(pending)} streams got no first chunk, {len(bad)} failed; "
                           f"e.g. {bad[:1]!r}")
    return socks


def close_all(socks):
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def responded(socks):
    """How many of the sockets have something to read (a response or a close)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    n = len(sel.select(timeout=0))
    sel.close()
    return n


def mem_kib(pids):
    """VmRSS of one process; the PSS sum of several (nginx), so shared pages count once."""
    return rss_kib(pids) if len(pids) == 1 else pss_kib(pids)


def settle_rss(pids, max_wait=20.0):
    """Memory (mem_kib) once it stops moving (sampled every 0.5 s)."""
    last = mem_kib(pids)
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = mem_kib(pids)
        if abs(now - last) < 64:
            return now
        last = now
    return last


# ---------------------------------------------------------------------------------------------
# Statistics


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------
# The run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bin-dir", required=True, help="holds ollama-sidecar and mock-ollama")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds of the wrk workloads")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run (16 connections)")
    ap.add_argument("--c1-duration", type=int, default=5, help="seconds per 1-connection wrk run (0: skip)")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--wrk-threads", type=int, default=2)
    ap.add_argument("--stream-reps", type=int, default=40, help="streams per target")
    ap.add_argument("--stream-tokens", type=int, default=200)
    ap.add_argument("--stream-delay-ms", type=float, default=1.0)
    ap.add_argument("--idle-streams", type=int, default=1000)
    ap.add_argument("--queued", type=int, default=10000)
    ap.add_argument("--reject-duration", type=int, default=5)
    ap.add_argument("--max-busy", type=float, default=0.30,
                    help="wait before a measurement while the idle machine's CPU use is above this")
    ap.add_argument("--max-wait", type=float, default=120.0)
    ap.add_argument("--json", required=True, help="write the raw results here")
    ap.add_argument("--pidfile", help="append the pid of every process started here")
    ap.add_argument("--keep-logs", action="store_true", help="keep the processes' logs and configs")
    ap.add_argument("--command", default="benches/run.sh", help="the command line, for the report")
    args = ap.parse_args()

    workdir = tempfile.mkdtemp(prefix="ollama-sidecar-bench-")
    procs = Procs(workdir, args.pidfile)
    started = time.time()

    def log(msg):
        print(f"[{time.time() - started:6.1f}s] {msg}", flush=True)

    def on_signal(signum, _frame):
        procs.stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        results = run(args, procs, workdir, log)
    except BaseException:
        procs.stop_all()
        print(f"failed; the processes' logs are in {workdir}", file=sys.stderr)
        raise
    procs.stop_all()
    results["elapsed_s"] = round(time.time() - started, 1)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    if args.keep_logs:
        log(f"raw results: {args.json}; logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        log(f"raw results: {args.json}")


def machine_info(args):
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])

    def cmd(c):
        try:
            return subprocess.run(c, capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return "?"
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem_kib / 1048576, 1),
        "kernel": platform.release(),
        "commit": cmd(["git", "rev-parse", "--short", "HEAD"]),
        "dirty": bool(cmd(["git", "status", "--porcelain", "--untracked-files=no"])),
        "wrk": cmd(["wrk", "-v"]).splitlines()[0] if cmd(["wrk", "-v"]) else "wrk",
        "nginx": nginx_v.replace("nginx version: ", ""),
        "python": platform.python_version(),
        "command": args.command,
        "uptime_start": cmd(["uptime"]),
    }


def write_sidecar_config(workdir, name, mock_port, num_parallel, extra=""):
    port, admin = free_port(), free_port()
    path = os.path.join(workdir, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"listen: 127.0.0.1:{port}\n"
                f"admin: {{listen: 127.0.0.1:{admin}}}\n"
                f"instances: [{{name: mock, url: http://127.0.0.1:{mock_port}, "
                f"num_parallel: {num_parallel}}}]\n"
                f"log: {{level: warn}}\n{extra}")
    return path, port


def start_sidecar(procs, workdir, args, name, mock_port, num_parallel, extra=""):
    path, port = write_sidecar_config(workdir, name, mock_port, num_parallel, extra)
    p = procs.start(name, [os.path.join(args.bin_dir, "ollama-sidecar"), "--config", path])
    wait_ready(port, "/api/tags", p, name, workdir)
    return p, port, path


def mock_faults(port, **knobs):
    http(port, "/mock/faults", "POST", json.dumps(knobs))


def run(args, procs, workdir, log):
    info = machine_info(args)
    results = {"machine": info, "args": vars(args), "small": [], "stream": {}, "memory": {},
               "reject": {}}
    log(f"machine: {info['nproc']} x {info['cpu']}, {info['mem_gib']} GiB; {info['uptime_start']}")

    # -- the mock, fast: no request log, every request served at once
    mock_port = free_port()
    mock = procs.start("mock", [os.path.join(args.bin_dir, "mock-ollama"), "serve"], {
        "OLLAMA_HOST": f"127.0.0.1:{mock_port}", "MOCK_NO_REQUEST_LOG": "1",
        "OLLAMA_NUM_PARALLEL": "16384", "OLLAMA_MAX_QUEUE": "20000", "OLLAMA_KEEP_ALIVE": "-1",
    })
    wait_ready(mock_port, "/api/version", mock, "mock", workdir)

    # -- the sidecar, with an external instance pointing at the mock
    sidecar, sidecar_port, sidecar_conf = start_sidecar(procs, workdir, args, "sidecar", mock_port, 64)
    with open(sidecar_conf) as f:
        results["sidecar_config"] = f.read()
    time.sleep(1.0)
    results["memory"]["idle_fresh_kib"] = rss_kib([sidecar.pid])

    # -- nginx, a plain streaming reverse proxy
    nginx_port = free_port()
    nprefix = os.path.join(workdir, "nginx")
    os.makedirs(nprefix, exist_ok=True)
    with open(os.path.join(ROOT, "benches", "nginx.conf.template")) as f:
        conf = f.read()
    for k, v in {"PREFIX": nprefix, "WORKERS": str(os.cpu_count()),
                 "LISTEN": f"127.0.0.1:{nginx_port}", "UPSTREAM": f"127.0.0.1:{mock_port}",
                 "UPSTREAM_PORT": str(mock_port),
                 "USER": "user root root;" if os.geteuid() == 0 else ""}.items():
        conf = conf.replace("{{" + k + "}}", v)
    nconf = os.path.join(nprefix, "nginx.conf")
    with open(nconf, "w") as f:
        f.write(conf)
    nginx = procs.start("nginx", ["nginx", "-p", nprefix, "-e", os.path.join(nprefix, "nginx-error.log"),
                                  "-c", nconf])
    wait_ready(nginx_port, "/api/tags", nginx, "nginx", workdir)
    results["nginx_config"] = conf
    time.sleep(0.5)
    results["memory"]["nginx_idle_fresh_kib"] = pss_kib(family(nginx.pid))

    targets = {
        "direct": (mock_port, lambda: [mock.pid]),
        "sidecar": (sidecar_port, lambda: [sidecar.pid]),
        "nginx": (nginx_port, lambda: family(nginx.pid)),
    }
    order = ["direct", "sidecar", "nginx"]

    # -- references for the small requests only: the sidecar on one thread, and Pingora alone
    # (examples/pingora_floor.rs: same Pingora and listener settings, none of the sidecar's work)
    one_thread, one_thread_port, _ = start_sidecar(procs, workdir, args, "sidecar-1t", mock_port, 64,
                                                   "threads: 1\n")
    targets["sidecar-1t"] = (one_thread_port, lambda: [one_thread.pid])
    small_order = ["direct", "sidecar", "sidecar-1t", "nginx"]
    floor_bin = os.path.join(args.bin_dir, "pingora_floor")
    if os.path.exists(floor_bin):
        floor_port = free_port()
        floor = procs.start("pingora", [floor_bin, f"127.0.0.1:{floor_port}",
                                        f"127.0.0.1:{mock_port}"])
        wait_ready(floor_port, "/api/tags", floor, "pingora", workdir)
        targets["pingora"] = (floor_port, lambda: [floor.pid])
        small_order.insert(3, "pingora")

    # -- warm-up (not recorded): connection pools, allocator, page cache
    for name in small_order:
        run_wrk(f"http://127.0.0.1:{targets[name][0]}/api/tags", args.connections, 2, args.wrk_threads)
        run_wrk(f"http://127.0.0.1:{targets[name][0]}/api/embed", args.connections, 2,
                args.wrk_threads, "POST", EMBED_BODY)

    # -- small requests, interleaved
    workloads = [("tags", "/api/tags", None, None, args.connections, args.duration),
                 ("embed", "/api/embed", "POST", EMBED_BODY, args.connections, args.duration)]
    if args.c1_duration > 0:
        workloads += [("tags-c1", "/api/tags", None, None, 1, args.c1_duration),
                      ("embed-c1", "/api/embed", "POST", EMBED_BODY, 1, args.c1_duration)]
    for rep in range(args.reps):
        k = rep % len(small_order)
        rot = small_order[k:] + small_order[:k]
        for wname, path, method, body, conns, dur in workloads:
            for name in rot:
                port, pids = targets[name]
                busy = quiet_machine(args.max_busy, args.max_wait, log)
                load = loadavg()
                p = pids()
                c0, m0 = cpu_seconds(p), cpu_seconds([mock.pid])
                r = run_wrk(f"http://127.0.0.1:{port}{path}", conns, dur,
                            min(args.wrk_threads, conns), method, body)
                c1, m1 = cpu_seconds(p), cpu_seconds([mock.pid])
                r.update({"workload": wname, "target": name, "rep": rep, "conns": conns,
                          "load1": load, "busy_before": round(busy, 3),
                          "proxy_cpu_s": round(c1 - c0, 2), "mock_cpu_s": round(m1 - m0, 2)})
                r["proxy_cpu_us_per_req"] = (c1 - c0) * 1e6 / max(r["requests"], 1)
                results["small"].append(r)
                log(f"  rep {rep} {wname:8} {name:7} {r['rps']:9.0f} req/s  p50 {r['p50_us']:6d} us"
                    f"  p99 {r['p99_us']:6d} us  >=30ms {r['over_30ms']}  "
                    f"cpu {r['proxy_cpu_us_per_req']:.1f} us/req  load {load:.2f} busy {busy:.0%}")

    results["memory"]["after_small_kib"] = settle_rss([sidecar.pid], 3)
    procs.stop(one_thread)
    if "pingora" in targets:
        procs.stop(floor)

    # -- streaming: one stream at a time, rotating targets
    mock_faults(mock_port, tokens=args.stream_tokens, token_delay_ms=args.stream_delay_ms)
    for name in order:  # warm-up
        one_stream(targets[name][0], "/api/chat", CHAT_BODY)
    busy = quiet_machine(args.max_busy, args.max_wait, log)
    stream = {n: {"ttfb_ns": [], "first_chunk_ns": [], "chunk_latency_ns": [], "gaps_ns": [],
                  "cpu_s": 0.0, "streams": 0, "bad_lines": 0} for n in order}
    stream_load = [loadavg()]
    busy_seen = [round(busy, 3)]
    for rep in range(args.stream_reps):
        if rep and rep % 10 == 0:
            busy_seen.append(round(quiet_machine(args.max_busy, args.max_wait, log), 3))
        rot = order[rep % 3:] + order[:rep % 3]
        for name in rot:
            port, pids = targets[name]
            p = pids()
            c0 = cpu_seconds(p)
            r = one_stream(port, "/api/chat", CHAT_BODY)
            stream[name]["cpu_s"] += cpu_seconds(p) - c0
            s = stream[name]
            s["streams"] += 1
            if r["lines"] != args.stream_tokens + 1:
                s["bad_lines"] += 1
            for k in ("ttfb_ns", "first_chunk_ns"):
                s[k].append(r[k])
            s["chunk_latency_ns"].extend(r["chunk_latency_ns"])
            s["gaps_ns"].extend(r["gaps_ns"])
        if rep % 10 == 9:
            stream_load.append(loadavg())
    summary = {}
    for name, s in stream.items():
        summary[name] = {
            "streams": s["streams"], "bad_lines": s["bad_lines"],
            "cpu_ms_per_stream": s["cpu_s"] * 1000 / max(s["streams"], 1),
        }
        for k in ("ttfb_ns", "first_chunk_ns", "chunk_latency_ns", "gaps_ns"):
            v = s[k]
            summary[name][k] = {"n": len(v), "p50": pct(v, 50), "p90": pct(v, 90), "p99": pct(v, 99),
                                "max": max(v), "over_30ms": sum(1 for x in v if x >= 30_000_000)}
    results["stream"] = {"summary": summary, "load1": stream_load, "busy_before": busy_seen}
    for name in order:
        sm = summary[name]
        log(f"  stream {name:7} ttfb p50 {sm['ttfb_ns']['p50'] / 1e3:7.1f} us  chunk latency p50 "
            f"{sm['chunk_latency_ns']['p50'] / 1e3:6.1f} p99 {sm['chunk_latency_ns']['p99'] / 1e3:7.1f} us"
            f"  gap p99 {sm['gaps_ns']['p99'] / 1e3:7.1f} us  cpu {sm['cpu_ms_per_stream']:.2f} ms/stream")
    results["memory"]["after_stream_kib"] = settle_rss([sidecar.pid], 3)
    procs.stop(sidecar)

    # -- memory: idle streams held open (first chunk received, the next one 10 minutes away)
    mock_faults(mock_port, tokens=10, token_delay_ms=600_000)
    mem = results["memory"]
    wide, wide_port, _ = start_sidecar(procs, workdir, args, "sidecar-streams", mock_port,
                                       args.idle_streams + 64)
    time.sleep(1.0)
    for name, port, pids in (("sidecar", wide_port, lambda: [wide.pid]),
                             ("nginx", nginx_port, lambda: family(nginx.pid)),
                             ("direct", mock_port, lambda: [mock.pid])):
        before = settle_rss(pids(), 3)
        t0 = time.monotonic()
        socks = open_streams(port, "/api/chat", CHAT_BODY, args.idle_streams, True)
        opened_s = time.monotonic() - t0
        during = settle_rss(pids())
        close_all(socks)
        # The sidecar returns freed heap within two of its 2 s samples (src/memory.rs).
        time.sleep(AFTER_CLOSE_S)
        after = settle_rss(pids(), 5)
        mem[f"streams_{name}"] = {"n": args.idle_streams, "before_kib": before, "during_kib": during,
                                  "after_close_kib": after, "open_s": round(opened_s, 2),
                                  "per_stream_bytes": (during - before) * 1024 / args.idle_streams}
        log(f"  {args.idle_streams} idle streams via {name}: RSS {before} -> {during} KiB "
            f"({(during - before) * 1024 / args.idle_streams:.0f} B/stream), after close {after} KiB")
    procs.stop(wide)

    # -- memory: queued requests (one slot, held by a slow stream; the rest wait in the queue)
    queue, queue_port, _ = start_sidecar(procs, workdir, args, "sidecar-queue", mock_port, 1,
                                         f"admission: {{max_queued: {args.queued * 2}}}\n")
    time.sleep(1.0)
    before = settle_rss([queue.pid], 3)
    holder = open_streams(queue_port, "/api/chat", CHAT_BODY, 1, True)
    with_one = settle_rss([queue.pid], 3)
    t0 = time.monotonic()
    socks = open_streams(queue_port, "/api/chat", CHAT_BODY, args.queued, False)
    opened_s = time.monotonic() - t0
    time.sleep(1.0)
    during = settle_rss([queue.pid])
    answered = responded(socks)
    stats = json.loads(http(mock_port, "/mock/stats")[1])
    close_all(socks)
    close_all(holder)
    time.sleep(AFTER_CLOSE_S)
    after = settle_rss([queue.pid], 5)
    mem["queued"] = {"n": args.queued, "before_kib": before, "with_one_stream_kib": with_one,
                     "during_kib": during, "after_close_kib": after, "open_s": round(opened_s, 2),
                     "answered_while_queued": answered, "mock_stats": stats,
                     "per_request_bytes": (during - with_one) * 1024 / args.queued}
    log(f"  {args.queued} queued: RSS {with_one} -> {during} KiB "
        f"({(during - with_one) * 1024 / args.queued:.0f} B/request), {answered} answered early, "
        f"after close {after} KiB")
    procs.stop(queue)

    # -- queue full: one request streaming, one queued, then a flood that must get 503s
    rej, rej_port, _ = start_sidecar(procs, workdir, args, "sidecar-reject", mock_port, 1,
                                     "admission: {max_queued: 1}\n")
    holder = open_streams(rej_port, "/api/chat", CHAT_BODY, 1, True)
    holder += open_streams(rej_port, "/api/chat", CHAT_BODY, 1, False)
    time.sleep(0.5)
    busy = quiet_machine(args.max_busy, args.max_wait, log)
    load = loadavg()
    c0 = cpu_seconds([rej.pid])
    r = run_wrk(f"http://127.0.0.1:{rej_port}/api/chat", args.connections, args.reject_duration,
                args.wrk_threads, "POST", CHAT_BODY)
    c1 = cpu_seconds([rej.pid])
    status, body = None, b""
    try:
        http(rej_port, "/api/chat", "POST", CHAT_BODY)
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    close_all(holder)
    r.update({"load1": load, "busy_before": round(busy, 3), "proxy_cpu_s": round(c1 - c0, 2),
              "proxy_cpu_us_per_req": (c1 - c0) * 1e6 / max(r["requests"], 1),
              "sample_status": status, "sample_body": body.decode(errors="replace")[:200]})
    results["reject"] = r
    log(f"  queue full: {r['rps']:.0f} 503/s  p50 {r['p50_us']} us  p99 {r['p99_us']} us  "
        f"non-2xx {r['errors']['status']}/{r['requests']}  sample {status}")
    procs.stop(rej)
    results["memory"]["nginx_after_kib"] = pss_kib(family(nginx.pid))
    results["machine"]["uptime_end"] = subprocess.run(["uptime"], capture_output=True,
                                                      text=True).stdout.strip()
    return results


if __name__ == "__main__":
    main()
