"""The Lp-Reg loss (docs/lpreg.md section 3) as pure functions.

- :func:`lpreg_token_loss`: one micro-batch, selection already done (the learner's
  path, via :class:`asyncrl.algos.lpreg.LpReg`).
- :func:`lpreg_loss`: selection plus loss on a single [B, T] batch, single rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asyncrl.algos.base import LossInputs, SelectInputs
from asyncrl.algos.lpreg.selection import is_regularised, lpreg_select
from asyncrl.algos.pg import aggregate, clipped_pg, is_weighted, log_ratio, pg_metrics, token_sum
from asyncrl.algos.selection import local_all_gather

KL_CLAMP = 10.0


def k3(lp: Tensor, lp_proxy: Tensor) -> Tensor:
    """Low-variance KL estimator ``exp(d) - d - 1`` with ``d = lp_proxy - lp``, clamped
    to [-10, 10] as in the reference (``low_var_kl``)."""
    d = lp_proxy - lp
    return torch.clamp(torch.exp(d) - d - 1.0, -KL_CLAMP, KL_CLAMP)


def lpreg_token_loss(
    x: LossInputs, *, beta: float, clip_low: float, clip_high: float, agg: str
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PG everywhere, replaced on regularised tokens by ``-A*ratio + beta*k3``.

    Needs ``x.selected`` (codes from :func:`lpreg_select`) and ``x.proxy_logprobs``.
    Truncated importance weights, if given, scale the policy-gradient part only; the
    KL pull toward the proxy is a regulariser, as a reference-model KL is in veRL.

    Metrics (additive over micro-batches and ranks): ``loss/pg`` and ``lpreg/kl`` are
    the two parts of the loss; ``lpreg/screened`` and ``lpreg/regularised`` are token
    counts; ``lpreg/kl_sum`` is the sum of k3 over regularised tokens, so the mean KL
    term of the mini-batch is ``lpreg/kl_sum / lpreg/regularised`` after summing.
    """
    if x.selected is None or x.proxy_logprobs is None:
        raise ValueError("Lp-Reg loss needs LossInputs.selected and LossInputs.proxy_logprobs")
    reg = is_regularised(x.selected) & x.mask  # (B, T)
    log_r = log_ratio(x)
    ratio = torch.exp(log_r)
    pg, clipped = clipped_pg(ratio, x.advantages, clip_low, clip_high)
    pg = torch.where(reg, -x.advantages * ratio, pg)  # unclipped on regularised tokens
    pg = is_weighted(pg, x)
    # d = 0 off the regularised set, so -inf proxies never reach exp or the backward
    proxy = torch.where(reg, x.proxy_logprobs, x.logprobs.detach())
    k3_t = torch.where(reg, k3(x.logprobs, proxy), torch.zeros_like(pg))
    kl = beta * k3_t
    loss = aggregate(pg + kl, x, agg)
    with torch.no_grad():
        metrics = {
            "loss/pg": aggregate(pg, x, agg),
            "lpreg/kl": aggregate(kl, x, agg),
            "lpreg/kl_sum": token_sum(k3_t, x),
            "lpreg/screened": token_sum((x.selected != 0).to(pg.dtype), x),
            "lpreg/regularised": token_sum(reg.to(pg.dtype), x),
            **pg_metrics(log_r, clipped & ~reg, x),
        }
    return loss, metrics


def lpreg_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    proxy_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    rho: float,
    rho_pos: float = 0.0,
    beta: float,
    clip_low: float,
    clip_high: float,
    agg: str = "token-mean",
    max_len: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Lp-Reg on one batch, single rank: global selection over ``mask`` then the loss.

    ``logprobs`` [B, T] carries the gradient; ``old_logprobs``, ``proxy_logprobs``
    (``-inf`` where filtered) [B, T]; ``advantages`` [B] or [B, T]; ``mask`` [B, T]
    bool. ``num_tokens`` is the number of valid tokens, ``num_seqs`` the number of rows
    with at least one, ``max_len`` (for ``seq-mean-token-sum-norm``) defaults to T.
    Returns ``(loss, metrics)`` as :func:`lpreg_token_loss`.
    """
    mask = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)
    codes = lpreg_select(
        SelectInputs(
            logprobs=logprobs.detach()[mask], old_logprobs=old_logprobs[mask],
            advantages=advantages[mask], entropy=None, proxy_logprobs=proxy_logprobs[mask],
        ),
        local_all_gather, rho=rho, rho_pos=rho_pos,
    )
    selected = torch.zeros(mask.shape, dtype=torch.int8, device=mask.device)
    selected[mask] = codes
    x = LossInputs(
        logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
        num_tokens=float(mask.sum()), num_seqs=float(mask.any(dim=-1).sum()),
        max_len=float(mask.shape[-1] if max_len is None else max_len),
        proxy_logprobs=proxy_logprobs, selected=selected,
    )
    return lpreg_token_loss(x, beta=beta, clip_low=clip_low, clip_high=clip_high, agg=agg)
