#!/usr/bin/env bash
# The quick start: `./dev.sh run` runs the sidecar, `./dev.sh test` runs every test.
#   ./dev.sh run [CONFIG]   build (release) and run; CONFIG defaults to conf/sidecar.yaml when
#                           `ollama` is installed, else to conf/demo.yaml (supervised mock instances)
#   ./dev.sh test           cargo tests, then the official Python clients through the sidecar
set -euo pipefail
cd "$(dirname "$0")"

say() { echo "dev.sh: $*" >&2; }

# Installs Debian packages that are missing (as root with apt-get), or says how and stops.
#   need_packages "why" command:package ...
need_packages() {
  local why=$1; shift
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing ${missing[*]} ($why) with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    say "missing: ${missing[*]} ($why). Install with:"
    say "    sudo apt-get install -y ${missing[*]}      (Debian/Ubuntu)"
    exit 1
  fi
}

# Pingora's zlib-ng dependency needs cmake to build; a fresh machine lacks it.
need_build_tools() {
  command -v cargo >/dev/null || { say "cargo is missing: install Rust from https://rustup.rs"; exit 1; }
  need_packages "Pingora's zlib-ng builds with cmake" cmake:cmake
}

cmd="${1:-}"
case "$cmd" in
  run)
    need_build_tools
    config="${2:-}"
    if [ -z "$config" ]; then
      if command -v ollama >/dev/null; then config=conf/sidecar.yaml; else
        config=conf/demo.yaml
        say "no \`ollama\` on PATH: using $config (two supervised mock instances)"
      fi
    fi
    cargo build --release --bins
    say "try: curl http://127.0.0.1:11434/api/chat -d '{\"model\":\"llama3.2\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"
    exec target/release/ollama-sidecar --config "$config"
    ;;
  test)
    need_build_tools
    # tests/redis.rs starts its own redis-server on a loopback port.
    need_packages "tests/redis.rs runs a real Redis" redis-server:redis-server
    need_packages "tests/status_page.rs drives headless Chromium" chromium:chromium
    cargo test --workspace --all-targets
    tests/clients/run.sh
    ;;
  *)
    echo "usage: ./dev.sh run [CONFIG] | ./dev.sh test" >&2
    exit 2
    ;;
esac
