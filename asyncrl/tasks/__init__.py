"""Verifiable tasks: prompt generators with exact verifiers, chosen by ``data_source``."""

from asyncrl.tasks import arith, calc_tool, mathverify, reasoning_gym, spark  # noqa: F401  (register their verifiers)
from asyncrl.tasks.base import Problem, Task, build_task, find_verifier, verify

__all__ = ["Problem", "Task", "build_task", "find_verifier", "verify"]
