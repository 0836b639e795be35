#!/usr/bin/env bash
# The quick start: `./dev.sh run` runs the sidecar, `./dev.sh test` runs every test.
#   ./dev.sh run [CONFIG]   build (release) and run; CONFIG defaults to conf/sidecar.yaml when
#                           `ollama` is installed, else to conf/demo.yaml (supervised mock instances)
#   ./dev.sh test           cargo tests, then the official Python clients through the sidecar
set -euo pipefail
cd "$(dirname "$0")"

say() { echo "dev.sh: $*" >&2; }

# Pingora's zlib-ng dependency needs cmake to build; a fresh machine lacks it.
need_build_tools() {
  command -v cargo >/dev/null || { say "cargo is missing: install Rust from https://rustup.rs"; exit 1; }
  command -v cmake >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing cmake (Pingora's zlib-ng needs it) with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null
  else
    say "cmake is missing; Pingora's zlib-ng dependency needs it to build. Install it with:"
    say "    sudo apt-get install -y cmake      (Debian/Ubuntu)"
    say "    sudo dnf install -y cmake          (Fedora)      brew install cmake   (macOS)"
    exit 1
  fi
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
    cargo test --all-targets
    tests/clients/run.sh
    ;;
  *)
    echo "usage: ./dev.sh run [CONFIG] | ./dev.sh test" >&2
    exit 2
    ;;
esac
