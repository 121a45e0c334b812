"""Prompt sources: where training and evaluation problems come from.

A source is an indexable stream of :class:`asyncrl.tasks.Problem`; the learner keeps
only an integer position into it (so resuming is exact). The built-in synthetic
tasks are infinite sources; dataset files (veRL layout) are finite and cycle over
epochs with a per-epoch seeded shuffle.
"""

from __future__ import annotations

from typing import Protocol

from asyncrl.config import Config
from asyncrl.tasks import Problem, build_task


class PromptSource(Protocol):
    def problem(self, index: int) -> Problem:
        """The problem at stream position ``index`` (deterministic given the config)."""
        ...


class TaskSource:
    """An infinite stream of a synthetic task's problems under one seed."""

    def __init__(self, task, seed: int) -> None:
        self.task, self.seed = task, seed

    def problem(self, index: int) -> Problem:
        return self.task.sample(self.seed, index)


def build_train_source(cfg: Config) -> PromptSource:
    task = build_task(cfg.task.name, terms=cfg.task.terms, digits=cfg.task.digits)
    return TaskSource(task, cfg.run.seed)


def build_eval_problems(cfg: Config) -> list[Problem]:
    """The held-out problems: a seed disjoint from the training stream's."""
    task = build_task(cfg.task.name, terms=cfg.task.terms, digits=cfg.task.digits)
    return [task.sample(-1 - cfg.run.seed, i) for i in range(cfg.task.eval_size)]
