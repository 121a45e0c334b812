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


def _tokenizer(cfg: Config, tok):
    if tok is None:
        from asyncrl.models import load_tokenizer

        tok = load_tokenizer(cfg.model.path)
    return tok


_RG_TASKS: dict = {}


def reasoning_gym_task(cfg: Config, tok=None):
    """The run's reasoning-gym task, built once (its held-out split is read by both the
    training stream, to skip those problems, and the evaluation)."""
    import msgspec

    from asyncrl.tasks.reasoning_gym import ReasoningGymTask

    if cfg.task.prompt == "question":
        tok = _tokenizer(cfg, tok)  # chat-templated prompts
    key = (msgspec.json.encode(cfg.task), id(tok))
    if key not in _RG_TASKS:
        _RG_TASKS.clear()
        _RG_TASKS[key] = ReasoningGymTask(cfg.task, tok)
    return _RG_TASKS[key]


def synthetic_task(cfg: Config):
    """The built-in task a run without data files trains on (not reasoning_gym)."""
    if cfg.task.name == "spark":
        from asyncrl.tasks.spark import SparkTask

        return SparkTask()
    return build_task(cfg.task.name, terms=cfg.task.terms, digits=cfg.task.digits)


def build_train_source(cfg: Config, tok=None) -> PromptSource:
    """``data.train_files`` in veRL layout if given, else the synthetic ``task``."""
    d = cfg.data
    if d.train_files:
        from asyncrl.data.files import DatasetSource, load_problems

        problems = load_problems(d.train_files, _tokenizer(cfg, tok), d.max_prompt_length, d.truncation)
        return DatasetSource(problems, cfg.run.seed, d.shuffle)
    if cfg.task.name == "reasoning_gym":
        return reasoning_gym_task(cfg, tok).stream(cfg.run.seed)
    task = synthetic_task(cfg)
    return TaskSource(task, cfg.run.seed)


def build_eval_problems(cfg: Config, tok=None) -> list[Problem]:
    """``data.eval_files`` (every row, in order) if given, else held-out synthetic problems
    (a seed disjoint from the training stream's; reasoning_gym: a split the streams skip)."""
    d = cfg.data
    if d.eval_files:
        from asyncrl.data.files import load_problems

        return load_problems(d.eval_files, _tokenizer(cfg, tok), d.max_prompt_length, d.truncation)
    if cfg.task.name == "reasoning_gym":
        return reasoning_gym_task(cfg, tok).eval_problems()
    task = synthetic_task(cfg)
    return [task.sample(-1 - cfg.run.seed, i) for i in range(cfg.task.eval_size)]
