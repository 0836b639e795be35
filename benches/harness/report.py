#!/usr/bin/env python3
"""Turns bench.py's JSON (and optionally criterion logs) into Markdown between markers in
docs/benchmarks.md, leaving the hand-written text around the markers alone.

  report.py --json results.json --doc docs/benchmarks.md [--criterion-log NAME=cargo-bench.log ...]
"""

import argparse
import json
import os
import re
import statistics

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
CBEGIN, CEND = "<!-- criterion:begin -->", "<!-- criterion:end -->"

SKELETON = f"""# Benchmarks

{BEGIN}
{END}

## Criterion micro-benchmarks

{CBEGIN}
{CEND}
"""


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def ms(us):
    return f"{us / 1000:.2f}"


def us(ns):
    return f"{ns / 1000:.0f}"


# The small-request targets, in table order, with their labels.
SMALL_TARGETS = {
    "direct": "direct",
    "sidecar": "sidecar",
    "sidecar-1t": "sidecar, `threads: 1`",
    "pingora": "Pingora alone",
    "nginx": "nginx",
}


def small_table(res):
    rows = res["small"]
    max_busy = res["args"]["max_busy"]
    workloads = []
    for r in rows:
        if r["workload"] not in workloads:
            workloads.append(r["workload"])
    out = []
    out.append("| workload | target | req/s | vs direct | vs nginx | p50 ms | p99 ms | p99.9 ms | "
               "p99 added vs direct, ms | added vs nginx's | proxy CPU µs/req | CPU vs nginx | "
               "responses ≥ 30 ms | runs used |")
    out.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    summary = {}
    present = [t for t in SMALL_TARGETS if any(r["target"] == t for r in rows)]
    for w in workloads:
        agg = {}
        for t in present:
            every = [r for r in rows if r["workload"] == w and r["target"] == t]
            # Runs that started while other work kept the machine busy are left out of the
            # medians when there is a clean run to use instead.
            clean = [r for r in every if r.get("busy_before", 0) <= max_busy]
            rs = clean or every
            agg[t] = {
                "noisy": len(every) - len(clean),
                "rps": med([r["rps"] for r in rs]),
                "p50": med([r["p50_us"] for r in rs]),
                "p99": med([r["p99_us"] for r in rs]),
                "p999": med([r["p999_us"] for r in rs]),
                "cpu": med([r["proxy_cpu_us_per_req"] for r in rs]),
                "over30": sum(r["over_30ms"] for r in rs),
                "n": sum(r["requests"] for r in rs),
                "errors": sum(sum(r["errors"].values()) for r in rs),
                "reps": len(clean),
                "conns": rs[0]["conns"] if rs else None,
            }
        summary[w] = agg
        d, n = agg["direct"], agg["nginx"]
        for t in present:
            a = agg[t]
            added = a["p99"] - d["p99"] if t != "direct" else None
            n_added = n["p99"] - d["p99"]
            proxied = t not in ("direct", "nginx")
            add_ratio = (f"{added / n_added:.2f}x" if proxied and n_added > 0 else
                         ("n/a (nginx adds none)" if proxied else ""))
            cpu_note = " (the mock)" if t == "direct" else ""
            errs = f" ({a['errors']} errors)" if a["errors"] else ""
            runs = (f"{a['reps']} of {a['reps'] + a['noisy']} ({a['noisy']} busy, left out)"
                    if a["noisy"] and a["reps"] else f"{a['reps'] + a['noisy']}"
                    + (" (all busy)" if a["noisy"] else ""))
            out.append(
                f"| {w} (c={a['conns']}) | {SMALL_TARGETS[t]} | {a['rps']:.0f} | {ratio(a['rps'], d['rps'])} | "
                f"{ratio(a['rps'], n['rps'])} | {ms(a['p50'])} | {ms(a['p99'])} | {ms(a['p999'])} | "
                f"{'' if added is None else ms(added)} | {add_ratio} | {a['cpu']:.1f}{cpu_note} | "
                f"{ratio(a['cpu'], n['cpu']) if t != 'direct' else ''} | "
                f"{a['over30']} of {a['n']}{errs} | {runs} |")
    return out, summary


