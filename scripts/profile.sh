#!/usr/bin/env bash
# Profiles one loadtest run: while the scenario runs, perf samples the broker and both proxies
# (2,000 Hz, DWARF call stacks) for $SECS seconds, starting $DELAY seconds in; then
# scripts/profile.py summarizes each process into $OUT/<process>.txt (self time, and the share
# of HTTP stacks, syscalls, malloc, crypto, JSON …). The run's summary goes to $OUT/run.txt.
#
#   scripts/profile.sh create -c 64 -n 60000 -d 30s      # → target/profiles/create/
#   OUT=/tmp/p SECS=6 scripts/profile.sh roundtrip -c 64 -n 60000 -d 30s
#
# Needs perf (Debian: linux-perf) and leave to profile (root, or kernel.perf_event_paranoid ≤ 1),
# and release binaries (cargo build --release -j2 --workspace --bins). The .data files stay in
# $OUT for `perf report -i`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 <scenario> [loadtest options]" >&2; exit 2; }
command -v perf > /dev/null || { echo "perf is not installed" >&2; exit 1; }

LT=${LT:-target/release/photon-loadtest}
OUT=${OUT:-target/profiles/$1}
SECS=${SECS:-4}
DELAY=${DELAY:-3}
mkdir -p "$OUT"

"$LT" run -q "$@" > "$OUT/run.txt" 2>&1 &
RUN=$!
sleep "$DELAY"
# The loadtest starts the broker, then proxy1, then proxy2: their pids come in that order.
names=(broker proxy1 proxy2)
i=0
for pid in $(pgrep -P "$RUN" -x photon-broker) $(pgrep -P "$RUN" -x photon-proxy | sort -n); do
  perf record -q -F 2000 --call-graph dwarf,16384 -o "$OUT/${names[$i]}.data" -p "$pid" -- sleep "$SECS" 2> /dev/null &
  i=$((i + 1))
done
wait_perf() { while pgrep -f "perf record .*-o $OUT/" > /dev/null; do sleep 0.2; done; }
wait_perf
wait "$RUN" || true
for name in "${names[@]}"; do
  [ -f "$OUT/$name.data" ] || continue
  perf script -i "$OUT/$name.data" 2> /dev/null | python3 scripts/profile.py > "$OUT/$name.txt"
  echo "$OUT/$name.txt: $(head -1 "$OUT/$name.txt")"
done
grep -E '^[a-z0-9]+: ' "$OUT/run.txt" || cat "$OUT/run.txt"
