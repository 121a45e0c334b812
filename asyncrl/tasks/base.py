"""Task registry: a task yields problems (prompt text + ground truth) and scores answers.

A task may also designate "spark" moves (:func:`register_sparks`): named regexes over
the decoded answer text (a backtrack, a check step, ...) whose frequency in the sampled
answers the learner reports every step (``asyncrl.learner.exploration``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Protocol


@dataclass(frozen=True)
class Problem:
    prompt: str
    ground_truth: str
    data_source: str
    solution: str = ""  # a reference response (used by the warm-start only)
    prompt_ids: tuple[int, ...] = ()  # chat-templated token ids (dataset rows); empty = tokenize prompt


class Task(Protocol):
    data_source: str

    def sample(self, seed: int, index: int) -> Problem: ...


# data_source -> verifier(response_text, ground_truth) -> reward in [0, 1]
_VERIFIERS: dict[str, Callable[[str, str], float]] = {}


def register_verifier(data_source: str, fn: Callable[[str, str], float]) -> None:
    if data_source in _VERIFIERS:
        raise ValueError(f"verifier for data_source {data_source!r} is registered twice")
    _VERIFIERS[data_source] = fn


# (prefix, verifier): a family of sources named "<prefix><dataset>" (reasoning_gym/countdown);
# checked before the substrings, so "reasoning_gym/..." never falls to a benchmark pattern.
_PREFIXES: list[tuple[str, Callable[[str, str], float]]] = []


def register_verifier_prefix(prefix: str, fn: Callable[[str, str], float]) -> None:
    _PREFIXES.append((prefix, fn))


# (substring, verifier): a data_source with no exact entry that contains the substring
# (case-insensitive) uses that verifier; benchmarks come under many spellings.
_PATTERNS: list[tuple[str, Callable[[str, str], float]]] = []


def register_verifier_pattern(substring: str, fn: Callable[[str, str], float]) -> None:
    _PATTERNS.append((substring.lower(), fn))


def find_verifier(data_source: str) -> Callable[[str, str], float]:
    fn = _VERIFIERS.get(data_source)
    if fn is None:
        fn = next((f for pre, f in _PREFIXES if data_source.startswith(pre)), None)
    if fn is None:
        fn = next((f for sub, f in _PATTERNS if sub in data_source.lower()), None)
    if fn is None:
        raise KeyError(
            f"no verifier for data_source {data_source!r}; known: {sorted(_VERIFIERS)}, any name starting with one of "
            f"{[pre for pre, _ in _PREFIXES]}, or any name containing "
            f"one of {[sub for sub, _ in _PATTERNS]}; rename the rows' data_source or register a verifier"
        )
    return fn


def verify(data_source: str, response: str, ground_truth: str) -> float:
    return find_verifier(data_source)(response, ground_truth)


# ---------------------------------------------------------------- spark moves
# Keyed like the verifiers: an exact data_source, else the first registered prefix it
# starts with. A source with neither has no sparks (nothing is reported, not an error).
_SPARKS: dict[str, dict[str, re.Pattern]] = {}
_SPARK_PREFIXES: list[tuple[str, dict[str, re.Pattern]]] = []
# a spark name becomes part of a metric name (explore/spark/<name>/...)
_SPARK_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _compile_sparks(patterns: Mapping[str, str | re.Pattern]) -> dict[str, re.Pattern]:
    if not patterns:
        raise ValueError("register at least one spark pattern")
    out = {}
    for name, pattern in patterns.items():
        if not _SPARK_NAME.fullmatch(name):
            raise ValueError(f"spark name {name!r} must match [A-Za-z0-9_.-]+ (it becomes a metric name)")
        rx = re.compile(pattern)
        if rx.search(""):  # would "occur" in every answer, however empty: a typo, not a move
            raise ValueError(f"spark {name!r}: pattern {rx.pattern!r} matches the empty string")
        out[name] = rx
    return out


def register_sparks(data_source: str, patterns: Mapping[str, str | re.Pattern]) -> None:
    """Designate the spark moves of ``data_source``: ``{name: regex}``, a regex given as
    a string (``re.compile``d; flags inline, e.g. ``(?i)``) or a compiled pattern. An
    answer "contains" a spark when ``pattern.search(text)`` finds it in the decoded
    answer (``skip_special_tokens=True``, model tokens only); its occurrences are the
    non-overlapping matches of ``pattern.finditer(text)``."""
    if data_source in _SPARKS:
        raise ValueError(f"sparks for data_source {data_source!r} are registered twice")
    _SPARKS[data_source] = _compile_sparks(patterns)


def register_sparks_prefix(prefix: str, patterns: Mapping[str, str | re.Pattern]) -> None:
    """The same for every data_source starting with ``prefix`` (an exact entry wins)."""
    if any(pre == prefix for pre, _ in _SPARK_PREFIXES):
        raise ValueError(f"sparks for prefix {prefix!r} are registered twice")
    _SPARK_PREFIXES.append((prefix, _compile_sparks(patterns)))


def find_sparks(data_source: str) -> dict[str, re.Pattern]:
    """The spark patterns of ``data_source`` by name ({} when the task defines none)."""
    if data_source in _SPARKS:
        return _SPARKS[data_source]
    return next((p for pre, p in _SPARK_PREFIXES if data_source.startswith(pre)), {})


def build_task(name: str, **kwargs) -> Task:
    from asyncrl.tasks.arith import ArithTask
    from asyncrl.tasks.calc_tool import CalcToolTask

    tasks = {"arith": ArithTask, "calc_tool": CalcToolTask}
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; known: {sorted(tasks)}")
    return tasks[name](**kwargs)
