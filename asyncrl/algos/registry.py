"""The one table from config class (``algo.type``) to algorithm implementation."""

from __future__ import annotations

from typing import Callable

from asyncrl.algos.base import Algorithm
from asyncrl.algos.config import AlgoConfig, GRPOConfig, LpRegConfig
from asyncrl.algos.grpo import GRPO
from asyncrl.algos.lpreg import LpReg


def _grpo(c: GRPOConfig) -> Algorithm:
    return GRPO(clip_low=c.clip_low, clip_high=c.clip_high, agg=c.agg)


def _lpreg(c: LpRegConfig) -> Algorithm:
    return LpReg(clip_low=c.clip_low, clip_high=c.clip_high, agg=c.agg, kappa=c.kappa,
                 rho=c.rho, rho_pos=c.rho_pos, beta=c.beta)


REGISTRY: dict[type, Callable[..., Algorithm]] = {
    GRPOConfig: _grpo,
    LpRegConfig: _lpreg,
}


def build_algorithm(cfg: AlgoConfig) -> Algorithm:
    """The algorithm for a validated ``algo`` config."""
    try:
        build = REGISTRY[type(cfg)]
    except KeyError:
        raise TypeError(f"no algorithm registered for {type(cfg).__name__}; add it to "
                        "asyncrl.algos.registry.REGISTRY") from None
    return build(cfg)
