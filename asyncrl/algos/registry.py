"""The one table from config class (``algo.type``) to algorithm implementation."""

from __future__ import annotations

from typing import Callable

from asyncrl.algos.base import Algorithm
from asyncrl.algos.config import (
    AlgoConfig, ClipCovConfig, ClipHigherConfig, DrGRPOConfig, EightyTwentyConfig,
    EntropyBonusConfig, GRPOConfig, GSPOConfig, KLCovConfig, LpRegConfig,
)
from asyncrl.algos.cov import ClipCov, KLCov
from asyncrl.algos.entropy import EightyTwenty, EntropyBonus
from asyncrl.algos.grpo import GRPO
from asyncrl.algos.gspo import GSPO
from asyncrl.algos.lpreg import LpReg


def _grpo(c: GRPOConfig | ClipHigherConfig | DrGRPOConfig) -> Algorithm:
    return GRPO(clip_low=c.clip_low, clip_high=c.clip_high, agg=c.agg)


def _lpreg(c: LpRegConfig) -> Algorithm:
    return LpReg(clip_low=c.clip_low, clip_high=c.clip_high, agg=c.agg, kappa=c.kappa,
                 rho=c.rho, rho_pos=c.rho_pos, beta=c.beta)


def _gspo(c: GSPOConfig) -> Algorithm:
    return GSPO(clip_low=c.clip_low, clip_high=c.clip_high, agg=c.agg)


def _entropy_bonus(c: EntropyBonusConfig) -> Algorithm:
    return EntropyBonus(clip_low=c.clip_low, clip_high=c.clip_high, agg=c.agg, coef=c.coef)


def _eighty_twenty(c: EightyTwentyConfig) -> Algorithm:
    return EightyTwenty(clip_low=c.clip_low, clip_high=c.clip_high, agg=c.agg, top_frac=c.top_frac,
                        normaliser=c.normaliser)


def _kl_cov(c: KLCovConfig) -> Algorithm:
    return KLCov(clip_low=c.clip_low, clip_high=c.clip_high, agg=c.agg, ratio=c.ratio, coef=c.coef)


def _clip_cov(c: ClipCovConfig) -> Algorithm:
    return ClipCov(clip_low=c.clip_low, clip_high=c.clip_high, agg=c.agg, ratio=c.ratio,
                   cov_lb=c.cov_lb, cov_ub=c.cov_ub)


# Clip-Higher and Dr.GRPO are GRPO with other defaults (and, for Dr.GRPO, unscaled
# advantages: the learner reads cfg.scale_advantages for compute_advantages).
REGISTRY: dict[type, Callable[..., Algorithm]] = {
    GRPOConfig: _grpo,
    ClipHigherConfig: _grpo,
    DrGRPOConfig: _grpo,
    LpRegConfig: _lpreg,
    GSPOConfig: _gspo,
    EntropyBonusConfig: _entropy_bonus,
    EightyTwentyConfig: _eighty_twenty,
    KLCovConfig: _kl_cov,
    ClipCovConfig: _clip_cov,
}


def build_algorithm(cfg: AlgoConfig) -> Algorithm:
    """The algorithm for a validated ``algo`` config."""
    try:
        build = REGISTRY[type(cfg)]
    except KeyError:
        raise TypeError(f"no algorithm registered for {type(cfg).__name__}; add it to "
                        "asyncrl.algos.registry.REGISTRY") from None
    return build(cfg)
