"""Math answer verification: a table of tricky answers through the data_source registry,
math-verify's own time limit, and the reward pool's process-level limit."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("math_verify")

from asyncrl.rewards import RewardPool, overlong_penalty  # noqa: E402
from asyncrl.tasks import find_verifier, verify  # noqa: E402
from asyncrl.tasks import mathverify  # noqa: E402
from asyncrl.tasks.mathverify import last_boxed  # noqa: E402

CASES = [  # (response, ground truth, reward)
    (r"so the answer is $\boxed{\frac{1}{2}}$", r"\frac12", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{1/2}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    (r"\boxed{[1,2)}", "[1,2)", 1.0),
    (r"\boxed{(1,2]}", "[1,2)", 0.0),
    (r"\boxed{5\text{ cm}}", "5", 1.0),  # units
    (r"\boxed{90^\circ}", "90", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{034}", "34", 1.0),  # AIME answers are written with leading zeros
    (r"first \boxed{3}, on reflection \boxed{4}", "4", 1.0),  # multiple boxes: the last one counts
    (r"first \boxed{3}, on reflection \boxed{4}", "3", 0.0),
    ("Answer: 7", "7", 1.0),  # DAPO's "Answer:" line, no box
    ("I do not know.", "4", 0.0),  # no answer
    ("", "4", 0.0),
    (r"\boxed{3", "3", 0.0),  # cut off inside the box: the last box is unbalanced
    (r"\boxed{\frac{1}{3}}", "0.33", 0.0),
]


@pytest.mark.parametrize("response,truth,reward", CASES)
def test_math_answers(response, truth, reward):
    assert verify("math_dapo", response, truth) == reward


@pytest.mark.parametrize("source", ["aime24", "AIME2025", "math-ai/aime25", "HuggingFaceH4/MATH-500", "minerva",
                                    "olympiadbench", "OlympiadBench", "math_dapo", "BytedTsinghua-SIA/DAPO-Math-17k"])
def test_benchmark_sources_use_math_verify(source):
    assert find_verifier(source) is mathverify.math_score


def test_exact_match_and_builtin_task():
    assert verify("exact_match", r"so \boxed{Paris}", "Paris") == 1.0
    assert verify("exact_match", "paris", "Paris") == 0.0
    assert verify("asyncrl/arith", "1+2+3+0=6#6", "6") == 1.0


def test_unknown_source_error_names_it_and_the_fix():
    with pytest.raises(KeyError, match=r"no verifier for data_source 'gsm-hard-xyz'.*containing one of.*aime"):
        verify("gsm-hard-xyz", r"\boxed{1}", "1")


def test_last_boxed():
    assert last_boxed(r"a \boxed{\frac{1}{2}} b \fbox{x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed 5.") == "5"
    assert last_boxed("none") is None


def test_math_verify_timeout(monkeypatch):
    """A tower of powers makes sympy compute forever; math-verify's limit cuts it off."""
    monkeypatch.setattr(mathverify, "TIMEOUT_S", 1)
    t0 = time.monotonic()
    assert verify("aime24", r"\boxed{9^{9^{9^{9}}}}", "1") == 0.0
    assert time.monotonic() - t0 < 10


def sleepy_verifier(data_source: str, response: str, ground_truth: str) -> float:
    """Stands for a verifier stuck where no signal reaches it (module level: picklable)."""
    if response == "hang":
        time.sleep(60)
    return 1.0 if response == ground_truth else 0.0


def test_reward_pool_bounds_a_stuck_verifier():
    pool = RewardPool(processes=1, timeout_s=2.0, fn=sleepy_verifier)
    try:
        t0 = time.monotonic()
        got = pool.score([("x", "a", "a"), ("x", "hang", "a"), ("x", "b", "b"), ("x", "c", "d")])
        assert got == [1.0, 0.0, 1.0, 0.0]
        assert pool.timeouts == 1 and time.monotonic() - t0 < 30
        assert pool.score([("x", "e", "e")]) == [1.0]  # the replaced pool keeps working
    finally:
        pool.close()


def test_overlong_penalty():
    assert overlong_penalty(100, max_tokens=128, buffer_len=0, factor=1.0) == 0.0
    assert overlong_penalty(96, max_tokens=128, buffer_len=32, factor=1.0) == 0.0
    assert overlong_penalty(112, max_tokens=128, buffer_len=32, factor=1.0) == pytest.approx(-0.5)
    assert overlong_penalty(128, max_tokens=128, buffer_len=32, factor=0.5) == pytest.approx(-0.5)
    pool = RewardPool(0, overlong_buffer_len=32)
    items = [("asyncrl/arith", "#6", "6")] * 2
    assert pool.rewards(items, [112, 10], 128, train=True) == pytest.approx([0.5, 1.0])
    assert pool.rewards(items, [112, 10], 128, train=False) == [1.0, 1.0]
