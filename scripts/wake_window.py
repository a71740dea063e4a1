#!/usr/bin/env python3
"""Cuts a `waiters` run's perf samples down to the wake-ups: the windows from each round's PUT
to WINDOW_MS after it. In that scenario the worker's proxy (proxy2) serves nothing but the PUT,
so its first sample after a pause marks the start of a round's wake-up.

  wake_window.py split PIDS_FILE ALL_CPUS_SCRIPT WINDOW_MS
      CPU per process and round within the windows, from a system-wide `perf script -F pid,time`.
  wake_window.py filter PIDS_FILE ALL_CPUS_SCRIPT WINDOW_MS < STACKS_SCRIPT > IN_WINDOWS
      keeps the samples of a `perf script` with call stacks that fall in the windows.

PIDS_FILE holds the pids of broker, proxy1, proxy2 and the loadtest, in that order.
"""
import bisect
import collections
import re
import sys

# Rounds are about 60 ms apart; a PUT is served within a millisecond or two.
PAUSE_S = 0.03
BEFORE_S = 0.001


def samples(path):
    for line in open(path):
        parts = line.split()
        if len(parts) >= 2:
            yield parts[0], float(parts[1].rstrip(":"))


def round_starts(path, proxy2):
    starts, last = [], -1.0
    for pid, t in samples(path):
        if pid == proxy2:
            if t - last > PAUSE_S:
                starts.append(t)
            last = t
    return starts


def in_window(starts, t, window):
    i = bisect.bisect_right(starts, t + BEFORE_S) - 1
    return i >= 0 and starts[i] - BEFORE_S <= t <= starts[i] + window


def split(pids, path, window, hz):
    names = dict(zip(pids, ["broker", "proxy1", "proxy2", "loadtest"]))
    names["0"] = "idle"
    starts = round_starts(path, pids[2])
    counts = collections.Counter()
    for pid, t in samples(path):
        if in_window(starts, t, window):
            counts[names.get(pid, "other")] += 1
    n = max(len(starts), 1)
    span = (window + BEFORE_S) * 1e3
    print(f"{len(starts)} rounds; CPU per round in the {span:.0f} ms from each PUT (both cores: {2 * span:.0f} ms):")
    for name, c in counts.most_common():
        print(f"  {name:9s} {c / n / hz * 1e3:6.1f} ms")


def filter_stacks(pids, path, window):
    starts = round_starts(path, pids[2])
    header = re.compile(r"^\S.*?\s(\d+\.\d+):")
    keep, kept, total = False, 0, 0
    for line in sys.stdin:
        if line.strip() and not line[0].isspace():
            m = header.search(line)
            if m:
                total += 1
                keep = in_window(starts, float(m.group(1)), window)
                kept += keep
        if keep:
            sys.stdout.write(line)
    sys.stderr.write(f"{len(starts)} rounds: {kept} of {total} samples in the windows\n")


def main():
    mode, pids_file, path, window_ms = sys.argv[1:5]
    pids = open(pids_file).read().split()
    window = float(window_ms) / 1e3
    if mode == "split":
        split(pids, path, window, hz=float(sys.argv[5]) if len(sys.argv) > 5 else 5000)
    else:
        filter_stacks(pids, path, window)


if __name__ == "__main__":
    main()
