"""Covariance-based baselines of Cui et al. 2025 ("The Entropy Mechanism of
Reinforcement Learning for Reasoning Language Models"): KL-Cov and Clip-Cov.

Both rank tokens by ``cov_t = (A_t - mean A) * (lp_t - mean lp)`` (current,
detached log-probs; means over the valid tokens of the whole mini-batch, all ranks)
and treat the highest-covariance tokens differently:

- KL-Cov: the unclipped term ``-A*ratio`` everywhere (no PPO clip, as in the
  authors' code), plus ``coef * |lp - lp_old|`` on the ``k = max(1, floor(ratio*N))``
  tokens with the largest covariance.
- Clip-Cov: the PPO clipped term, with the gradient (and value) of ``k`` tokens
  removed, chosen among tokens that PPO did not clip and whose covariance lies
  strictly in ``(cov_lb, cov_ub)``, picked at random among them as in the authors'
  code. The random draw is a per-token priority from the mini-batch's seed and the
  token's global position (:func:`asyncrl.algos.selection.global_uniform`), so the pick
  is reproducible and the same for any micro-batch split or world size.

Ties go to the earlier token in global order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from asyncrl.algos.base import AllGather, LossInputs, SelectInputs
from asyncrl.algos.pg import aggregate, clipped_pg, is_weighted, log_ratio, pg_metrics, token_sum
from asyncrl.algos.selection import global_lowest, global_sums, global_uniform, lowest_k, num_selected

SELECTED = 1  # select() code: penalised (KL-Cov) or detached (Clip-Cov)


def centred_covariance(x: SelectInputs, all_gather: AllGather) -> tuple[Tensor, int]:
    """(cov [N], global number of valid tokens) with mini-batch-global means."""
    lp = x.logprobs.detach()
    n = torch.tensor(float(lp.numel()), dtype=torch.float64, device=lp.device)
    sums = global_sums(torch.stack([x.advantages.to(torch.float64).sum(),
                                    lp.to(torch.float64).sum(), n]), all_gather)
    total = int(sums[2])
    mean_a, mean_lp = (sums[:2] / max(total, 1)).to(lp.dtype)
    return (x.advantages - mean_a) * (lp - mean_lp), total


@dataclass(frozen=True)
class KLCov:
    clip_low: float
    clip_high: float
    agg: str
    ratio: float
    coef: float
    needs_entropy: bool = False
    needs_proxy: bool = False
    needs_selection: bool = True

    def select(self, x: SelectInputs, all_gather: AllGather) -> Tensor:
        cov, _ = centred_covariance(x, all_gather)
        valid = torch.ones(cov.shape, dtype=torch.bool, device=cov.device)
        top = global_lowest(-cov, valid, self.ratio, all_gather, x.rank, at_least_one=True)
        return top.to(torch.int8) * SELECTED

    def loss(self, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        if x.selected is None:
            raise ValueError("kl_cov needs LossInputs.selected from select()")
        sel = x.selected == SELECTED
        log_r = log_ratio(x)
        ratio = torch.exp(log_r)
        pg = is_weighted(-x.advantages * ratio, x)
        penalty = torch.where(sel, self.coef * log_r.abs(), torch.zeros_like(pg))
        loss = aggregate(pg + penalty, x, self.agg)
        with torch.no_grad():
            _, clipped = clipped_pg(ratio, x.advantages, self.clip_low, self.clip_high)
            metrics = {"loss/pg": aggregate(pg, x, self.agg), "kl_cov/penalty": aggregate(penalty, x, self.agg),
                       "select/tokens": token_sum(sel.to(pg.dtype), x), **pg_metrics(log_r, clipped, x)}
        return loss, metrics


@dataclass(frozen=True)
class ClipCov:
    clip_low: float
    clip_high: float
    agg: str
    ratio: float
    cov_lb: float
    cov_ub: float
    needs_entropy: bool = False
    needs_proxy: bool = False
    needs_selection: bool = True

    def select(self, x: SelectInputs, all_gather: AllGather) -> Tensor:
        cov, total = centred_covariance(x, all_gather)
        lp = x.logprobs.detach()
        _, clipped = clipped_pg(torch.exp(lp - x.old_logprobs), x.advantages, self.clip_low, self.clip_high)
        eligible = ~clipped & (cov > self.cov_lb) & (cov < self.cov_ub)
        k = num_selected(self.ratio, total, at_least_one=True)
        priority = global_uniform(x.seed, cov.numel(), all_gather, x.rank, cov.device)
        return lowest_k(priority, eligible, k, all_gather, x.rank).to(torch.int8) * SELECTED

    def loss(self, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        if x.selected is None:
            raise ValueError("clip_cov needs LossInputs.selected from select()")
        sel = x.selected == SELECTED
        log_r = log_ratio(x)
        pg, clipped = clipped_pg(torch.exp(log_r), x.advantages, self.clip_low, self.clip_high)
        pg = torch.where(sel, torch.zeros_like(pg), is_weighted(pg, x))
        loss = aggregate(pg, x, self.agg)
        metrics = {"loss/pg": loss.detach(), "select/tokens": token_sum(sel.to(pg.dtype), x),
                   **pg_metrics(log_r, clipped, x)}
        return loss, metrics
