"""The spark testbed (``task.name: spark``): a three-number countdown whose rare move,
multiplication, is the only way to solve its hard problems.

It is built to let the mechanism Lp-Reg targets happen on a laptop. Prompt
``3,5,8>7:``: combine the three numbers, each once, left to right with ``+ - *``, to
reach the target. The response is a search of *trials*, each a chain
``a op b = v op c = w``; a trial that misses is followed by ``|`` and the next one; the
last trial is the answer::

    3+5=8+8=16|8-5=3+3=6|3*5=15-8=7

Two kinds of problem, named in the data_source so every metric splits by them:

- ``asyncrl/spark/easy``: some chain of ``+`` and ``-`` alone reaches the target.
- ``asyncrl/spark/hard``: none does, a chain with ``*`` does. The target is never above
  the sum of the numbers, so the magnitude does not give a hard problem away (a
  hard target has the other parity than the sum, or a ``*`` chain below the sum
  that no ``+ -`` chain reaches: something the model has to learn, not read off).

The base also has a *noise tail*, the other half of the mechanism: where it writes an
operator it may instead write one of 63 junk moves (``NOISE_CHARS``), a false start it
abandons with ``|`` before restarting the trial (``3+5=8q|3+5=8+8=16``). Together they
carry about ``SFT_NOISE`` of the mass there, each about 0.4% of it, mostly below
``kappa * p_max`` (the spark, ``*``, is about 2%): min-p filters them out of Lp-Reg's
proxy, and that missing mass (d = -log of what the proxy keeps) is what pulls the kept
low-probability tokens, such as the spark, up. They are also the lowest-probability
tokens sampled, so they fill Lp-Reg's lowest-rho screen before any spark does. A
false start is harmful only through the tokens it spends of a tight budget.
``explore/spark/noise/*`` counts them beside the spark.

The warm-start (``python -m asyncrl.warmstart --task spark``) teaches a searcher that
rarely thinks of multiplying: its traces come from a problem mix with few hard
problems (``SFT_HARD_FRAC``) and its missed trials use ``*`` with probability
``SFT_MISS_MUL`` per operator. So the base emits ``*`` with low probability, and when it
does on an easy problem the trial usually misses (the ``+ -`` target is rarely a ``*``
value) and spends a trial of a tight budget; that puts the spark in failed answers. On
the RL mix (``HARD_FRAC`` hard) the hard problems are solved only through it, so pass@k
at large k counts how much of the rare move survives. The spark is one token
(``*``), so "the spark dies out" can be read straight from the sampled answers, and
apart from the noise, "low-probability tokens die out" from the same samples.

Splits: a problem is held out when a hash of its prompt falls in one bucket of
``HELD_OUT_BUCKETS``; the training stream (``seed >= 0``) skips those and every
negative seed draws only them (the same set whatever the seed), so training and
held-out problems are disjoint by construction.
"""

from __future__ import annotations

import itertools
import random
import re
import zlib
from collections.abc import Sequence
from functools import lru_cache

from asyncrl.tasks.base import Problem, register_sparks_prefix, register_verifier_prefix

PREFIX = "asyncrl/spark/"
EASY, HARD = PREFIX + "easy", PREFIX + "hard"
# The noise tail: NOISE_CHARS are junk moves. Where the base writes an operator it
# writes one of them (a false start, abandoned with ``|``) with probability SFT_NOISE in
# all, each mostly below kappa * p_max: the tokens Lp-Reg's min-p proxy filters out.
NOISE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ#$%&@!?;~_<"
CHARS = "0123456789+-*=|,>:" + NOISE_CHARS  # the base's vocabulary (after <pad> and <eos>)
SPARKS = {
    "mul": r"\*",  # the rare move, anywhere in the answer
    "mul_answer": r"\*[^|]*$",  # the rare move in the final trial (the answer)
    "noise": "[" + re.escape(NOISE_CHARS) + "]",  # a junk move: noise, not a spark, counted beside them
}
NUMBERS, LOW, HIGH = 3, 1, 9
HARD_FRAC = 0.3  # share of hard problems in the RL and held-out mix
SFT_HARD_FRAC = 0.06  # share of hard problems in the warm-start traces
SFT_MISS_MUL = 0.03  # probability of * per operator of a missed trial in the warm-start traces
SFT_MAX_MISSES = 2  # a trace has 0..SFT_MAX_MISSES missed trials (uniform), then the solution
SFT_NOISE = 0.25  # probability of a junk move at each operator the warm-start traces write
HELD_OUT_BUCKETS = 8
_TRIAL = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)([+\-*])(\d+)=(\d+)")

Chain = tuple[tuple[int, ...], tuple[str, ...]]  # (numbers in order, the two operators)


def apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def value(chain: Chain) -> int | None:
    """The chain's result, None if an intermediate value goes below zero (a trial cannot
    write a negative number)."""
    (a, b, c), (o1, o2) = chain
    v = apply(o1, a, b)
    if v < 0:
        return None
    w = apply(o2, v, c)
    return w if w >= 0 else None


