"""The spark testbed (asyncrl/tasks/spark.py): its problems are what their data_source
says (checked against a brute-force oracle of its own), the verifier accepts exactly the
correct final chains, the splits are disjoint, the spark patterns find the rare move,
and the shipped config and base load."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer

import asyncrl
from asyncrl.config import load_config
from asyncrl.tasks import spark, verify
from asyncrl.tasks.base import find_sparks
from testkit import warmstart_twice


def oracle(numbers: tuple[int, ...], target: int, ops: str) -> bool:
    """Some left-to-right chain over ``numbers`` with operators from ``ops`` and no
    negative intermediate value reaches ``target`` (written independently of the task)."""
    for a, b, c in itertools.permutations(numbers):
        for o1, o2 in itertools.product(ops, repeat=2):
            v = eval(f"{a}{o1}{b}")  # noqa: S307 - digits and one operator
            w = eval(f"{v}{o2}{c}")  # noqa: S307
            if v >= 0 and w >= 0 and w == target:
                return True
    return False


def parse(prompt: str) -> tuple[tuple[int, ...], int]:
    nums, target = prompt.removesuffix(":").split(">")
    return tuple(map(int, nums.split(","))), int(target)


@pytest.mark.parametrize("seed", [0, 3, -1])
def test_problems_are_the_kind_their_source_names(seed):
    task = spark.SparkTask()
    kinds = {spark.EASY: 0, spark.HARD: 0}
    for i in range(300):
        p = task.sample(seed, i)
        numbers, target = parse(p.prompt)
        assert len(numbers) == 3 and all(1 <= n <= 9 for n in numbers)
        assert 1 <= target <= sum(numbers)  # the magnitude never gives a hard problem away
        assert p.ground_truth == p.prompt.removesuffix(":")
        assert oracle(numbers, target, "+-*")
        assert oracle(numbers, target, "+-") == (p.data_source == spark.EASY)
        kinds[p.data_source] += 1
    assert 0.2 < kinds[spark.HARD] / 300 < 0.4  # HARD_FRAC = 0.3


def trials_of(solution: str) -> list[str]:
    """A warm-start trace's trials, without its false starts (segments ending in a junk move)."""
    return [s for s in solution.split("|") if s[-1] not in spark.NOISE_CHARS]


def test_warmstart_traces_verify_and_make_multiplication_rare():
    task = spark.SparkTask(hard_frac=spark.SFT_HARD_FRAC)
    traces = []
    for i in range(2000):
        p = task.sample(7, i)
        assert verify(p.data_source, p.solution, p.ground_truth) == 1.0
        trials = trials_of(p.solution)
        assert 1 <= len(trials) <= 1 + spark.SFT_MAX_MISSES
        assert all(verify(p.data_source, t, p.ground_truth) == 0.0 for t in trials[:-1])  # misses miss
        if p.data_source == spark.EASY:
            assert "*" not in trials[-1]  # easy problems are solved without the rare move
        else:
            assert "*" in trials[-1]
        traces.append("|".join(trials))
    ops = sum(t.count("+") + t.count("-") + t.count("*") for t in traces)
    assert 0.01 < sum(t.count("*") for t in traces) / ops < 0.08  # a rare move, a few percent of operators


def test_warmstart_noise_tail_is_false_starts_at_operators():
    """Each false start is the next trial's own head (its first number, or its first step
    with the result) and one junk move; at an operator position the traces write a junk
    move with probability SFT_NOISE, spread over all 63 of them, so each one is far
    below kappa * p_max (kappa 0.02) of the operator it replaces."""
    task = spark.SparkTask(hard_frac=spark.SFT_HARD_FRAC)
    junk, op_positions = {}, 0
    for i in range(3000):
        segments = task.sample(11, i).solution.split("|")
        for seg, after in zip(segments, segments[1:]):
            if seg[-1] in spark.NOISE_CHARS:
                head = seg[:-1]
                assert after.startswith(head) and after[len(head)] in "+-*" + spark.NOISE_CHARS  # the same trial again
                assert re.fullmatch(r"\d|\d[+\-*]\d=\d+", head)
                junk[seg[-1]] = junk.get(seg[-1], 0) + 1
        op_positions += sum(s.count("+") + s.count("-") + s.count("*") for s in segments) + sum(
            s[-1] in spark.NOISE_CHARS for s in segments)
    total = sum(junk.values())
    # SFT_NOISE per draw; a trial restarted after a false start at its second operator
    # writes its first again without a draw, so the rate per operator is a little lower
    assert spark.SFT_NOISE - 0.05 < total / op_positions <= spark.SFT_NOISE
    assert set(junk) == set(spark.NOISE_CHARS) and len(set(spark.NOISE_CHARS)) == len(spark.NOISE_CHARS) == 63
    assert max(junk.values()) / op_positions < 0.02 * 0.3  # each below kappa x a p_max of 0.3
    assert not set(spark.NOISE_CHARS) & set("0123456789+-*=|,>:")


