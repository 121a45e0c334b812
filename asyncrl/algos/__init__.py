"""RL algorithms: losses, global token selection and advantages.

``build_algorithm(cfg)`` maps a validated ``algo`` config to an
:class:`~asyncrl.algos.base.Algorithm` (the table is ``asyncrl.algos.registry``);
``compute_advantages(rewards, scale)`` gives group-relative advantages.

Both are imported lazily so that ``import asyncrl.algos.config`` (done by the config
loader before torch is imported) stays torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asyncrl.algos.advantages import compute_advantages
    from asyncrl.algos.registry import build_algorithm

__all__ = ["build_algorithm", "compute_advantages"]


def __getattr__(name: str) -> Any:
    if name == "build_algorithm":
        from asyncrl.algos.registry import build_algorithm

        return build_algorithm
    if name == "compute_advantages":
        from asyncrl.algos.advantages import compute_advantages

        return compute_advantages
    raise AttributeError(f"module 'asyncrl.algos' has no attribute {name!r}")
