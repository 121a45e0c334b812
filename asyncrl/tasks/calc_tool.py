"""The calculator tool-use task: arithmetic that is hard to do in the head of a tiny model
and easy with a calculator, the CPU demo of multi-turn episodes.

Prompt ``"412*374+951="`` (the first two numbers multiplied, the rest added). The model
may call the calculator by writing an expression between ``[`` and ``]``; ``]`` is the
stop token of its turn, the environment runs the expression and appends ``=`` and the
value (``=?`` when the calculator refuses it), and the model continues. The answer is
written after ``#``. A solved episode, model tokens and *environment tokens* marked::

    [412*374+951]   =155039   #155039<eos>
    ^ model turn 1  ^ env     ^ model turn 2

Only the answer after the last ``#`` is scored (exact integer match); the observation
itself never contains ``#``, so the environment cannot answer for the model.

A **well-formed tool call** is a call whose text between the delimiters the calculator
accepts: it parses as arithmetic and evaluates to an integer. ``[412*374+]``
(malformed: a dangling operator) gets ``=?``. :func:`call_stats` measures, per episode,
the calls made and how many were well formed.

The vocabulary (:data:`CHARS`) holds the digits, the operators and the five markers, so
the character-level tokenizer (asyncrl/tasks/tokenizer.py) gives every marker one token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from asyncrl.tasks.base import Problem, register_sparks, register_verifier

DATA_SOURCE = "asyncrl/calc_tool"
OPEN, CLOSE, RESULT, ANSWER, REFUSED = "[", "]", "=", "#", "?"
CHARS = "0123456789+-*()" + OPEN + CLOSE + RESULT + ANSWER + REFUSED


def terms_of(prompt: str) -> list[int]:
    """``"412*374+951="`` -> [412, 374, 951]."""
    head, *rest = prompt.removesuffix(RESULT).split("+")
    return [int(x) for x in head.split("*")] + [int(x) for x in rest]


def value_of(terms: list[int]) -> int:
    return terms[0] * terms[1] + sum(terms[2:])


def expression(terms: list[int]) -> str:
    return f"{terms[0]}*{terms[1]}" + "".join(f"+{t}" for t in terms[2:])


def extract_answer(response: str) -> str | None:
    """The digits after the last ``#`` (the whole rest of the text), else None."""
    if ANSWER not in response:
        return None
    ans = response.rsplit(ANSWER, 1)[1].strip()
    return ans if ans.isdigit() else None


def score(response: str, ground_truth: str) -> float:
    return 1.0 if extract_answer(response) == ground_truth else 0.0


register_verifier(DATA_SOURCE, score)
# In the model's own tokens (sparks see model tokens only): a call opened, and a call
# shaped like the one that solves the problem (digits, one '*', '+' terms, closed).
register_sparks(DATA_SOURCE, {"tool_call": r"\[", "product_call": r"\[\d+\*\d+(\+\d+)*\]"})


def call_text(turn: str) -> str | None:
    """The expression of the tool call a model turn ends with (``...[412*374+951]`` ->
    ``412*374+951``), or None when the turn does not end with a call."""
    if not turn.endswith(CLOSE) or OPEN not in turn:
        return None
    return turn[turn.rindex(OPEN) + 1 : -1]


def observation(result: int | None) -> str:
    """What the environment appends after a call: ``=value``, or ``=?`` when refused."""
    return RESULT + (REFUSED if result is None else str(result))


@dataclass(frozen=True)
class CallStats:
    """Per episode: tool calls made, and how many of them were well formed."""

    calls: int
    well_formed: int


def call_stats(observations: list[str]) -> CallStats:
    """From the observations an episode received (one per call, in order)."""
    return CallStats(len(observations), sum(o != observation(None) for o in observations))


class CalcToolTask:
    """``terms`` numbers of ``digits`` digits: the first two multiplied, the rest added."""

    data_source = DATA_SOURCE

    def __init__(self, terms: int = 3, digits: int = 3) -> None:
        if terms < 2 or digits < 1:
            raise ValueError(f"calc_tool task needs terms >= 2 and digits >= 1, got {terms=} {digits=}")
        self.terms, self.digits = terms, digits

    def sample(self, seed: int, index: int) -> Problem:
        rng = random.Random(f"calc/{seed}/{index}")  # str seeds hash deterministically (sha512)
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        terms = [rng.randint(lo, hi) for _ in range(self.terms)]
        return Problem(prompt=expression(terms) + RESULT, ground_truth=str(value_of(terms)), data_source=DATA_SOURCE)


# ---------------------------------------------------------------- warm-start traces
# A trace is the response as (text, trained) segments: the model's turns are trained on,
# the environment's observations are given (masked out of the SFT loss, as they are
# masked out of the RL loss).
Segments = list[tuple[str, bool]]
# How the warm-start traces behave, by share: answer directly (a guess from the leading
# digits, almost always wrong), call the calculator well and copy its value, or make a
# malformed call (refused), then guess.
TRACE_MIX = {"direct": 0.5, "tool": 0.3, "malformed": 0.2}


def guess(terms: list[int], rng: random.Random) -> str:
    """A direct answer: right leading digits, the rest made up (as a tiny model would)."""
    true = str(value_of(terms))
    keep = rng.randint(1, 2)
    return true[:keep] + "".join(rng.choice("0123456789") for _ in true[keep:])


def malformed_call(terms: list[int], rng: random.Random) -> str:
    """The right expression with one defect that makes it a syntax error (so any arithmetic
    parser refuses it): a dangling operator, a leading one, or an unmatched parenthesis."""
    expr = expression(terms)
    kind = rng.choice(("dangle", "lead", "paren"))
    if kind == "dangle":
        return expr + rng.choice("*+")
    if kind == "lead":
        return "*" + expr
    return "(" + expr if rng.random() < 0.5 else expr + ")"


def trace(terms: list[int], rng: random.Random, mix: dict[str, float] = TRACE_MIX) -> Segments:
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    if kind == "direct":
        return [(ANSWER + guess(terms, rng), True)]
    if kind == "tool":
        value = str(value_of(terms))
        return [(OPEN + expression(terms) + CLOSE, True), (observation(int(value)), False), (ANSWER + value, True)]
    return [(OPEN + malformed_call(terms, rng) + CLOSE, True), (observation(None), False),
            (ANSWER + guess(terms, rng), True)]