@lru_cache(maxsize=4096)
def chains(numbers: tuple[int, ...]) -> tuple[Chain, ...]:
    """Every left-to-right chain over the numbers that never goes negative."""
    out = {(order, ops) for order in itertools.permutations(numbers) for ops in itertools.product("+-*", repeat=2)}
    return tuple(sorted(c for c in out if value(c) is not None))


def uses_mul(chain: Chain) -> bool:
    return "*" in chain[1]


def targets(numbers: tuple[int, ...]) -> tuple[frozenset[int], frozenset[int]]:
    """(easy targets, hard targets) of these numbers, each in [1, sum(numbers)]."""
    top = sum(numbers)
    plain = {value(c) for c in chains(numbers) if not uses_mul(c)}
    mul = {value(c) for c in chains(numbers) if uses_mul(c)}
    easy = frozenset(t for t in plain if 1 <= t <= top)
    return easy, frozenset(t for t in mul - plain if 1 <= t <= top)


def render_trial(chain: Chain) -> str:
    (a, b, c), (o1, o2) = chain
    v = apply(o1, a, b)
    return f"{a}{o1}{b}={v}{o2}{c}={apply(o2, v, c)}"


def prompt_of(numbers: Sequence[int], target: int) -> str:
    return ",".join(map(str, numbers)) + f">{target}:"


def held_out(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % HELD_OUT_BUCKETS == 0


def score(response: str, ground_truth: str) -> float:
    """1 if the last trial is a correct chain over the problem's numbers that hits the
    target, else 0 (``ground_truth`` is ``a,b,c>t``)."""
    nums, _, target = ground_truth.partition(">")
    m = _TRIAL.fullmatch(response.rsplit("|", 1)[-1].strip())
    if m is None:
        return 0.0
    a, o1, b, v, o2, c, w = m.groups()
    if sorted((int(a), int(b), int(c))) != sorted(map(int, nums.split(","))):
        return 0.0
    ok = apply(o1, int(a), int(b)) == int(v) and apply(o2, int(v), int(c)) == int(w) == int(target)
    return 1.0 if ok else 0.0


register_verifier_prefix(PREFIX, score)
register_sparks_prefix(PREFIX, SPARKS)


def random_miss(numbers: tuple[int, ...], target: int, rng: random.Random, mul_p: float) -> Chain | None:
    """A trial of the rarely-multiplying searcher that misses ``target`` (None if the draws keep hitting)."""
    for _ in range(64):
        order = tuple(rng.sample(numbers, len(numbers)))
        ops = tuple("*" if rng.random() < mul_p else rng.choice("+-") for _ in range(2))
        v = value((order, ops))
        if v is not None and v != target:
            return order, ops
    return None


def false_starts(chain: Chain, rng: random.Random) -> list[str]:
    """The trial's abandoned starts: at each of its operators, while a draw falls under
    SFT_NOISE, the trial up to there and a junk move (then ``|`` and a restart)."""
    (a, b, _), (o1, _) = chain
    out = []
    for head in (f"{a}", f"{a}{o1}{b}={apply(o1, a, b)}"):
        while rng.random() < SFT_NOISE:
            out.append(head + rng.choice(NOISE_CHARS))
    return out


def trace(numbers: tuple[int, ...], target: int, rng: random.Random) -> str:
    """A warm-start response: 0..SFT_MAX_MISSES missed trials, then a solution (a ``+ -``
    one when there is one, so ``*`` shows up in solutions of hard problems only), each
    trial after its false starts."""
    sols = [c for c in chains(numbers) if value(c) == target]
    sols = [c for c in sols if not uses_mul(c)] or sols
    misses = [random_miss(numbers, target, rng, SFT_MISS_MUL) for _ in range(rng.randint(0, SFT_MAX_MISSES))]
    trials = [c for c in misses if c] + [rng.choice(sols)]
    return "|".join(part for c in trials for part in [*false_starts(c, rng), render_trial(c)])


class SparkTask:
    data_source = PREFIX.rstrip("/")

    def __init__(self, hard_frac: float = HARD_FRAC) -> None:
        if not 0 <= hard_frac <= 1:
            raise ValueError(f"spark task: hard_frac must be in [0, 1], got {hard_frac}")
        self.hard_frac = hard_frac

    def sample(self, seed: int, index: int) -> Problem:
        """Problem ``index`` of the training stream of ``seed`` (>= 0), or of the held-out
        split (any seed < 0: one split for every run)."""
        split = "held-out" if seed < 0 else str(seed)
        rng = random.Random(f"spark/{split}/{index}")  # str seeds hash deterministically
        hard = rng.random() < self.hard_frac
        while True:
            numbers = tuple(rng.randint(LOW, HIGH) for _ in range(NUMBERS))
            easy_t, hard_t = targets(numbers)
            pool = sorted(hard_t if hard else easy_t)
            if not pool:
                continue
            target = rng.choice(pool)
            prompt = prompt_of(numbers, target)
            if held_out(prompt) == (seed < 0):
                return Problem(prompt=prompt, ground_truth=prompt.rstrip(":"), data_source=HARD if hard else EASY,
                               solution=trace(numbers, target, rng))
