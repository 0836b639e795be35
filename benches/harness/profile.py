#!/usr/bin/env python3
"""The evidence behind docs/benchmarks.md's analysis: profiles of the sidecar under load.

  profile.py perf   [--path /api/tags | --embed]   perf record (cpu-clock) while wrk -c16 runs
  profile.py strace [--path /api/tags | --embed]   system calls per request, sidecar and nginx
  profile.py massif --streams 300 | --queued 1000   heap allocation sites per connection (valgrind)
  profile.py rss    --streams 1000 --queued 10000   VmRSS per connection (MALLOC_ARENA_MAX=1 too;
                                                   Pingora alone too, when BIN/examples has it)
  profile.py ttfb   [--gaps 0,0.5,2]                 stream TTFB after idle gaps, direct vs sidecar

It builds a profiling copy of the sidecar (symbols, frame pointers; target/profiling, about
5 minutes cold) unless --bin names one, starts the mock (and nginx for strace) on free loopback
ports like benches/run.sh does, and stops everything it started. Needs perf (Debian `linux-perf`),
strace and valgrind for the modes that use them.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

ROOT = bench.ROOT


def build_profiling():
    env = dict(os.environ, CARGO_PROFILE_RELEASE_STRIP="false",
               CARGO_PROFILE_RELEASE_DEBUG="line-tables-only",
               RUSTFLAGS="-C force-frame-pointers=yes",
               CARGO_TARGET_DIR=os.path.join(ROOT, "target", "profiling"))
    subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, env=env, check=True)
    return os.path.join(ROOT, "target", "profiling", "release")


def start_mock(procs, bin_dir):
    port = bench.free_port()
    p = procs.start("mock", [os.path.join(bin_dir, "mock-ollama"), "serve"], {
        "OLLAMA_HOST": f"127.0.0.1:{port}", "MOCK_NO_REQUEST_LOG": "1",
        "OLLAMA_NUM_PARALLEL": "16384", "OLLAMA_MAX_QUEUE": "30000"})
    bench.wait_ready(port, "/api/version", p, "mock", procs.workdir)
    return p, port


def start_sidecar(procs, sidecar, mock_port, num_parallel, extra="", wrapper=(), env=None,
                  name="sidecar"):
    path, port = bench.write_sidecar_config(procs.workdir, name, mock_port, num_parallel, extra)
    p = procs.start(name, list(wrapper) + [sidecar, "--config", path], env)
    bench.wait_ready(port, "/api/tags", p, name, procs.workdir, timeout=120)
    return p, port


def workload(args):
    if args.embed:
        return "/api/embed", "POST", bench.EMBED_BODY
    return args.path, None, None


def do_perf(args, procs, bin_dir):
    _, mock_port = start_mock(procs, bin_dir)
    sc, port = start_sidecar(procs, os.path.join(bin_dir, "ollama-sidecar"), mock_port, 64)
    path, method, body = workload(args)
    url = f"http://127.0.0.1:{port}{path}"
    bench.run_wrk(url, 16, 3, 2, method, body)
    data = os.path.join(procs.workdir, "perf.data")
    rec = subprocess.Popen(["perf", "record", "-F", "2999", "-g", "-p", str(sc.pid), "-o", data,
                            "--", "sleep", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = bench.run_wrk(url, 16, 8, 2, method, body)
    rec.wait()
    keep = os.path.join(ROOT, "target", "bench", "perf.data")
    print(f"{path}: {r['rps']:.0f} req/s under perf; full report: perf report -i {keep}")
    for sort in ("dso", "symbol"):
        out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", sort,
                              "--stdio", "-g", "none"], capture_output=True, text=True).stdout
        lines = [ln for ln in out.splitlines() if "%" in ln and not ln.startswith("#")]
        print(f"\n-- self time by {sort} (top {args.top})")
        print("\n".join(ln[:150] for ln in lines[:args.top]))
    out = subprocess.run(["perf", "report", "-i", data, "--children", "--sort", "symbol", "--stdio",
                          "-g", "none"], capture_output=True, text=True).stdout
    lines = [ln for ln in out.splitlines() if "%" in ln and ("pingora" in ln or "ollama_sidecar" in ln)]
    print(f"\n-- inclusive time, sidecar and Pingora frames (top {args.top})")
    print("\n".join(ln[:170] for ln in lines[:args.top]))
    os.makedirs(os.path.dirname(keep), exist_ok=True)
    shutil.move(data, keep)


def do_strace(args, procs, bin_dir):
    _, mock_port = start_mock(procs, bin_dir)
    sc, sc_port = start_sidecar(procs, os.path.join(bin_dir, "ollama-sidecar"), mock_port, 64)
    nprefix = os.path.join(procs.workdir, "nginx")
    os.makedirs(nprefix)
    with open(os.path.join(ROOT, "benches", "nginx.conf.template")) as f:
        conf = f.read()
    n_port = bench.free_port()
    for k, v in {"PREFIX": nprefix, "WORKERS": str(os.cpu_count()), "LISTEN": f"127.0.0.1:{n_port}",
                 "UPSTREAM": f"127.0.0.1:{mock_port}", "UPSTREAM_PORT": str(mock_port),
                 "USER": "user root root;" if os.geteuid() == 0 else ""}.items():
        conf = conf.replace("{{" + k + "}}", v)
    with open(os.path.join(nprefix, "nginx.conf"), "w") as f:
        f.write(conf)
    ng = procs.start("nginx", ["nginx", "-p", nprefix, "-e", os.path.join(nprefix, "err.log"),
                               "-c", os.path.join(nprefix, "nginx.conf")])
    bench.wait_ready(n_port, "/api/tags", ng, "nginx", procs.workdir)
    path, method, body = workload(args)
    for name, port, pids in (("sidecar", sc_port, [sc.pid]), ("nginx", n_port, bench.family(ng.pid))):
        url = f"http://127.0.0.1:{port}{path}"
        bench.run_wrk(url, 16, 2, 1, method, body)
        out = os.path.join(procs.workdir, f"strace-{name}.txt")
        cmd = ["strace", "-c", "-f", "-o", out]
        for p in pids:
            cmd += ["-p", str(p)]
        st = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        r = bench.run_wrk(url, 16, 4, 1, method, body)
        st.send_signal(signal.SIGINT)
        st.wait()
        print(f"\n-- {name} {path}: system calls per request ({r['requests']} requests, under strace)")
        with open(out) as f:
            for line in f:
                m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d*)\s*(\w+)$", line)
                if m and int(m.group(1)) >= r["requests"] / 100:
                    print(f"  {m.group(3):16} {int(m.group(1)) / r['requests']:6.2f}")


def do_massif(args, procs, bin_dir):
    _, mock_port = start_mock(procs, bin_dir)
    n = args.streams or args.queued
    par = n + 64 if args.streams else 1
    out = os.path.join(ROOT, "target", "bench", f"massif-{'streams' if args.streams else 'queued'}.out")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    sc, port = start_sidecar(procs, os.path.join(bin_dir, "ollama-sidecar"), mock_port, par,
                             f"admission: {{max_queued: {2 * n}}}\n",
                             ["valgrind", "--tool=massif", "--threshold=0.5", f"--massif-out-file={out}"])
    bench.mock_faults(mock_port, tokens=10, token_delay_ms=600_000)
    hold = []
    if args.queued:
        hold = bench.open_streams(port, "/api/chat", bench.CHAT_BODY, 1, True)
    socks = bench.open_streams(port, "/api/chat", bench.CHAT_BODY, n, bool(args.streams), timeout=300)
    time.sleep(5)
    bench.close_all(socks + hold)
    procs.stop(sc, timeout=120)
    text = subprocess.run(["ms_print", out], capture_output=True, text=True).stdout
    lines = text.splitlines()
    peak = int(re.search(r"(\d+) \(peak\)", text).group(1))
    start = max(i for i, ln in enumerate(lines) if re.match(rf"^\s+{peak}\s", ln))
    sec = lines[start:]
    end = next((j for j, ln in enumerate(sec[5:], 5) if re.match(r"^-{20}", ln)), len(sec))
    print(f"peak heap with {n} {'idle streams' if args.streams else 'queued requests'}:")
    print("\n".join(sec[:2]))
    cur = None
    rows = []
    for ln in sec[:end]:
        m = re.match(r"^->(\d+\.\d+)% \(([\d,]+)B\)", ln)
        if m:
            cur = [int(m.group(2).replace(",", "")), None]
            rows.append(cur)
            continue
        if cur and cur[1] is None:
            m2 = re.search(r"0x[0-9A-F]+: (.*)$", ln)
            if m2 and re.search(r"pingora|ollama_sidecar|stream\.rs|body\.rs|buf_|tokio::sync", m2.group(1)):
                cur[1] = m2.group(1)
    for size, where in rows:
        print(f"  {size / n:9.0f} B per connection  {(where or '(other)')[:140]}")
    print(f"full report: ms_print {out}")


def do_rss(args, procs, bin_dir):
    _, mock_port = start_mock(procs, bin_dir)
    bench.mock_faults(mock_port, tokens=10, token_delay_ms=600_000)
    floor_bin = os.path.join(bin_dir, "examples", "pingora_floor")
    if os.path.exists(floor_bin):
        # Pingora alone, for comparison: what is left when none of the sidecar's work is done.
        port = bench.free_port()
        fl = procs.start("pingora", [floor_bin, f"127.0.0.1:{port}", f"127.0.0.1:{mock_port}"])
        bench.wait_ready(port, "/api/tags", fl, "pingora", procs.workdir)
        r0 = bench.settle_rss([fl.pid], 3)
        socks = bench.open_streams(port, "/api/chat", bench.CHAT_BODY, args.streams, True)
        time.sleep(1)
        r1 = bench.settle_rss([fl.pid])
        bench.close_all(socks)
        print(f"{'Pingora alone':22} {args.streams:6} {'idle streams':16} RSS {r0} -> {r1} KiB: "
              f"{(r1 - r0) / args.streams:6.1f} KiB each")
        procs.stop(fl)
    for arena in (None, "1"):
        env = {"MALLOC_ARENA_MAX": arena} if arena else {}
        label = f"MALLOC_ARENA_MAX={arena}" if arena else "default glibc arenas"
        for mode, n, par in (("idle streams", args.streams, args.streams + 64),
                             ("queued requests", args.queued, 1)):
            sc, port = start_sidecar(procs, os.path.join(bin_dir, "ollama-sidecar"), mock_port, par,
                                     f"admission: {{max_queued: {2 * n}}}\n", env=env, name="rss")
            time.sleep(1)
            hold = bench.open_streams(port, "/api/chat", bench.CHAT_BODY, 1, True) if par == 1 else []
            r0 = bench.settle_rss([sc.pid], 3)
            socks = bench.open_streams(port, "/api/chat", bench.CHAT_BODY, n, par > 1)
            time.sleep(1)
            r1 = bench.settle_rss([sc.pid])
            bench.close_all(socks + hold)
            print(f"{label:22} {n:6} {mode:16} RSS {r0} -> {r1} KiB: {(r1 - r0) / n:6.1f} KiB each")
            procs.stop(sc)


def do_ttfb(args, procs, bin_dir):
    _, mock_port = start_mock(procs, bin_dir)
    _, port = start_sidecar(procs, os.path.join(bin_dir, "ollama-sidecar"), mock_port, 64)
    bench.mock_faults(mock_port, tokens=200, token_delay_ms=1)
    for gap in (float(g) for g in args.gaps.split(",")):
        for name, p in (("direct", mock_port), ("sidecar", port)):
            bench.one_stream(p, "/api/chat", bench.CHAT_BODY)
            ttfb = []
            for _ in range(args.n):
                time.sleep(gap)
                ttfb.append(bench.one_stream(p, "/api/chat", bench.CHAT_BODY)["ttfb_ns"])
            print(f"gap {gap:4.1f} s  {name:8} TTFB p50 {bench.pct(ttfb, 50) / 1e3:6.0f} us  "
                  f"p90 {bench.pct(ttfb, 90) / 1e3:6.0f} us  ({args.n} streams of 200 chunks)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", choices=["perf", "strace", "massif", "rss", "ttfb"])
    ap.add_argument("--bin", help="directory with ollama-sidecar and mock-ollama (default: build a "
                                  "profiling copy in target/profiling)")
    ap.add_argument("--path", default="/api/tags")
    ap.add_argument("--embed", action="store_true", help="POST /api/embed instead of --path")
    ap.add_argument("--streams", type=int, default=0)
    ap.add_argument("--queued", type=int, default=0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--gaps", default="0,0.5,2", help="ttfb: idle seconds before each stream")
    ap.add_argument("-n", type=int, default=20, help="ttfb: streams per gap and target")
    args = ap.parse_args()
    if args.mode == "massif" and bool(args.streams) == bool(args.queued):
        ap.error("massif: give one of --streams N or --queued N")
    if args.mode == "rss":
        args.streams = args.streams or 1000
        args.queued = args.queued or 10000
    bin_dir = args.bin or build_profiling()
    workdir = tempfile.mkdtemp(prefix="ollama-sidecar-profile-")
    procs = bench.Procs(workdir)
    signal.signal(signal.SIGTERM, lambda *_: (procs.stop_all(), sys.exit(143)))
    try:
        {"perf": do_perf, "strace": do_strace, "massif": do_massif, "rss": do_rss,
         "ttfb": do_ttfb}[args.mode](
            args, procs, bin_dir)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
