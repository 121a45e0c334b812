"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization").

One importance ratio per sequence, the geometric mean of its token ratios:
``s_i = exp(mean_t (lp_t - lp_old_t))``, clipped as in PPO with a narrow band
(3e-4 / 4e-4 in the paper). Every token of sequence i carries the sequence's loss
``max(-A*s_i, -A*clip(s_i))``, so with the default ``seq-mean-token-mean`` the
mini-batch loss is the mean of sequence losses and the gradient is the paper's
``-A * s_i * mean_t grad lp_t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from asyncrl.algos.base import AllGather, LossInputs, SelectInputs
from asyncrl.algos.grpo import no_selection
from asyncrl.algos.pg import aggregate, clipped_pg, is_weighted, log_ratio, pg_metrics

# the sequence log-ratio is capped (as veRL does) so exp never overflows
MAX_LOG_SEQ_RATIO = 10.0


def sequence_log_ratio(x: LossInputs) -> Tensor:
    """[B, 1] mean over valid tokens of ``lp - lp_old`` (0 for an empty row), with grad."""
    lengths = x.mask.sum(dim=-1, keepdim=True).clamp(min=1).to(x.logprobs.dtype)
    return log_ratio(x).sum(dim=-1, keepdim=True) / lengths


@dataclass(frozen=True)
class GSPO:
    clip_low: float
    clip_high: float
    agg: str
    needs_entropy: bool = False
    needs_proxy: bool = False
    needs_selection: bool = False

    def select(self, x: SelectInputs, all_gather: AllGather) -> Tensor:
        return no_selection(x)

    def loss(self, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        log_s = torch.clamp(sequence_log_ratio(x), max=MAX_LOG_SEQ_RATIO)  # (B, 1)
        s = torch.exp(log_s).expand_as(x.logprobs)  # (B, T) the sequence ratio on each token
        pg, clipped = clipped_pg(s, x.advantages, self.clip_low, self.clip_high)
        loss = aggregate(is_weighted(pg, x), x, self.agg)
        with torch.no_grad():
            seq_log_r = log_s.expand_as(x.logprobs)
            metrics = {"loss/pg": loss.detach(), **pg_metrics(log_ratio(x), clipped, x),
                       "gspo/seq_log_ratio": aggregate(seq_log_r, x, "token-mean")}
        return loss, metrics
