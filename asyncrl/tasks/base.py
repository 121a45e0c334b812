"""Task registry: a task yields problems (prompt text + ground truth) and scores answers."""

from __future__ import annotations

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


def build_task(name: str, **kwargs) -> Task:
    from asyncrl.tasks.arith import ArithTask

    tasks = {"arith": ArithTask}
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; known: {sorted(tasks)}")
    return tasks[name](**kwargs)
