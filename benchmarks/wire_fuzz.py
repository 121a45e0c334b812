"""Codec fuzz at larger counts: ``PYTHONPATH=. python benchmarks/wire_fuzz.py [N] [SEED]``.

Prints, per receiving side, how many seeded cases of each mutation family were sent
through ``decode_checked``, how many were rejected, under which reasons, and the rate.
Exit code 1 if any invalid case was accepted, any valid one rejected, or anything but a
WireError was raised."""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict

from asyncrl.wire.codec import Limits, WireError, decode_checked
from asyncrl.wire.fuzz import bit_flips, cases, fuzz_limits
from asyncrl.wire.schema import DOWNSTREAM, UPSTREAM


def run(side: str, kinds, n: int, seed: int) -> int:
    limits = fuzz_limits(kinds)
    sent, rejected, reasons = Counter(), Counter(), defaultdict(Counter)
    errors = 0
    t0 = time.perf_counter()
    for c in cases(seed, kinds, limits, n):
        family = c.label  # "frames/..." one row per frame mutation (mask ones included)
        sent[family] += 1
        try:
            decode_checked(c.frames, limits)
            errors += not c.valid
        except WireError as e:
            rejected[family] += 1
            reasons[family][e.reason] += 1
            errors += c.valid
        except Exception:  # noqa: BLE001 - counted as a failure of the checker
            errors += 1
    dt = time.perf_counter() - t0
    print(f"\n{side} side: {n} cases in {dt:.1f}s ({n / dt:,.0f}/s incl. generation), failures: {errors}")
    print(f"{'family':<26}{'sent':>8}{'rejected':>10}  reasons")
    for family in sorted(sent, key=lambda f: -sent[f]):
        print(f"{family:<26}{sent[family]:>8}{rejected[family]:>10}  {dict(reasons[family])}")
    flips, crashes = Counter(), 0
    for frames in bit_flips(seed + 1, kinds, n // 2):
        try:
            decode_checked(frames, Limits(kinds=kinds))
            flips["accepted"] += 1
        except WireError as e:
            flips[e.reason] += 1
        except Exception:  # noqa: BLE001
            crashes += 1
    print(f"bit flips: {n // 2} cases, {dict(flips)}, non-WireError exceptions: {crashes}")
    return errors + crashes


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    bad = sum(run(side, kinds, n, seed) for side, kinds in (("learner", UPSTREAM), ("generator", DOWNSTREAM)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
