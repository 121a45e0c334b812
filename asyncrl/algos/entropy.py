"""Entropy-based baselines: an entropy bonus, and the 80/20 rule.

- ``EntropyBonus``: GRPO loss minus ``coef`` times the aggregated current-policy
  entropy (the "GRPO+entropy" baseline of the Lp-Reg paper).
- ``EightyTwenty`` (Wang et al. 2025, "Beyond the 80/20 Rule"): the policy gradient
  flows only through the ``top_frac`` highest-entropy tokens of the mini-batch;
  the others contribute zero. The token-mean divides by the ``k`` selected tokens
  (``normaliser: selected``, the reference code whose numbers the Lp-Reg paper
  reports) or by all valid tokens (``normaliser: all``, as TRL's
  ``top_entropy_quantile`` does). The selection is global over the mini-batch,
  ``k = max(1, floor(top_frac * N))``, ties to the earlier token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from asyncrl.algos.base import AllGather, LossInputs, SelectInputs
from asyncrl.algos.grpo import GRPO, no_selection
from asyncrl.algos.pg import aggregate, clipped_pg, is_weighted, log_ratio, pg_metrics, token_sum
from asyncrl.algos.selection import global_lowest, num_selected

HIGH_ENTROPY = 1  # select() code: this token keeps its gradient


@dataclass(frozen=True)
class EntropyBonus:
    clip_low: float
    clip_high: float
    agg: str
    coef: float
    needs_entropy: bool = True
    needs_proxy: bool = False
    needs_selection: bool = False

    def select(self, x: SelectInputs, all_gather: AllGather) -> Tensor:
        return no_selection(x)

    def loss(self, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        if x.entropy is None:
            raise ValueError("entropy_bonus needs LossInputs.entropy (needs_entropy is True)")
        pg_loss, metrics = GRPO(self.clip_low, self.clip_high, self.agg).loss(x)
        entropy = aggregate(x.entropy, x, self.agg)
        return pg_loss - self.coef * entropy, {**metrics, "loss/entropy": entropy.detach()}


@dataclass(frozen=True)
class EightyTwenty:
    clip_low: float
    clip_high: float
    agg: str
    top_frac: float
    normaliser: str = "selected"  # "selected" (token-mean only) or "all"
    needs_entropy: bool = True
    needs_proxy: bool = False
    needs_selection: bool = True

    def select(self, x: SelectInputs, all_gather: AllGather) -> Tensor:
        if x.entropy is None:
            raise ValueError("eighty_twenty needs SelectInputs.entropy (needs_entropy is True)")
        valid = torch.ones(x.entropy.shape, dtype=torch.bool, device=x.entropy.device)
        top = global_lowest(-x.entropy.detach(), valid, self.top_frac, all_gather, x.rank, at_least_one=True)
        return top.to(torch.int8) * HIGH_ENTROPY

    def loss(self, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        if x.selected is None:
            raise ValueError("eighty_twenty needs LossInputs.selected from select()")
        keep = x.selected == HIGH_ENTROPY
        log_r = log_ratio(x)
        pg, clipped = clipped_pg(torch.exp(log_r), x.advantages, self.clip_low, self.clip_high)
        pg = torch.where(keep, is_weighted(pg, x), torch.zeros_like(pg))
        if self.normaliser == "selected":  # k is a function of the global token count: same on every rank
            k = num_selected(self.top_frac, int(x.num_tokens), at_least_one=True)
            loss = aggregate(pg, replace(x, num_tokens=float(k)), self.agg)
        else:
            loss = aggregate(pg, x, self.agg)
        metrics = {"loss/pg": loss.detach(), **pg_metrics(log_r, clipped & keep, x),
                   "select/tokens": token_sum(keep.to(pg.dtype), x)}
        return loss, metrics
