"""`python -m benchmarks.auth_timing`: does the time to refuse a wrong API key say anything about the keys?

service/api_keys.py compares the SHA-256 digest of what a caller presents with every key's digest, with no early
exit, so the time should not depend on how long the wrong key is, nor on how much of a real key it shares. This
measures `ApiKeys.authenticate` in this process for a right key, wrong keys of the right length (differing in the
first or the last character) and of other lengths, alternating them in rounds (this machine is noisy), and prints
each one's median time per call and its ratio to the right-length wrong key's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from service.api_keys import ApiKeys

KEY = "k" * 8 + "0123456789abcdef0123456789abcdef"  # 40 characters; made up for this measurement


def _per_call_ns(keys: ApiKeys, presented: str, calls: int) -> float:
    authenticate = keys.authenticate
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        authenticate(presented)
    return (time.perf_counter_ns() - t0) / calls


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.auth_timing", description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=10, help="keys in the file (the right one among them)")
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--calls", type=int, default=20_000, help="calls per case in each round")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "keys"
        others = [f"other-{i:04d}-" + "x" * 30 for i in range(args.keys - 1)]
        path.write_text("\n".join([KEY, *others]) + "\n")
        keys = ApiKeys(path)
    cases = {
        "right key": KEY,
        "wrong, right length, first char": "X" + KEY[1:],
        "wrong, right length, last char": KEY[:-1] + "X",
        "wrong, 16 chars": KEY[:16],
        "wrong, 256 chars": KEY + "x" * (256 - len(KEY)),
        "wrong, 1 char": "x",
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, presented in cases.items():
            samples[name].append(_per_call_ns(keys, presented, args.calls))
    base = statistics.median(samples["wrong, right length, last char"])
    print(f"{args.keys} keys, {args.rounds} rounds of {args.calls} calls each, medians:")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"  {name:34s} {median:8.0f} ns/call  {median / base:6.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
