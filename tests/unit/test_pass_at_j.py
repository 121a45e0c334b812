"""pass@j for every j in {1, 2, 4, ..., k} from the same k samples: the unbiased
estimator against a brute-force float64 enumeration of subsets, and the reported keys
through summarize and the learner's hub_metrics."""

from __future__ import annotations

import random
from itertools import combinations

import pytest

from asyncrl.eval.metrics import flat_metrics, pass_at_k, pass_ks, summarize
from asyncrl.eval.sampling import hub_metrics
from asyncrl.tasks import Problem


def brute_pass(correct: list[bool], j: int) -> float:
    """The fraction of the j-subsets of the samples that hold a correct one (float64)."""
    subsets = list(combinations(range(len(correct)), j))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def test_pass_ks():
    assert pass_ks(1) == [1] and pass_ks(2) == [1, 2] and pass_ks(4) == [1, 2, 4]
    assert pass_ks(6) == [1, 2, 4, 6] and pass_ks(16) == [1, 2, 4, 8, 16] and pass_ks(17) == [1, 2, 4, 8, 16, 17]


@pytest.mark.parametrize("n", range(1, 11))
def test_unbiased_estimator_is_the_subset_average(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for j in range(1, n + 1):
            assert pass_at_k(n, c, j) == pytest.approx(brute_pass(correct, j), rel=1e-12, abs=1e-15)


def test_summarize_reports_every_pass_at_j_against_brute_force():
    rng = random.Random(0)
    k = 8
    by_source = {src: [[rng.random() < p for _ in range(k)] for _ in range(7)]
                 for src, p in (("easy", 0.7), ("hard", 0.1))}
    s = summarize(by_source, k)
    for src, problems in by_source.items():
        got = s["sources"][src]
        assert sorted(m for m in got if m.startswith("pass@")) == ["pass@1", "pass@2", "pass@4", "pass@8"]
        for j in pass_ks(k):
            want = sum(brute_pass(c, j) for c in problems) / len(problems)
            assert got[f"pass@{j}"] == pytest.approx(want, rel=1e-12)
        assert got["pass@1"] == pytest.approx(got["mean@8"], rel=1e-12)  # pass@1 is the mean
        curve = [got[f"pass@{j}"] for j in pass_ks(k)]
        assert curve == sorted(curve)  # more samples never lower pass@j
    for j in pass_ks(k):
        assert s["average"][f"pass@{j}"] == pytest.approx((s["sources"]["easy"][f"pass@{j}"]
                                                           + s["sources"]["hard"][f"pass@{j}"]) / 2)
    flat = flat_metrics(s)
    assert {"eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/pass@8", "eval/hard/pass@2"} <= set(flat)


def test_hub_metrics_gives_the_whole_curve():
    problems = [Problem("p", "1", "a"), Problem("q", "1", "a")]
    results = [(0, [1.0, 0.0, 0.0, 0.0], [3] * 4), (1, [0.0, 0.0, 0.0, 0.0], [3] * 4)]
    m = hub_metrics(problems, results, k=4)
    assert m["eval/pass@1"] == 1 / 8 and m["eval/pass@4"] == 1 / 2
    assert m["eval/pass@2"] == pytest.approx((1 - 3 / 6) / 2)  # 1 - C(3,2)/C(4,2) for the first problem
