"""Lp-Reg (Huang et al., arXiv 2510.03222): low-probability token regularisation
toward a min-p proxy of the old policy. See docs/lpreg.md for the contract.

- ``proxy``: the dense min-p proxy log-prob (reference; the learner uses a kernel);
- ``selection``: the global choice of regularised tokens;
- ``loss``: the loss on a micro-batch and the single-batch ``lpreg_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from asyncrl.algos.base import AllGather, LossInputs, SelectInputs
from asyncrl.algos.lpreg.loss import k3, lpreg_loss, lpreg_token_loss
from asyncrl.algos.lpreg.proxy import minp_proxy_logprobs
from asyncrl.algos.lpreg.selection import REG_NEG, REG_POS, SCREENED_NEG, SCREENED_POS, lpreg_select

__all__ = [
    "LpReg", "k3", "lpreg_loss", "lpreg_select", "lpreg_token_loss", "minp_proxy_logprobs",
    "REG_NEG", "REG_POS", "SCREENED_NEG", "SCREENED_POS",
]


@dataclass(frozen=True)
class LpReg:
    """The :class:`asyncrl.algos.base.Algorithm` for Lp-Reg."""

    clip_low: float
    clip_high: float
    agg: str
    kappa: float
    rho: float
    rho_pos: float
    beta: float
    needs_entropy: bool = False
    needs_proxy: bool = True
    needs_selection: bool = True

    def select(self, x: SelectInputs, all_gather: AllGather) -> Tensor:
        return lpreg_select(x, all_gather, rho=self.rho, rho_pos=self.rho_pos)

    def loss(self, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        return lpreg_token_loss(
            x, beta=self.beta, clip_low=self.clip_low, clip_high=self.clip_high, agg=self.agg
        )
