"""Typed algorithm configs: a tagged union picked by ``algo.type`` in YAML.

Imported by ``asyncrl.config`` before torch is loaded, so nothing here imports torch.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Agg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


class _Algo(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    clip_low: float = 0.2
    """Lower clip: ratio >= 1 - clip_low."""
    clip_high: float = 0.2
    """Upper clip: ratio <= 1 + clip_high."""
    agg: Agg = "token-mean"
    """How per-token losses are aggregated over the mini-batch."""
    scale_advantages: bool = True
    """GRPO divides the group-centred reward by its std; Dr.GRPO does not."""

    def __post_init__(self) -> None:
        if not (0.0 <= self.clip_low <= 1.0):
            raise ValueError(f"algo.clip_low must be in [0, 1], got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"algo.clip_high must be >= 0, got {self.clip_high}")


class GRPOConfig(_Algo, tag="grpo"):
    """GRPO with a symmetric PPO clip and token-mean aggregation."""


class LpRegConfig(_Algo, tag="lpreg"):
    """Lp-Reg (arXiv 2510.03222), defaults from the paper's Qwen3-14B runs."""

    clip_low: float = 1.0
    clip_high: float = 9.0
    kappa: float = 0.02
    """Min-p threshold: the proxy keeps tokens with p >= kappa * p_max under pi_old."""
    rho: float = 0.01
    """Fraction of negative-advantage tokens screened (lowest current log-prob)."""
    rho_pos: float = 0.0
    """Same for positive-advantage tokens (0 = off)."""
    beta: float = 1.0
    """Coefficient of the k3 KL term toward the proxy."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 <= self.kappa <= 1.0):
            raise ValueError(f"algo.kappa must be in [0, 1], got {self.kappa}")
        for name in ("rho", "rho_pos"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0):
                raise ValueError(f"algo.{name} must be in [0, 1], got {v}")


class ClipHigherConfig(_Algo, tag="clip_higher"):
    """DAPO's Clip-Higher (Yu et al. 2025): GRPO with a wider upper clip, token-mean."""

    clip_high: float = 0.28


class DrGRPOConfig(_Algo, tag="dr_grpo"):
    """Dr.GRPO (Liu et al. 2025): no std scaling, token sums over a constant length."""

    agg: Agg = "seq-mean-token-sum-norm"
    scale_advantages: bool = False


class GSPOConfig(_Algo, tag="gspo"):
    """GSPO (Zheng et al. 2025): one importance ratio per sequence, the geometric mean
    of its token ratios, clipped in a narrow band."""

    clip_low: float = 3e-4
    clip_high: float = 4e-4
    agg: Agg = "seq-mean-token-mean"


class EntropyBonusConfig(_Algo, tag="entropy_bonus"):
    """GRPO minus ``coef`` times the (aggregated) current-policy token entropy."""

    coef: float = 1e-3
    """Entropy coefficient (the Lp-Reg paper does not state its value; veRL's examples use 1e-3)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.coef < 0.0:
            raise ValueError(f"algo.coef must be >= 0, got {self.coef}")


class EightyTwentyConfig(_Algo, tag="eighty_twenty"):
    """Beyond the 80/20 rule (Wang et al. 2025): policy gradient only through the
    highest-entropy tokens of the mini-batch; DAPO clip and token-mean."""

    clip_high: float = 0.28
    top_frac: float = 0.2
    """Fraction of the mini-batch's valid tokens (highest entropy) that get a gradient."""
    normaliser: Literal["selected", "all"] = "selected"
    """Token-mean denominator: the selected tokens (the reference code the Lp-Reg paper
    reports) or all valid tokens (TRL's top_entropy_quantile)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 < self.top_frac <= 1.0):
            raise ValueError(f"algo.top_frac must be in (0, 1], got {self.top_frac}")
        if self.normaliser == "selected" and self.agg != "token-mean":
            raise ValueError(f"algo.normaliser=selected divides a token-mean by the selected tokens, but algo.agg is "
                             f"{self.agg}; set algo.normaliser=all or algo.agg=token-mean")


class KLCovConfig(_Algo, tag="kl_cov"):
    """KL-Cov (Cui et al. 2025): unclipped policy gradient plus ``coef * |lp - lp_old|``
    on the ``ratio`` fraction of tokens with the largest (A - mean A)(lp - mean lp)."""

    ratio: float = 2e-3
    """Fraction of the mini-batch's valid tokens penalised (at least one)."""
    coef: float = 1.0
    """Coefficient of the |log-ratio| penalty."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 < self.ratio <= 1.0):
            raise ValueError(f"algo.ratio must be in (0, 1], got {self.ratio}")


class ClipCovConfig(_Algo, tag="clip_cov"):
    """Clip-Cov (Cui et al. 2025): clipped policy gradient with the gradient of a
    ``ratio`` fraction of tokens removed, picked at random among tokens whose covariance
    (A - mean A)(lp - mean lp) lies in (cov_lb, cov_ub) and that PPO did not clip.
    The clip range is the authors' published recipe (clip ratio 1 on both sides)."""

    clip_low: float = 1.0
    clip_high: float = 1.0

    ratio: float = 2e-4
    """Fraction of the mini-batch's valid tokens detached (at least one)."""
    cov_lb: float = 1.0
    cov_ub: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 < self.ratio <= 1.0):
            raise ValueError(f"algo.ratio must be in (0, 1], got {self.ratio}")
        if not self.cov_lb < self.cov_ub:
            raise ValueError(f"algo.cov_lb must be < algo.cov_ub, got {self.cov_lb} >= {self.cov_ub}")


AlgoConfig = (
    GRPOConfig | LpRegConfig | ClipHigherConfig | DrGRPOConfig | GSPOConfig
    | EntropyBonusConfig | EightyTwentyConfig | KLCovConfig | ClipCovConfig
)
