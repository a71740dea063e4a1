#!/usr/bin/env bash
# Where the CPU goes while a `waiters` round wakes its waiters: perf samples all CPUs (5 kHz,
# no stacks) and, with DWARF call stacks, one process ($WHO: proxy1, the default, or loadtest),
# during a run of $ROUNDS rounds of $CLIENTS waiters; scripts/wake_window.py keeps only the
# samples from each round's PUT to $WINDOW ms after it. Prints the CPU each process used per
# round in that window, and writes the stack summary of $WHO in it to $OUT/$WHO.txt.
#
#   scripts/wake-profile.sh                      # proxy1, 1,000 waiters, 40 rounds, 25 ms
#   WHO=loadtest WINDOW=15 scripts/wake-profile.sh
#
# Needs perf, root (or kernel.perf_event_paranoid ≤ 0 for system-wide sampling) and release
# binaries. Nothing else should run meanwhile: system-wide samples count every process.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf > /dev/null || { echo "perf is not installed" >&2; exit 1; }
LT=${LT:-target/release/photon-loadtest}
WHO=${WHO:-proxy1}
CLIENTS=${CLIENTS:-1000}
ROUNDS=${ROUNDS:-40}
WINDOW=${WINDOW:-25}
OUT=${OUT:-target/profiles/wake}
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"

"$LT" run -q waiters -c "$CLIENTS" -n "$ROUNDS" > "$OUT/run.txt" 2>&1 &
RUN=$!
until [ "$(pgrep -P "$RUN" -x photon-proxy | wc -l)" -ge 2 ]; do
  kill -0 "$RUN" 2> /dev/null || { cat "$OUT/run.txt" >&2; exit 1; }
  sleep 0.02
done
proxies=($(pgrep -P "$RUN" -x photon-proxy | sort -n))
echo "$(pgrep -P "$RUN" -x photon-broker) ${proxies[0]} ${proxies[1]} $RUN" > "$OUT/pids"
case $WHO in
  proxy1) target=${proxies[0]} ;;
  loadtest) target=$RUN ;;
  *) echo "WHO is proxy1 or loadtest" >&2; exit 2 ;;
esac
perf record -q -a -F 5000 -o "$OUT/all.data" -- sleep 6 2> /dev/null &
perf record -q -F 2000 --call-graph dwarf,16384 -p "$target" -o "$OUT/$WHO.data" -- sleep 6 2> /dev/null &
wait
grep -E '^[a-z0-9]+: ' "$OUT/run.txt" || cat "$OUT/run.txt"
perf script -i "$OUT/all.data" -F pid,time 2> /dev/null > "$OUT/all.txt"
python3 scripts/wake_window.py split "$OUT/pids" "$OUT/all.txt" "$WINDOW"
perf script -i "$OUT/$WHO.data" 2> /dev/null \
  | python3 scripts/wake_window.py filter "$OUT/pids" "$OUT/all.txt" "$WINDOW" \
  | python3 scripts/profile.py > "$OUT/$WHO.txt"
echo "$OUT/$WHO.txt: $(head -1 "$OUT/$WHO.txt") in the windows"
