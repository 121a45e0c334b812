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


AlgoConfig = GRPOConfig | LpRegConfig
