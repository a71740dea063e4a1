#!/usr/bin/env bash
# Runs every performance target of docs/BENCHMARKS.md RUNS times (default 3), each on a fresh
# network the loadtest starts itself (release binaries, free loopback ports), appending one JSON
# line per run to $OUT, then writes the HTML report beside it.
#
#   scripts/benchmarks.sh                 # all targets, 3 runs each (about 9 minutes on 2 cores)
#   RUNS=1 scripts/benchmarks.sh sse      # one target, once
#
# 10,000 streams need a little over 10,000 file descriptors in the proxy (one per app
# connection; they share one broker stream) and as many in the loadtest: the script raises the
# soft limit to the hard one, and warns if that is too low; the run reports how many opened.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
OUT=${OUT:-target/benchmarks/runs.jsonl}
REPORT=${REPORT:-target/benchmarks/report.html}
mkdir -p "$(dirname "$OUT")" "$(dirname "$REPORT")"

cargo build --release -j2 --workspace --bins
LT=target/release/photon-loadtest

ulimit -n "$(ulimit -Hn)"

run() { # name, then the loadtest's arguments
  local name=$1; shift
  for i in $(seq "$RUNS"); do
    echo "== $name (run $i of $RUNS): photon-loadtest run $*" >&2
    "$LT" run -q "$@" --out "$OUT" > /dev/null
  done
}

want() { [ $# -eq 0 ] || [[ " $* " == *" $TARGET "* ]]; }

for TARGET in create roundtrip1 roundtrip64 roundtrip_sse large sse waiters streams expiry fanout soak; do
  want "$@" || continue
  case $TARGET in
    create)      run create create -c 64 -n 100000 -d 10s ;;
    roundtrip1)  run roundtrip1 roundtrip -c 1 -n 10000 -d 10s ;;
    roundtrip64) run roundtrip64 roundtrip -c 64 -n 100000 -d 10s ;;
    roundtrip_sse) run roundtrip_sse roundtrip --via sse -c 1 -n 10000 -d 10s ;;
    large)       run large large -c 1 -n 300 -d 20s
                 run large10 large -c 1 -n 30 -d 20s --body-bytes 10485760 ;;
    sse)         run sse sse -c 50 -n 4000 -d 20s ;;
    waiters)     run waiters waiters -c 1000 -n 5 -d 60s ;;
    streams)
      if [ "$(ulimit -n)" -lt 10500 ]; then
        echo "streams: needs ulimit -n ≥ 10500 (have $(ulimit -n)); some streams will fail to open" >&2
      fi
      run streams sse -c 10000 -n 1 -d 60s ;;
    expiry)      run expiry expiry -c 16 -n 50000 --ttl 5s -d 60s ;;
    fanout)      run fanout fanout --recipients 10 -c 8 -n 5000 -d 10s ;;
    soak)        RUNS=1 run soak soak --rate 1000 -d 60s -n 1000000 ;;
  esac
done

"$LT" report "$OUT" -o "$REPORT" --title "Photon load test, $(date -u +%F)"
