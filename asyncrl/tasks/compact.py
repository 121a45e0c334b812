"""Compact renderings of number-puzzle problems for the built-in char-level models, and
the search traces the warm-start teaches them.

The built-in model reads characters and has 256 positions, so reasoning-gym's countdown
question ("Using all the numbers 19, 9, 3, create an expression that equals 13. ..."
plus five lines of format instructions, ~400 characters) is rendered as ``19,9,3>13:``
(puzzle24: ``4,7,8,8>24:``). Only the prompt changes: the answer still goes in
reasoning-gym's ``<answer>...</answer>`` tag and is scored by the dataset's own
``score_answer``.

The trace is a small search written out. A *trial* combines the numbers left to right,
one step per number, each step ``running op next=value``; a trial that misses the
target ends in ``|`` and the next one starts; the trial that hits it is followed by its
fully parenthesised expression in the answer tag::

    19+9=28,28-3=25|19-9=10,10+3=13<answer>(19-9)+3</answer>

Why trials rather than the solution alone: the model learns to check its own chain
against the target and to try again, so a sample can recover from a wrong first guess
within its token budget, and RL has something to improve beyond the first guess (which
chains to try first, and fewer wasted trials). Every problem reasoning-gym generates
for these two datasets has a left-to-right solution (its generator builds the
expression that way before shuffling the numbers), so the solver below always finds one.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

OPS = ("+", "-", "*", "/")
Step = tuple[str, int, int]  # (operator, operand, value after the step)


def compact_prompt(numbers: Sequence[int], target: int) -> str:
    return ",".join(map(str, numbers)) + f">{target}:"


def apply(op: str, a: int, b: int) -> int | None:
    """``a op b`` when it is an integer (exact division only), else None."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b if b and a % b == 0 else None


def chains(numbers: Sequence[int], ops: Sequence[str] = OPS):
    """Every left-to-right chain over all ``numbers``: (first number, [steps])."""
    for order in set(itertools.permutations(numbers)):
        for chosen in itertools.product(ops, repeat=len(numbers) - 1):
            value, steps = order[0], []
            for op, n in zip(chosen, order[1:]):
                value = apply(op, value, n)
                if value is None:
                    break
                steps.append((op, n, value))
            else:
                yield order[0], steps


def solutions(numbers: Sequence[int], target: int, ops: Sequence[str] = OPS) -> list[tuple[int, list[Step]]]:
    """The chains that reach ``target``, those without negative intermediate values first
    (a negative number is one more thing for a tiny model to get right)."""
    hits = sorted((c for c in chains(numbers, ops) if c[1][-1][2] == target), key=lambda c: _key(*c))
    return [c for c in hits if min(s[2] for s in c[1]) >= 0] or hits


def _key(first: int, steps: list[Step]) -> tuple:
    return (first, tuple(steps))  # a total order, so a seeded choice is reproducible


def render_chain(first: int, steps: list[Step]) -> str:
    out, running = [], first
    for op, n, value in steps:
        out.append(f"{running}{op}{n}={value}")
        running = value
    return ",".join(out)


def expression(first: int, steps: list[Step]) -> str:
    """The chain as one expression, every step but the last in parentheses."""
    expr = str(first)
    for i, (op, n, _) in enumerate(steps):
        expr = f"{expr}{op}{n}"
        if i < len(steps) - 1:
            expr = f"({expr})"
    return expr


def random_miss(numbers: Sequence[int], target: int, rng: random.Random, ops: Sequence[str] = OPS,
                attempts: int = 64) -> tuple[int, list[Step]] | None:
    """A uniformly drawn chain (order and operators) that misses ``target`` and never goes
    below zero, as a countdown player's search would not (None if the draws keep failing)."""
    for _ in range(attempts):
        order = rng.sample(list(numbers), len(numbers))
        value, steps = order[0], []
        for n in order[1:]:
            op = rng.choice(ops)
            value = apply(op, value, n)
            if value is None or value < 0:
                break
            steps.append((op, n, value))
        else:
            if value != target:
                return order[0], steps
    return None


def trace(numbers: Sequence[int], target: int, rng: random.Random, max_trials: int = 2,
          ops: Sequence[str] = OPS) -> str | None:
    """A search trace: up to ``max_trials`` missed chains (how many: uniform), then a
    solution chosen at random, then its answer tag. None if there is no solution."""
    sols = solutions(numbers, target, ops)
    if not sols:
        return None
    first, steps = rng.choice(sols)
    tried = [random_miss(numbers, target, rng, ops) for _ in range(rng.randint(0, max_trials))]
    parts = [render_chain(*c) for c in tried if c] + [render_chain(first, steps)]
    return "|".join(parts) + f"<answer>{expression(first, steps)}</answer>"
