#!/usr/bin/env bash
# The per-request cost of limits counted in Redis (`shared_state`) against local limits, and the
# limit error across two sidecars sharing one Redis; rewrites the "Shared limits" section of
# docs/benchmarks.md (between its markers). About 3 minutes on a quiet machine.
#
#   benches/shared_limits.sh                  full run
#   benches/shared_limits.sh --doc FILE       write the section into FILE instead
#   benches/shared_limits.sh -- --reps 5      after --: knobs of benches/harness/shared_limits.py
set -euo pipefail
cd "$(dirname "$0")/.."
CMDLINE="benches/shared_limits.sh${*:+ $*}"
doc=docs/benchmarks.md
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --doc) doc=$2; shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v cmake >/dev/null || missing+=(cmake)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "missing: ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

echo "building release binaries"
cargo build --release --bins --quiet
work=$(mktemp -d -t ollama-sidecar-shared-limits.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp target/release/ollama-sidecar target/release/mock-ollama "$work/"
python3 benches/harness/shared_limits.py --bin-dir "$work" --doc "$doc" --cmdline "$CMDLINE" "${extra[@]}"
