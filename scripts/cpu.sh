#!/usr/bin/env bash
# CPU time (user + system, ms) each process of a loadtest run used, read from /proc/<pid>/stat
# every 0.2 s until the run ends (the last reading before each process exits), then the run's
# summary line. Divide by the run's count for CPU per operation.
#
#   scripts/cpu.sh large -c 1 -n 200 -d 30s
#   LT=/tmp/old-bin/photon-loadtest scripts/cpu.sh large -c 1 -n 200 -d 30s   # other binaries
set -uo pipefail
LT=${LT:-$(dirname "$0")/../target/release/photon-loadtest}
OUT=$(mktemp)
"$LT" run -q "$@" > "$OUT" 2>&1 &
RUN=$!
declare -A last
while kill -0 "$RUN" 2>/dev/null; do
  for p in $RUN $(pgrep -P "$RUN"); do
    t=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null) || continue
    last["$p $(cat "/proc/$p/comm" 2>/dev/null)"]=$t
  done
  sleep 0.2
done
ticks=$(getconf CLK_TCK)
for k in "${!last[@]}"; do echo "$k $(( ${last[$k]} * 1000 / ticks )) ms"; done | sort
grep -E '^[a-z0-9]+: ' "$OUT"
rm -f "$OUT"
