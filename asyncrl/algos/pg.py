"""Pieces shared by every policy-gradient loss: the PPO clipped term, the
aggregation of per-token losses with the mini-batch's global normalisers, and the
standard additive metrics.

Everything here is a pure function of tensors; the algorithms in this package
compose them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asyncrl.algos.base import LossInputs


def log_ratio(x: LossInputs) -> Tensor:
    """``lp - lp_old`` on valid tokens, 0 on padding (so padding never yields inf/nan
    in ``exp`` or in the backward pass)."""
    return torch.where(x.mask, x.logprobs - x.old_logprobs, torch.zeros_like(x.logprobs))


def clipped_pg(ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate per token: ``max(-A*r, -A*clip(r, 1-lo, 1+hi))``.

    Returns ``(loss [B, T], clipped [B, T] bool)`` where ``clipped`` marks tokens whose
    clipped branch was active (gradient zero), for the clip-fraction metric.
    """
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def aggregate(per_token: Tensor, x: LossInputs, agg: str) -> Tensor:
    """Reduce a [B, T] per-token loss to this micro-batch's share of the mini-batch loss.

    Padding is zeroed here. Normalisers are those of the *whole* mini-batch
    (``x.num_tokens``, ``x.num_seqs``, ``x.max_len``), so summing the result over
    micro-batches and ranks gives exactly the mini-batch loss:

    - ``token-mean``: sum over tokens / num_tokens;
    - ``seq-mean-token-mean``: sum over sequences of the sequence's token mean / num_seqs
      (a sequence without valid tokens contributes 0);
    - ``seq-mean-token-sum``: sum over sequences of the token sum / num_seqs;
    - ``seq-mean-token-sum-norm`` (Dr.GRPO): token sum / (num_seqs * max_len), with
      ``max_len`` a constant shared by the whole mini-batch.
    """
    per_token = torch.where(x.mask, per_token, torch.zeros_like(per_token))
    if agg == "token-mean":
        return per_token.sum() / max(x.num_tokens, 1.0)
    if agg == "seq-mean-token-mean":
        lengths = x.mask.sum(dim=-1).clamp(min=1).to(per_token.dtype)  # (B,)
        return (per_token.sum(dim=-1) / lengths).sum() / max(x.num_seqs, 1.0)
    if agg == "seq-mean-token-sum":
        return per_token.sum() / max(x.num_seqs, 1.0)
    if agg == "seq-mean-token-sum-norm":
        if x.max_len <= 0:
            raise ValueError("agg 'seq-mean-token-sum-norm' needs LossInputs.max_len > 0 "
                             "(the max response length of the run, a constant)")
        return per_token.sum() / (max(x.num_seqs, 1.0) * x.max_len)
    raise ValueError(f"unknown aggregation {agg!r}")


def token_sum(values: Tensor, x: LossInputs) -> Tensor:
    """Detached sum of ``values`` over valid tokens (an additive metric)."""
    return torch.where(x.mask, values, torch.zeros_like(values)).sum().detach()


def pg_metrics(log_r: Tensor, clipped: Tensor, x: LossInputs) -> dict[str, Tensor]:
    """Additive ratio metrics: contributions to mini-batch token means."""
    n = max(x.num_tokens, 1.0)
    return {
        "loss/clip_frac": token_sum(clipped.to(log_r.dtype), x) / n,
        # E[lp_old - lp] (k1), the usual PPO "approx_kl"
        "loss/approx_kl": token_sum(-log_r, x) / n,
        "loss/ratio_mean": token_sum(torch.exp(log_r), x) / n,
    }


def is_weighted(per_token: Tensor, x: LossInputs) -> Tensor:
    """Multiply by the truncated importance weights (behaviour -> pi_old), if any."""
    return per_token if x.is_weights is None else per_token * x.is_weights
