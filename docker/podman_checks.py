"""HTTP checks for docker/podman-test.sh, against containers published on 127.0.0.1.

Standard library only. Each subcommand exits non-zero with a message naming what was wrong:
  ready URL SECONDS               the admin listener's /readyz answers 200 within SECONDS
  tags URL                        /api/tags lists the mock's llama3.2
  stream URL TOKENS DELAY         a streamed /api/chat arrives chunk by chunk, spread over time
  stream-bg URL FILE              a streamed /api/chat written to FILE line by line (for stop tests)
  wait-chunks FILE N SECONDS      FILE holds N lines within SECONDS
  metrics URL                     /metrics counts the requests made through the container
  restarts URL INSTANCE N         /metrics says INSTANCE was restarted at least N times
"""

import http.client
import json
import sys
import time
import urllib.parse
import urllib.request

MODEL = "llama3.2"


def fail(msg):
    sys.exit(f"podman_checks: {msg}")


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def ready(url, seconds):
    deadline = time.monotonic() + float(seconds)
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = get(f"{url}/readyz", timeout=2)
            if status == 200:
                return
            last = f"{status} {body.strip()}"
        except urllib.error.HTTPError as e:
            last = f"{e.code} {e.read().decode(errors='replace').strip()}"
        except OSError as e:
            last = str(e)
        time.sleep(0.25)
    fail(f"{url}/readyz not ready after {seconds} s: last answer {last}")


def tags(url):
    status, body = get(f"{url}/api/tags")
    names = [m["name"] for m in json.loads(body)["models"]]
    if not any(n.startswith(MODEL) for n in names):
        fail(f"/api/tags lists {names}, not {MODEL}")
    print(f"/api/tags: {status}, {len(names)} models")


def open_chat(url):
    """POST a streamed /api/chat; returns the response, its status checked."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    conn.request("POST", "/api/chat", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        fail(f"/api/chat: {resp.status} {resp.read().decode(errors='replace')}")
    return resp


def chunks(resp):
    """(arrival time, parsed line) for each NDJSON line, as it arrives."""
    while True:
        line = resp.readline()
        if not line:
            return
        if line.strip():
            yield time.monotonic(), json.loads(line)


def check_complete(got):
    if not got:
        fail("the stream was empty")
    if not got[-1][1].get("done"):
        fail(f"the stream ended without its final chunk: last line {got[-1][1]}")
    if any(c.get("done") for _, c in got[:-1]):
        fail("a chunk before the last says done")


def stream(url, tokens, delay):
    got = list(chunks(open_chat(url)))
    check_complete(got)
    tokens, delay = int(tokens), float(delay)
    if len(got) < tokens:
        fail(f"{len(got)} chunks, expected at least {tokens}")
    # Relayed as produced, not buffered: the chunks arrive over about tokens * delay seconds.
    spread = got[-1][0] - got[0][0]
    if spread < 0.5 * (tokens - 1) * delay:
        fail(f"{len(got)} chunks arrived within {spread:.3f} s: the stream was buffered")
    print(f"/api/chat: {len(got)} chunks over {spread:.2f} s, the last one done")


def stream_bg(url, path):
    got = []
    with open(path, "w") as out:
        for t, c in chunks(open_chat(url)):
            got.append((t, c))
            out.write(json.dumps(c) + "\n")
            out.flush()
    check_complete(got)


def wait_chunks(path, n, seconds):
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                if sum(1 for _ in f) >= int(n):
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    fail(f"{path}: fewer than {n} chunks after {seconds} s")


def samples(text, name):
    """{labels: value} of one metric family in Prometheus text format."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, value = line.rsplit(" ", 1)
            out[series[len(name):]] = float(value)
    return out


def metrics(url):
    _, text = get(f"{url}/metrics")
    requests = samples(text, "ollama_sidecar_requests_total")
    if sum(requests.values()) < 2:
        fail(f"/metrics: ollama_sidecar_requests_total {requests}")
    tokens = sum(samples(text, "ollama_sidecar_completion_tokens_total").values())
    if tokens <= 0:
        fail("/metrics: no completion tokens counted")
    print(f"/metrics: {int(sum(requests.values()))} requests, {int(tokens)} completion tokens")


def restarts(url, instance, n):
    _, text = get(f"{url}/metrics")
    got = samples(text, "ollama_sidecar_instance_restarts_total")
    count = sum(v for k, v in got.items() if f'instance="{instance}"' in k)
    if count < int(n):
        fail(f"/metrics: ollama_sidecar_instance_restarts_total {got}, expected {instance} >= {n}")
    print(f"/metrics: instance {instance} restarted {int(count)} time(s)")


COMMANDS = {
    "ready": ready,
    "tags": tags,
    "stream": stream,
    "stream-bg": stream_bg,
    "wait-chunks": wait_chunks,
    "metrics": metrics,
    "restarts": restarts,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    try:
        COMMANDS[sys.argv[1]](*sys.argv[2:])
    except (OSError, ValueError, KeyError) as e:
        fail(f"{sys.argv[1]}: {e}")
