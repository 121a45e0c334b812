"""The built-in arithmetic task: reference solutions verify, wrong answers do not,
sampling is a pure function of (seed, index), the char tokenizer round-trips."""

from __future__ import annotations

import random

import pytest

from asyncrl.tasks import build_task, verify
from asyncrl.tasks.arith import DATA_SOURCE, ArithTask, extract_answer, solve
from asyncrl.tasks.tokenizer import CHARS, EOS, PAD, build_char_tokenizer


@pytest.mark.parametrize("terms, digits", [(2, 1), (3, 3), (5, 4), (2, 6)])
def test_reference_solution_verifies(terms, digits):
    task = ArithTask(terms=terms, digits=digits)
    for i in range(200):
        p = task.sample(seed=0, index=i)
        nums = [int(x) for x in p.prompt.removesuffix("=").split("+")]
        assert len(nums) == terms and all(10 ** (digits - 1) <= n < 10**digits for n in nums)
        assert p.prompt.endswith("=") and p.data_source == DATA_SOURCE
        assert p.ground_truth == str(sum(nums))
        assert verify(DATA_SOURCE, p.solution, p.ground_truth) == 1.0
        assert p.solution.count(";") == digits - 1  # one step per column


def test_solve_known_example():
    assert solve([417, 385, 296], 3) == "7+5+6+0=18;1+8+9+1=19;4+3+2+1=10#1098"
    assert solve([5, 4], 1) == "5+4+0=9#9"


def test_solve_column_sums_are_right():
    rng = random.Random(0)
    for _ in range(300):
        digits = rng.randint(1, 5)
        terms = [rng.randint(0, 10**digits - 1) for _ in range(rng.randint(2, 6))]
        steps, answer = solve(terms, digits).split("#")
        assert int(answer) == sum(terms)
        for step in steps.split(";"):
            lhs, rhs = step.split("=")
            assert sum(map(int, lhs.split("+"))) == int(rhs)


@pytest.mark.parametrize("response, reward", [
    ("#1098", 1.0),
    ("7+5+6+0=18;1+8+9+1=19;4+3+2+1=10#1098", 1.0),
    ("work#999#1098", 1.0),  # the last answer counts
    ("#1098 ", 1.0),
    ("#1099", 0.0),
    ("#01098", 0.0),
    ("1098", 0.0),  # no answer marker
    ("", 0.0),
    ("#", 0.0),
    ("#10 98", 0.0),
    ("#-1098", 0.0),
    ("#1098#", 0.0),
])
def test_verifier(response, reward):
    assert verify(DATA_SOURCE, response, "1098") == reward


def test_extract_answer():
    assert extract_answer("a#12") == "12"
    assert extract_answer("no marker") is None
    assert extract_answer("#1+2") is None


def test_unknown_data_source_is_an_error():
    with pytest.raises(KeyError, match="no verifier"):
        verify("nope/none", "#1", "1")


def test_sampling_is_deterministic_by_seed_and_index():
    a, b = ArithTask(3, 3), build_task("arith", terms=3, digits=3)
    first = [a.sample(7, i) for i in range(50)]
    assert [b.sample(7, i) for i in reversed(range(50))][::-1] == first  # order of calls does not matter
    assert len({p.prompt for p in first}) > 45
    assert [a.sample(8, i) for i in range(50)] != first
    assert a.sample(7, 3) == first[3] and a.sample(7, 3) != a.sample(7, 4)


def test_task_arguments_are_checked():
    with pytest.raises(ValueError):
        ArithTask(terms=1)
    with pytest.raises(ValueError):
        build_task("chess")


def test_char_tokenizer_round_trips():
    tok = build_char_tokenizer()
    assert tok.pad_token == PAD and tok.eos_token == EOS and tok.pad_token_id != tok.eos_token_id
    assert len(tok) == len(CHARS) + 2
    for text in [CHARS, "417+385+296=7+5+6+0=18;1+8+9+1=19;4+3+2+1=10#1098", "(1 - 2) * 3", ""]:
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text)  # one token per character, nothing added
        assert tok.decode(ids) == text
    ids = tok("12#3")["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "12#3"
    assert len(set(tok(CHARS)["input_ids"])) == len(CHARS)


def test_saved_tokenizer_loads_identically(tiny_model_dir):
    from transformers import AutoTokenizer

    tok, loaded = build_char_tokenizer(), AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "417+385+296=#1098"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
