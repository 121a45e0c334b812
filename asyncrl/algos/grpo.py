"""GRPO: the PPO clipped surrogate with group-relative advantages.

Also the base of the simple baselines (Clip-Higher and Dr.GRPO are GRPO with other
defaults, see ``asyncrl.algos.config``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from asyncrl.algos.base import AllGather, LossInputs, SelectInputs
from asyncrl.algos.pg import aggregate, clipped_pg, is_weighted, log_ratio, pg_metrics


def no_selection(x: SelectInputs) -> Tensor:
    """The ``select`` result of algorithms without a selection: all zeros."""
    return torch.zeros(x.logprobs.shape, dtype=torch.int8, device=x.logprobs.device)


@dataclass(frozen=True)
class GRPO:
    """Clipped policy gradient aggregated by ``agg``; no selection, no extra inputs."""

    clip_low: float
    clip_high: float
    agg: str
    needs_entropy: bool = False
    needs_proxy: bool = False
    needs_selection: bool = False

    def select(self, x: SelectInputs, all_gather: AllGather) -> Tensor:
        return no_selection(x)

    def loss(self, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        log_r = log_ratio(x)
        pg, clipped = clipped_pg(torch.exp(log_r), x.advantages, self.clip_low, self.clip_high)
        loss = aggregate(is_weighted(pg, x), x, self.agg)
        return loss, {"loss/pg": loss.detach(), **pg_metrics(log_r, clipped, x)}
