"""Multi-term column addition with a written chain of thought and an exact verifier.

Prompt ``"417+385+296="``; reference response, one column per step from the units
up, each step ``digits + carry-in = column sum``, then ``#`` and the answer::

    7+5+6+0=18;1+8+9+1=19;4+3+2+1=10#1098

Three terms make it harder than the two-term addition a single-file GRPO loop
solves in minutes: each column sum can reach 29 and carries can be 2, and the
answer must be read back from the units digits of every column in reverse.
"""

from __future__ import annotations

import random

from asyncrl.tasks.base import Problem, register_verifier

DATA_SOURCE = "asyncrl/arith"


def solve(terms: list[int], digits: int) -> str:
    steps, carry, out = [], 0, []
    for col in range(digits):
        ds = [(t // 10**col) % 10 for t in terms]
        s = sum(ds) + carry
        steps.append("+".join(map(str, ds)) + f"+{carry}={s}")
        out.append(s % 10)
        carry = s // 10
    answer = (str(carry) if carry else "") + "".join(map(str, reversed(out)))
    return ";".join(steps) + "#" + str(int(answer))


def extract_answer(response: str) -> str | None:
    if "#" not in response:
        return None
    ans = response.rsplit("#", 1)[1].strip()
    return ans if ans.isdigit() else None


def score(response: str, ground_truth: str) -> float:
    return 1.0 if extract_answer(response) == ground_truth else 0.0


register_verifier(DATA_SOURCE, score)


class ArithTask:
    data_source = DATA_SOURCE

    def __init__(self, terms: int = 3, digits: int = 3) -> None:
        if terms < 2 or digits < 1:
            raise ValueError(f"arith task needs terms >= 2 and digits >= 1, got {terms=} {digits=}")
        self.terms, self.digits = terms, digits

    def sample(self, seed: int, index: int) -> Problem:
        rng = random.Random(f"{seed}/{index}")  # str seeds hash deterministically (sha512)
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        terms = [rng.randint(lo, hi) for _ in range(self.terms)]
        return Problem(
            prompt="+".join(map(str, terms)) + "=",
            ground_truth=str(sum(terms)),
            data_source=DATA_SOURCE,
            solution=solve(terms, self.digits),
        )
