#!/usr/bin/env bash
# Runs the official, unmodified Python clients (ollama-python, openai) against the real sidecar,
# which supervises two mock Ollama instances on free loopback ports. Used by `./dev.sh test`.
set -euo pipefail
cd "$(dirname "$0")/../.."

python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "tests/clients/run.sh: python3 is missing" >&2; exit 1; }
venv=target/clients-venv
if [ ! -x "$venv/bin/pytest" ] || [ tests/clients/requirements.txt -nt "$venv/.installed" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r tests/clients/requirements.txt
  touch "$venv/.installed"
fi

cargo build -q --bins
bin=target/debug

free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
listen=$(free_port); admin=$(free_port); a=$(free_port); b=$(free_port)
work=$(mktemp -d)
cat > "$work/sidecar.yaml" <<YAML
listen: 127.0.0.1:$listen
admin:
  listen: 127.0.0.1:$admin
instances:
  - name: mock-a
    command: $PWD/$bin/mock-ollama
    port: $a
    num_parallel: 2
  - name: mock-b
    command: $PWD/$bin/mock-ollama
    port: $b
    num_parallel: 2
YAML

"$bin/ollama-sidecar" --config "$work/sidecar.yaml" >"$work/sidecar.log" 2>&1 &
pid=$!
cleanup() {
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Ready when a request through the proxy succeeds (instances supervised and ready), 30 s at most.
ready() { "$python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "http://127.0.0.1:$listen/api/version" 2>/dev/null; }
for _ in $(seq 1 300); do
  if ready; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then cat "$work/sidecar.log" >&2; exit 1; fi
  sleep 0.1
done
ready || { echo "tests/clients/run.sh: the sidecar did not become ready in 30 s" >&2; cat "$work/sidecar.log" >&2; exit 1; }

OLLAMA_SIDECAR_URL="http://127.0.0.1:$listen" "$venv/bin/pytest" -q tests/clients || { tail -50 "$work/sidecar.log" >&2; exit 1; }