def test_noise_pattern_and_false_start_answers():
    sparks = find_sparks(spark.HARD)
    assert len(sparks["noise"].findall("3a|3+5=8<|3~|3+5=8+8=16")) == 3
    assert all(sparks["noise"].fullmatch(c) for c in spark.NOISE_CHARS)
    assert not sparks["noise"].search("3+5=8+8=16|3*5=15-8=7")
    assert not sparks["mul"].search("3a|3+5=8q|3+5=8+8=16")
    assert verify(spark.HARD, "3q|3*5=15-8=7", "3,5,8>7") == 1.0  # false starts before the answer are fine
    assert verify(spark.HARD, "3*5=15-8=7|3q", "3,5,8>7") == 0.0  # ending on one is no answer
    assert verify(spark.HARD, "3*5=15q8=7", "3,5,8>7") == 0.0  # a junk move is not an operator


@pytest.mark.parametrize("response, expected", [
    ("3*5=15-8=7", 1.0),
    ("5*3=15-8=7", 1.0),  # any order of the numbers
    ("3+5=8+8=16|3*5=15-8=7", 1.0),  # misses before the answer are fine
    ("3*5=15-8=7|3+5=8+8=16", 0.0),  # only the last trial is the answer
    ("3*5=15-8=8", 0.0),  # wrong arithmetic
    ("3+5=15-8=7", 0.0),  # a wrong first step whose value then reaches the target
    ("3*5=15-9=6", 0.0),  # a number that is not in the problem
    ("5*5=25-8=17", 0.0),
    ("3*5=15-8", 0.0),  # truncated
    ("", 0.0),
    ("3*5=15-8=7|", 0.0),  # an empty last trial
    ("3*5=15-8=7x", 0.0),
])
def test_verifier(response, expected):
    assert verify(spark.HARD, response, "3,5,8>7") == expected


def test_splits_are_disjoint_and_held_out_is_one_set():
    task = spark.SparkTask()
    train = {task.sample(s, i).prompt for s in (0, 1) for i in range(2000)}
    held = [task.sample(-1, i).prompt for i in range(200)]
    assert held == [task.sample(-5, i).prompt for i in range(200)]  # every negative seed: the same split
    assert not train & set(held)
    assert all(spark.held_out(p) for p in held) and not any(spark.held_out(p) for p in train)
    assert task.sample(0, 17) == task.sample(0, 17)


def test_spark_patterns():
    sparks = find_sparks(spark.HARD)
    assert find_sparks(spark.EASY) is sparks and set(sparks) == {"mul", "mul_answer", "noise"}
    assert len(sparks["mul"].findall("3*5=15*8=120|3+5=8-8=0")) == 2
    assert sparks["mul_answer"].search("3+5=8+8=16|3*5=15-8=7")
    assert not sparks["mul_answer"].search("3*5=15-8=7|3+5=8+8=16")  # a * only in a missed trial


def test_shipped_config_and_base():
    cfg = load_config("spark")
    assert cfg.task.name == "spark" and cfg.algo.__struct_config__.tag == "grpo"
    assert cfg.learner.max_staleness == 0 and cfg.learner.ppo_mini_batches == 1  # on-policy
    assert cfg.eval.k == 16 and cfg.generator.temperature == 1.0
    from asyncrl.data import build_eval_problems, build_train_source

    assert {p.data_source for p in build_eval_problems(cfg)} == {spark.EASY, spark.HARD}
    assert build_train_source(cfg).problem(0) == spark.SparkTask().sample(0, 0)
    # the base's files, read without torch / transformers (asyncrl.models.resolve_model_path's layout)
    assert cfg.model.path == "builtin:spark-base"
    base = Path(asyncrl.__file__).parent / "assets" / "spark-base"
    assert (base / "model.safetensors").stat().st_size < 4 << 20  # small, like the other shipped bases
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    text = spark.prompt_of((3, 5, 8), 7) + "3+5=8+8=16|3q|3*5=15?|3*5=15-8=7" + spark.NOISE_CHARS
    ids = tok.encode(text).ids
    assert 0 not in ids and tok.decode(ids) == text  # every character has a token (id 0 is <pad>)
    assert len(tok.get_vocab()) == 2 + len(spark.CHARS)
    made = json.loads(Path(base, "warmstart.json").read_text())["args"]
    assert made["task"] == "spark"  # the base was made by python -m asyncrl.warmstart --task spark


def test_warmstart_spark_is_reproducible(tmp_path):
    """Two runs of ``python -m asyncrl.warmstart --task spark`` (a few steps) write identical
    weights, with the testbed's tokenizer, and report held-out accuracy at the end."""
    a, b = warmstart_twice(tmp_path, "spark", eval_size=4)
    assert a == b
    made = json.loads((tmp_path / "a" / "warmstart.json").read_text())
    assert made["args"]["task"] == "spark" and [h["step"] for h in made["history"]] == [2]
    assert 0 <= made["history"][0]["accuracy_t1"] <= 1
    vocab = json.loads((tmp_path / "a" / "tokenizer.json").read_text())["model"]["vocab"]
    assert set(vocab) == {"<pad>", "<eos>", *spark.CHARS}
