#!/usr/bin/env python3
"""Summarizes `perf script` output (samples with call stacks) of one process.

    perf script -i broker.data | python3 scripts/profile.py

Prints the functions with the most samples of their own (self time), then the inclusive share
of the parts a Photon process is made of: a sample counts for a part when any frame of its
stack matches. Parts overlap (a syscall made by hyper counts for both).
"""
import collections
import re
import sys

PARTS = [
    ("HTTP server (actix-http, actix-web)", ("actix_http::", "actix_web::")),
    ("HTTP client (reqwest, hyper-util)", ("reqwest::", "hyper_util::")),
    ("hyper (client protocol)", ("hyper::proto",)),
    ("syscalls (kernel: sockets, epoll, wake-ups)", ("entry_SYSCALL",)),
    ("page faults", ("exc_page_fault", "asm_exc_page_fault")),
    ("malloc and free", ("malloc", "_int_free", "__libc_free", "cfree", "realloc", "unlink_chunk", "tcache_", "mi_free", "_mi_", "mimalloc::")),
    ("memcpy", ("__memcpy", "__memmove")),
    ("SHA-256", ("sha2::",)),
    ("XChaCha20-Poly1305", ("chacha20::", "poly1305::")),
    ("serde_json", ("serde_json::",)),
    ("base64", ("base64",)),
    ("actix actors (messages, contexts)", ("actix::",)),
    ("URL parsing", ("url::parser",)),
    ("route matching (regex)", ("regex_automata::", "regex::")),
    ("sealing and opening", ("crypto::e2e::",)),
    ("request MAC (session)", ("crypto::session::",)),
]


def stacks(lines):
    """Each sample's frames, innermost first, as symbol names."""
    frames = []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if frames:
                yield frames
            frames = []
        elif line[0] in " \t":
            parts = line.strip().split(" ", 1)
            if len(parts) == 2:
                sym = re.sub(r"\+0x[0-9a-f]+", "", parts[1])
                sym = re.sub(r" \((\[kernel\.kallsyms\]|[^()]*\.so[^()]*|/[^()]*)\)$", "", sym)
                frames.append(sym.removesuffix(" (inlined)"))
        else:
            frames = []
    if frames:
        yield frames


def without_generics(sym):
    """`sym` without generic arguments, so that a part matches the code a frame runs and not a
    type it is generic over (`poll<…RawValue…>` is tokio, not serde_json). A leading
    `<Type as Trait>` is kept: it names the code."""
    out, depth = [], 0
    for i, ch in enumerate(sym):
        # `::<impl Trait for Type>::` names code (kept); `Name<T>` is a generic argument (dropped).
        generic = i > 0 and (sym[i - 1].isalnum() or sym[i - 1] in "_:") and not sym.startswith("impl ", i + 1)
        if ch == "<" and (depth or generic):
            depth += 1
        elif ch == ">" and depth and sym[i - 1] != "-":  # not the arrow of `fn(…) -> T`
            depth -= 1
        elif not depth:
            out.append(ch)
    return "".join(out)


def main():
    samples = list(stacks(sys.stdin))
    n = len(samples)
    if n == 0:
        print("no samples")
        return
    own = collections.Counter(s[0][:110] for s in samples)
    print(f"{n} samples")
    print("\nself time, top 25:")
    for sym, k in own.most_common(25):
        print(f"  {100 * k / n:5.1f} %  {sym}")
    print("\ninclusive, by part:")
    bare = [[without_generics(f) for f in s] for s in samples]
    for name, patterns in PARTS:
        k = sum(1 for s in bare if any(p in f for f in s for p in patterns))
        print(f"  {100 * k / n:5.1f} %  {name}")


if __name__ == "__main__":
    main()