def stream_table(res):
    s = res["stream"]["summary"]
    d = s["direct"]
    out = ["| target | TTFB p50 µs | TTFB p99 µs | added TTFB p50 µs | first chunk p50 µs | "
           "chunk latency p50 µs | chunk latency p99 µs | added p99 µs | gap p50 µs | gap p99 µs | "
           "added gap p99 µs | ≥ 30 ms (TTFB / chunks / gaps) | proxy CPU ms/stream |",
           "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for t in ("direct", "sidecar", "nginx"):
        a = s[t]
        add = t != "direct"
        out.append(
            f"| {t} | {us(a['ttfb_ns']['p50'])} | {us(a['ttfb_ns']['p99'])} | "
            f"{us(a['ttfb_ns']['p50'] - d['ttfb_ns']['p50']) if add else ''} | "
            f"{us(a['first_chunk_ns']['p50'])} | {us(a['chunk_latency_ns']['p50'])} | "
            f"{us(a['chunk_latency_ns']['p99'])} | "
            f"{us(a['chunk_latency_ns']['p99'] - d['chunk_latency_ns']['p99']) if add else ''} | "
            f"{us(a['gaps_ns']['p50'])} | {us(a['gaps_ns']['p99'])} | "
            f"{us(a['gaps_ns']['p99'] - d['gaps_ns']['p99']) if add else ''} | "
            f"{a['ttfb_ns']['over_30ms']} / {a['chunk_latency_ns']['over_30ms']} / "
            f"{a['gaps_ns']['over_30ms']} | "
            f"{a['cpu_ms_per_stream']:.2f}{' (the mock)' if t == 'direct' else ''} |")
    return out


def kib(v):
    return f"{v / 1024:.1f} MiB"


def memory_table(res):
    m = res["memory"]
    out = ["| what | sidecar | nginx (master + workers) | direct (the mock) |",
           "|---|--:|--:|--:|",
           f"| idle, fresh start | {kib(m['idle_fresh_kib'])} | {kib(m['nginx_idle_fresh_kib'])} | |",
           f"| idle, after the small-request runs | {kib(m['after_small_kib'])} | | |",
           f"| idle, after the streaming runs | {kib(m['after_stream_kib'])} | "
           f"{kib(m['nginx_after_kib'])} (end of run) | |"]
    s, n, d = m["streams_sidecar"], m["streams_nginx"], m["streams_direct"]
    out.append(f"| {s['n']} idle streams: RSS before → during | {kib(s['before_kib'])} → "
               f"{kib(s['during_kib'])} | {kib(n['before_kib'])} → {kib(n['during_kib'])} | "
               f"{kib(d['before_kib'])} → {kib(d['during_kib'])} |")
    out.append(f"| per idle stream | **{s['per_stream_bytes'] / 1024:.1f} KiB** | "
               f"{n['per_stream_bytes'] / 1024:.1f} KiB | {d['per_stream_bytes'] / 1024:.1f} KiB |")
    out.append(f"| 5 s after the streams closed | {kib(s['after_close_kib'])} | {kib(n['after_close_kib'])} | "
               f"{kib(d['after_close_kib'])} |")
    q = m["queued"]
    out.append(f"| {q['n']} queued requests (`num_parallel: 1`): RSS with one stream → with the "
               f"queue | {kib(q['with_one_stream_kib'])} → {kib(q['during_kib'])} | | |")
    out.append(f"| per queued request | **{q['per_request_bytes'] / 1024:.1f} KiB** | | |")
    out.append(f"| 5 s after the queued requests left | {kib(q['after_close_kib'])} | | |")
    return out


def targets(res, small):
    m = res["memory"]
    st = res["stream"]["summary"]
    out = ["| target | measured | met |", "|---|---|---|"]

    def row(name, text, ok):
        out.append(f"| {name} | {text} | {'yes' if ok else '**no**'} |")

    for w in ("tags", "embed"):
        if w not in small:
            continue
        a = small[w]
        r = a["sidecar"]["rps"] / a["nginx"]["rps"]
        row(f"{w}: throughput ≥ 0.9x nginx", f"{r:.2f}x ({a['sidecar']['rps']:.0f} vs "
            f"{a['nginx']['rps']:.0f} req/s)", r >= 0.9)
    for w in ("tags", "embed", "tags-c1", "embed-c1"):
        if w not in small:
            continue
        a = small[w]
        sa = a["sidecar"]["p99"] - a["direct"]["p99"]
        na = a["nginx"]["p99"] - a["direct"]["p99"]
        if na > 0:
            row(f"{w}: p99 added ≤ 1.2x nginx's", f"+{ms(sa)} ms vs +{ms(na)} ms "
                f"({sa / na:.2f}x)", sa <= 1.2 * na)
        else:
            ok = a["sidecar"]["p99"] <= 1.2 * a["nginx"]["p99"]
            row(f"{w}: p99 added ≤ 1.2x nginx's", f"nginx adds nothing at p99 here; absolute p99 "
                f"{ms(a['sidecar']['p99'])} vs {ms(a['nginx']['p99'])} ms", ok)
    ttfb = (st["sidecar"]["ttfb_ns"]["p50"] - st["direct"]["ttfb_ns"]["p50"]) / 1e6
    row("streaming: added TTFB p50 < 1 ms", f"{ttfb:.3f} ms (nginx: "
        f"{(st['nginx']['ttfb_ns']['p50'] - st['direct']['ttfb_ns']['p50']) / 1e6:.3f} ms)", ttfb < 1)
    chunk = (st["sidecar"]["chunk_latency_ns"]["p99"] - st["direct"]["chunk_latency_ns"]["p99"]) / 1e6
    gap = (st["sidecar"]["gaps_ns"]["p99"] - st["direct"]["gaps_ns"]["p99"]) / 1e6
    row("streaming: added inter-chunk delay p99 < 0.5 ms",
        f"per-chunk latency p99 +{chunk:.3f} ms; gap p99 {gap:+.3f} ms", chunk < 0.5 and gap < 0.5)
    idle = m["idle_fresh_kib"] / 1024
    row("memory idle < 20 MB", f"{idle:.1f} MiB fresh, {m['after_stream_kib'] / 1024:.1f} MiB "
        f"after load", m["idle_fresh_kib"] * 1024 < 20e6)
    ps = m["streams_sidecar"]["per_stream_bytes"] / 1024
    row("memory < 64 KB per idle stream", f"{ps:.1f} KiB", ps * 1024 < 64000)
    pq = m["queued"]["per_request_bytes"] / 1024
    row("memory < 64 KB per queued request", f"{pq:.1f} KiB", pq * 1024 < 64000)
    slow = sum(r["over_30ms"] for r in res["small"]) + sum(
        st[t][k]["over_30ms"] for t in st for k in ("ttfb_ns", "chunk_latency_ns", "gaps_ns"))
    slow_sc = sum(r["over_30ms"] for r in res["small"] if r["target"] == "sidecar") + sum(
        st["sidecar"][k]["over_30ms"] for k in ("ttfb_ns", "chunk_latency_ns", "gaps_ns"))
    rj = res["reject"]["over_30ms"]
    row("no ~40 ms tails (Nagle / delayed ACK)", f"{slow_sc} sidecar samples ≥ 30 ms "
        f"({slow} over all targets; {rj} among the 503s)", slow_sc + rj == 0)
    return out


def results_md(res):
    m = res["machine"]
    a = res["args"]
    L = []
    L.append(f"Run {m['date']} on {m['nproc']} x {m['cpu']}, {m['mem_gib']} GiB, Linux "
             f"{m['kernel']}; commit `{m['commit']}`{' with uncommitted changes' if m['dirty'] else ''}; "
             f"{m['nginx']}, {m['wrk']}, Python {m['python']}. Took {res.get('elapsed_s', '?')} s.")
    L.append("")
    L.append(f"Command: `{m['command']}`")
    L.append("")
    L.append(f"Load: at start `{m['uptime_start'].split('load average:')[-1].strip()}`, at end "
             f"`{m.get('uptime_end', '').split('load average:')[-1].strip()}` (1/5/15-minute load "
             f"averages, which include this run's own processes). Before each measurement the "
             f"harness waits (up to {a['max_wait']:.0f} s) until the machine's CPU use, with "
             f"every benchmarked process idle, is below {a['max_busy']:.0%}; the figure it saw is "
             f"kept per run in the JSON (`busy_before`).")
    L.append("")
    L.append(f"All targets serve the same mock on 127.0.0.1 and share the {m['nproc']} cores with "
             f"the load generator: the mock (2 runtime threads, no request log), the sidecar "
             f"(`threads` defaults to the core count), nginx (`worker_processes {m['nproc']}`). Two "
             f"references join the small-request runs: the same sidecar with `threads: 1`, and "
             f"*Pingora alone* (`examples/pingora_floor.rs`: the same Pingora version, server "
             f"options and listener settings as the sidecar, and none of its work), the floor "
             f"under the sidecar's overhead.")
    L.append("")
    L.append(f"### Small responses (wrk, {a['reps']} interleaved rounds, medians)")
    L.append("")
    L.append(f"`wrk -t{a['wrk_threads']} -c{a['connections']} -d{a['duration']}s --latency -s "
             f"benches/harness/wrk_report.lua http://127.0.0.1:PORT/api/tags`; `/api/embed` the "
             f"same with `WRK_METHOD=POST WRK_BODY='{{\"model\":\"nomic-embed-text\",\"input\":...}}'`;"
             f" the `c=1` rows use `-t1 -c1 -d{a['c1_duration']}s` (latency without queueing). "
             f"Proxy CPU is utime+stime from /proc/PID/stat (nginx: master and workers) over the "
             f"run, divided by the requests; the direct rows show the mock's own CPU.")
    L.append("")
    t, small = small_table(res)
    L += t
    L.append("")
    L.append(f"### Streaming (`/api/chat`, {a['stream_tokens']} chunks {a['stream_delay_ms']} ms "
             f"apart, {res['stream']['summary']['direct']['streams']} streams per target, one at a "
             f"time, rotating targets)")
    L.append("")
    L.append("`benches/harness/bench.py` (`one_stream`): raw socket, `TCP_NODELAY`, a fresh "
             "connection per stream. TTFB: request sent → first response byte "
             "(`time.perf_counter_ns`). Chunk latency: arrival (`time.time_ns`) minus the "
             "`created_at` the mock stamps (ns) when it writes the chunk, so it is the delivery "
             "delay of each chunk; gap: time between consecutive chunk arrivals. \"Added\" is a "
             "difference of percentiles against direct.")
    L.append("")
    bb = res["stream"].get("busy_before")
    bb = bb if isinstance(bb, list) else [bb]
    L.append(f"Machine CPU use (other work) seen before each block of 10 rounds: "
             f"{', '.join(f'{b:.0%}' for b in bb)}; 1-minute load: "
             f"{', '.join(f'{x:.2f}' for x in res['stream']['load1'])}.")
    L.append("")
    L += stream_table(res)
    bad = {k: v["bad_lines"] for k, v in res["stream"]["summary"].items() if v["bad_lines"]}
    if bad:
        L.append("")
        L.append(f"Streams with a wrong number of lines: {bad}.")
    L.append("")
    L.append("### Memory (sidecar and mock: VmRSS from /proc/PID/status; nginx: the sum of Pss from /proc/PID/smaps_rollup over master and workers)")
    L.append("")
    q = res["memory"]["queued"]
    L.append(f"Idle streams: a sidecar with `num_parallel: {res['memory']['streams_sidecar']['n'] + 64}` "
             f"(so none queue), the mock set to send the first chunk at once and the next after 10 "
             f"minutes; {res['memory']['streams_sidecar']['n']} connections each get their first "
             f"chunk, then RSS is read once it stops moving. Queued: a sidecar with "
             f"`num_parallel: 1` and `admission.max_queued: {2 * q['n']}`, one slow stream holding "
             f"the slot, then {q['n']} more streamed requests (opened in {q['open_s']} s; "
             f"{q['answered_while_queued']} were answered while queued; the mock saw "
             f"{q['mock_stats'].get('inference_in_flight', '?')} in flight).")
    L.append("")
    L += memory_table(res)
    L.append("")
    rj = res["reject"]
    L.append("### Queue full (`admission.max_queued: 1`, `num_parallel: 1`, slot and queue held)")
    L.append("")
    L.append(f"`wrk -t{a['wrk_threads']} -c{a['connections']} -d{a['reject_duration']}s --latency -s "
             f"benches/harness/wrk_report.lua` with `WRK_METHOD=POST WRK_BODY='{{\"model\":"
             f"\"llama3.2\",...,\"stream\":true}}'` on `/api/chat`.")
    L.append("")
    L.append("| 503/s | non-2xx of all | p50 ms | p99 ms | p99.9 ms | max ms | ≥ 30 ms | "
             "sidecar CPU µs/503 |")
    L.append("|--:|--:|--:|--:|--:|--:|--:|--:|")
    L.append(f"| {rj['rps']:.0f} | {rj['errors']['status']} of {rj['requests']} | {ms(rj['p50_us'])} | "
             f"{ms(rj['p99_us'])} | {ms(rj['p999_us'])} | {ms(rj['max_us'])} | {rj['over_30ms']} | "
             f"{rj['proxy_cpu_us_per_req']:.1f} |")
    L.append("")
    L.append(f"Sample answer: {rj['sample_status']} `{rj['sample_body']}`")
    L.append("")
    L.append("### Against the targets")
    L.append("")
    L += targets(res, small)
    floor = [w for w in ("tags", "embed") if w in small and "pingora" in small[w]]
    if floor:
        L.append("")
        L.append("For scale, on the throughput targets: " + "; ".join(
            f"{w}: Pingora alone {small[w]['pingora']['rps'] / small[w]['nginx']['rps']:.2f}x nginx, "
            f"the sidecar {small[w]['sidecar']['rps'] / small[w]['pingora']['rps']:.2f}x Pingora alone"
            + (f", the sidecar on one thread {small[w]['sidecar-1t']['rps'] / small[w]['nginx']['rps']:.2f}x nginx"
               if "sidecar-1t" in small[w] else "")
            for w in floor) + ".")
    return "\n".join(L)


def criterion_md(logs):
    L = []
    for name, path in logs:
        with open(path, errors="replace") as f:
            text = f.read()
        rows, current = [], None
        for line in text.splitlines():
            if not line.strip():
                continue
            if not line.startswith(" ") and "time:" not in line and not line.startswith(
                    ("Benchmarking", "Found", "Gnuplot", "Warning", "Compiling", "Finished",
                     "Running", "Change", "No change", "Performance", "Improved", "Regressed",
                     "     ")):
                current = line.strip()
            mt = re.search(r"time:\s+\[(\S+ \S+) (\S+ \S+) (\S+ \S+)\]", line)
            if mt:
                head = line.split("time:")[0].strip()
                rows.append([head or current, mt.group(2), f"{mt.group(1)} – {mt.group(3)}", ""])
            mp = re.search(r"thrpt:\s+\[(\S+ \S+) (\S+ \S+) (\S+ \S+)\]", line)
            if mp and rows:
                rows[-1][3] = mp.group(2)
        L.append(f"`cargo bench --bench {name}`:")
        L.append("")
        L.append("| benchmark | time (median estimate) | 95% interval | throughput |")
        L.append("|---|--:|--:|--:|")
        for r in rows:
            L.append(f"| `{r[0]}` | {r[1]} | {r[2]} | {r[3]} |")
        L.append("")
    return "\n".join(L).rstrip()


def replace_between(doc, begin, end, body):
    if begin not in doc or end not in doc:
        doc = doc.rstrip() + f"\n\n{begin}\n{end}\n"
    pre, rest = doc.split(begin, 1)
    _, post = rest.split(end, 1)
    return f"{pre}{begin}\n{body}\n{end}{post}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--doc", required=True)
    ap.add_argument("--criterion-log", action="append", default=[],
                    help="NAME=PATH: the output of `cargo bench --bench NAME`")
    ap.add_argument("--criterion-header", default="")
    args = ap.parse_args()
    doc = open(args.doc).read() if os.path.exists(args.doc) else SKELETON
    if args.json:
        with open(args.json) as f:
            res = json.load(f)
        doc = replace_between(doc, BEGIN, END, results_md(res))
    if args.criterion_log:
        logs = [tuple(x.split("=", 1)) for x in args.criterion_log]
        body = (args.criterion_header + "\n\n" if args.criterion_header else "") + criterion_md(logs)
        doc = replace_between(doc, CBEGIN, CEND, body)
    with open(args.doc, "w") as f:
        f.write(doc)


if __name__ == "__main__":
    main()
