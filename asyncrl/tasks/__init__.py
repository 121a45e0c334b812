"""Verifiable tasks: prompt generators with exact verifiers, chosen by ``data_source``."""

from asyncrl.tasks import arith  # noqa: F401  (registers its verifier)
from asyncrl.tasks.base import Problem, Task, build_task, verify

__all__ = ["Problem", "Task", "build_task", "verify"]
