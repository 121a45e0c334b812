"""Evaluation arithmetic as pure functions: mean@k, pass@k, per-source summaries.

pass@k uses the unbiased estimator of Chen et al. (2021, "Evaluating Large Language
Models Trained on Code"): with n samples of which c are correct,
``pass@k = 1 - C(n-c, k) / C(n, k)``. When n == k (what ``asyncrl.eval`` draws) it is
simply "any of the k samples is correct". mean@k is the fraction of correct samples
(the expected accuracy of one sample). A sample is correct when its reward is 1.

From the same k samples per problem, pass@j is also reported for every j in
:func:`pass_ks` (1, 2, 4, 8, ... up to k, and k itself): one evaluation with k = 16 at
T = 1 gives the whole pass@j curve, whose large-j end is where RL's "narrowing" shows
(pass@1 rises while pass@16 can fall below the base model's). pass@1 equals mean@k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (needs k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_ks(k: int) -> list[int]:
    """The j of the reported pass@j: the powers of two up to k, and k."""
    return sorted({1 << i for i in range(k.bit_length()) if 1 << i <= k} | {k})


def mean_at_k(correct: Sequence[bool]) -> float:
    return sum(map(bool, correct)) / len(correct)


def summarize(by_source: Mapping[str, Sequence[Sequence[bool]]], k: int) -> dict:
    """``{source: [[correct per sample] per problem]}`` -> per-source mean@k and pass@j for
    every j in ``pass_ks(k)`` (averaged over problems), and their unweighted average over
    sources. Every problem needs at least k samples."""
    per = {}
    names = [f"mean@{k}", *(f"pass@{j}" for j in pass_ks(k))]
    for source, problems in sorted(by_source.items()):
        per[source] = {"problems": len(problems), f"mean@{k}": sum(mean_at_k(c) for c in problems) / len(problems)}
        for j in pass_ks(k):
            per[source][f"pass@{j}"] = sum(pass_at_k(len(c), sum(map(bool, c)), j) for c in problems) / len(problems)
    avg = {m: sum(v[m] for v in per.values()) / len(per) for m in names} if per else {}
    return {"k": k, "sources": per, "average": avg}


def to_markdown(summary: dict) -> str:
    k = summary["k"]
    lines = [f"| source | problems | mean@{k} | pass@{k} |", "|---|---:|---:|---:|"]
    for source, v in summary["sources"].items():
        lines.append(f"| {source} | {v['problems']} | {100 * v[f'mean@{k}']:.1f} | {100 * v[f'pass@{k}']:.1f} |")
    if summary["average"]:
        a = summary["average"]
        lines.append(f"| **average** | | {100 * a[f'mean@{k}']:.1f} | {100 * a[f'pass@{k}']:.1f} |")
    return "\n".join(lines)


def flat_metrics(summary: dict, prefix: str = "eval") -> dict[str, float]:
    """The summary as flat metric names for metrics.jsonl (eval/<source>/mean@k ...)."""
    out = {f"{prefix}/{m}": v for m, v in summary["average"].items()}
    for source, v in summary["sources"].items():
        out |= {f"{prefix}/{source}/{m}": x for m, x in v.items() if m != "problems"}
    return out
