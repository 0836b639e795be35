#!/usr/bin/env bash
# Overhead of ollama-sidecar against direct Ollama (the mock) and against nginx, on loopback.
#
#   benches/run.sh                 full run (about 10 minutes on a quiet machine), results into docs/benchmarks.md
#   benches/run.sh --quick         short smoke run (about 2 minutes), into target/bench/quick.md
#   benches/run.sh --criterion     also run the criterion micro-benchmarks and report them
#   benches/run.sh --criterion-only   only the criterion micro-benchmarks (about 4 minutes)
#   benches/run.sh --doc FILE      write the report to FILE instead of docs/benchmarks.md
#   benches/run.sh --features F    build the sidecar with cargo features F (e.g. jemalloc)
#   benches/run.sh -- --reps 5     anything after -- goes to benches/harness/bench.py (see its --help)
#
# Idempotent: installs wrk and nginx with apt when root and missing (else says what to install),
# builds the release binaries, copies them aside (a rebuild during the run changes nothing), picks
# free loopback ports, starts the mock, the sidecar and nginx, stops everything it started (trap),
# and rewrites only the marked results section of the report. Raw results: target/bench/*.json.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
CMDLINE="benches/run.sh${*:+ $*}"

quick=0
criterion=0
only_criterion=0
doc=docs/benchmarks.md
features=
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --criterion) criterion=1 ;;
        --criterion-only) criterion=1; only_criterion=1 ;;
        --doc) doc=$2; shift ;;
        --features) features=$2; shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# A build with other features is a comparison, not the reference figures.
if [ -n "$features" ] && [ "$doc" = docs/benchmarks.md ]; then
    doc="target/bench/features-${features//[^a-zA-Z0-9_-]/_}.md"
fi

missing=()
if [ $only_criterion = 0 ]; then
    command -v wrk >/dev/null || missing+=(wrk)
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
fi
command -v cmake >/dev/null || missing+=(cmake)   # pingora's zlib-ng build needs it
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "missing: ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi
export PATH="$PATH:/usr/sbin"

# 10,000 queued requests hold 10,000 client sockets and as many in the sidecar.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt 12000 ]; then
    echo "warning: ulimit -n is $(ulimit -n); the 10,000-request queue test needs about 11,000" >&2
fi

if [ $only_criterion = 0 ]; then
    echo "building release binaries"
    cargo build --release --bins --example pingora_floor --quiet ${features:+--features "$features"}
    mkdir -p target/bench
    work=$(mktemp -d -t ollama-sidecar-bench-run.XXXXXX)
    cp target/release/ollama-sidecar target/release/mock-ollama target/release/examples/pingora_floor "$work/"

    bench_pid=
    cleanup() {
        # bench.py stops what it started; this is the backstop if it was killed outright.
        if [ -n "$bench_pid" ] && kill -0 "$bench_pid" 2>/dev/null; then
            kill -TERM "$bench_pid" 2>/dev/null || true
            sleep 2
        fi
        if [ -f "$work/pids" ]; then
            while read -r pid; do
                kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
            done < "$work/pids"
        fi
        rm -rf "$work"
    }
    trap cleanup EXIT
    trap 'exit 130' INT TERM

    stamp=$(date -u +%Y%m%dT%H%M%SZ)
    json="target/bench/results-$stamp.json"
    args=(--bin-dir "$work" --pidfile "$work/pids" --json "$json" --command "$CMDLINE")
    if [ $quick = 1 ]; then
        args+=(--reps 1 --duration 3 --c1-duration 2 --stream-reps 10 --idle-streams 200
               --queued 1000 --reject-duration 2 --max-wait 30)
        [ "$doc" = docs/benchmarks.md ] && doc=target/bench/quick.md
    fi
    uptime
    python3 benches/harness/bench.py "${args[@]}" "${extra[@]}" &
    bench_pid=$!
    wait "$bench_pid"
    bench_pid=
    python3 benches/harness/report.py --json "$json" --doc "$doc"
    echo "wrote $doc (raw: $json)"
fi

if [ $criterion = 1 ]; then
    mkdir -p target/bench
    crit_args=()
    loads=
    for b in admission tap parse; do
        if grep -q "^name = \"$b\"" Cargo.toml && [ -f "benches/$b.rs" ]; then
            echo "cargo bench --bench $b"
            loads="$loads \`$b\`: $(uptime | sed 's/.*load average: //');"
            cargo bench --bench "$b" 2>&1 | tee "target/bench/criterion-$b.log"
            crit_args+=(--criterion-log "$b=target/bench/criterion-$b.log")
        fi
    done
    if [ ${#crit_args[@]} -gt 0 ]; then
        python3 benches/harness/report.py --doc "$doc" "${crit_args[@]}" \
            --criterion-header "Run $(date -u '+%Y-%m-%d %H:%M UTC') by \`$CMDLINE\`; load average before each:$loads"
    fi
fi
