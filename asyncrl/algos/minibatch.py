"""One optimisation mini-batch on one rank: the learner's side of the contract in
``asyncrl.algos.base``, as a function the learner calls (and the invariance test
exercises).

Per mini-batch: global normalisers (one small all_gather), then, if the algorithm
selects tokens, one no-grad pass over the whole share with the current weights and
a single ``select``; then the micro-batch loop (forward with grad, ``loss``,
backward). The caller owns the optimiser step and the gradient all-reduce.

Every rank's loss is its share of the global loss (the normalisers are global), so
gradients must be SUMMED across ranks, not averaged: with FSDP2 call
``model.set_gradient_divide_factor(1.0)`` (or scale the loss by the world size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from asyncrl.algos.base import AllGather, Algorithm, LossInputs, SelectInputs
from asyncrl.algos.offpolicy import behaviour_weights
from asyncrl.algos.selection import global_sums

Forward = Callable[[slice], tuple[Tensor, Tensor | None]]
"""rows -> (logprobs [b, T], entropy [b, T] or None) of those rows under the current
weights; with gradient unless called under ``torch.no_grad``."""

Backward = Callable[[Tensor, bool], None]
"""(micro-batch loss, is_last_micro_batch) -> None; lets FSDP skip gradient sync."""


@dataclass(frozen=True)
class MiniBatch:
    """This rank's contiguous share of one mini-batch, [B, T] per token, no grad."""

    old_logprobs: Tensor | None  # None: the current weights ARE pi_old (see run_minibatch)
    advantages: Tensor  # per token (the sample advantage broadcast over its tokens)
    mask: Tensor  # bool, valid response tokens
    proxy_logprobs: Tensor | None = None  # -inf where filtered, if the algorithm needs_proxy
    is_weights: Tensor | None = None  # truncated importance weights
    seed: int = 0  # for random selections (Clip-Cov): the same on every rank
    # With old_logprobs None, pi_old is only known in the training forward; these
    # give the importance weight pi_old / pi_behaviour computed there (the engine's
    # numerics differ from the learner's: vLLM, SGLang, another dtype).
    behaviour_logprobs: Tensor | None = None
    off_policy: str = "none"  # learner.off_policy: the truncation of that weight
    is_cap: float = 0.0


def _backward(loss: Tensor, last: bool) -> None:
    loss.backward()


def global_normalisers(mask: Tensor, all_gather: AllGather) -> tuple[float, float]:
    """(valid tokens, sequences with at least one valid token) over all ranks."""
    local = torch.stack([mask.sum(), mask.any(dim=-1).sum()]).to(torch.float64)
    num_tokens, num_seqs = global_sums(local, all_gather).tolist()
    return num_tokens, num_seqs


def micro_slices(num_rows: int, micro_batch_size: int, given: list[slice] | None = None) -> list[slice]:
    """The micro-batches of a share: ``given`` (consecutive slices covering it, e.g. sized
    by a token budget) or runs of ``micro_batch_size`` rows."""
    if given is not None:
        if [r for sl in given for r in range(sl.start, sl.stop)] != list(range(num_rows)):
            raise ValueError(f"micro-batch slices must cover rows 0..{num_rows - 1} in order, got {given}")
        return given
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return [slice(i, min(i + micro_batch_size, num_rows)) for i in range(0, num_rows, micro_batch_size)]


def select_minibatch(
    algo: Algorithm, batch: MiniBatch, forward: Forward, *, micro_batch_size: int,
    all_gather: AllGather, rank: int, current: tuple[Tensor, Tensor | None] | None = None,
    slices: list[slice] | None = None,
) -> Tensor:
    """int8 codes [B, T] from one global ``select`` over the whole mini-batch.

    ``current`` = (log-probs, entropy) already computed with the current weights
    (e.g. pi_old's on the first mini-batch) skips the no-grad pass."""
    B = batch.mask.shape[0]
    if current is None:
        with torch.no_grad():
            outs = [forward(sl) for sl in micro_slices(B, micro_batch_size, slices)]
        lp = torch.cat([o[0] for o in outs]) if outs else batch.old_logprobs
        ent = torch.cat([o[1] for o in outs]) if algo.needs_entropy and outs else None
    else:
        lp, ent = current
    m = batch.mask
    codes = algo.select(SelectInputs(
        logprobs=lp[m], old_logprobs=(lp if batch.old_logprobs is None else batch.old_logprobs)[m],
        advantages=batch.advantages[m],
        entropy=None if ent is None else ent[m],
        proxy_logprobs=None if batch.proxy_logprobs is None else batch.proxy_logprobs[m], rank=rank,
        seed=batch.seed,
    ), all_gather)
    selected = torch.zeros(m.shape, dtype=torch.int8, device=m.device)
    selected[m] = codes
    return selected


def run_minibatch(
    algo: Algorithm, batch: MiniBatch, forward: Forward, *, micro_batch_size: int,
    all_gather: AllGather, rank: int, max_len: float = 0.0, backward: Backward = _backward,
    current: tuple[Tensor, Tensor | None] | None = None, slices: list[slice] | None = None,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Accumulate this rank's gradient for one mini-batch.

    Returns (metrics summed over this rank's micro-batches — sum them over ranks too —,
    the selection codes [B, T] or None). ``max_len`` is the run's max response length,
    needed by ``seq-mean-token-sum-norm``. Every rank must call this the same number
    of times (select and the normalisers are collectives), even with an empty share.

    ``current``: (log-probs, entropy) of the whole share under the current weights,
    when the caller already has them; selection then needs no extra pass.
    ``batch.old_logprobs`` None means the current weights are pi_old (one optimiser
    step per rollout batch): pi_old's log-probs are then the detached log-probs of
    the training forward itself, which saves the separate no-grad pass.
    """
    if batch.old_logprobs is None and algo.needs_selection and current is None:
        raise ValueError("old_logprobs=None needs `current` when the algorithm selects tokens")
    B = batch.mask.shape[0]
    starts = micro_slices(B, micro_batch_size, slices)
    num_tokens, num_seqs = global_normalisers(batch.mask, all_gather)
    selected = None
    if algo.needs_selection:
        selected = select_minibatch(algo, batch, forward, micro_batch_size=micro_batch_size,
                                    all_gather=all_gather, rank=rank, current=current, slices=starts)
    metrics: dict[str, Tensor] = {}
    for n, rows in enumerate(starts):
        lp, ent = forward(rows)
        old = lp.detach() if batch.old_logprobs is None else batch.old_logprobs[rows]
        is_w = None if batch.is_weights is None else batch.is_weights[rows]
        if batch.old_logprobs is None and batch.behaviour_logprobs is not None:
            is_w = behaviour_weights(old, batch.behaviour_logprobs[rows], batch.mask[rows], batch.off_policy,
                                     batch.is_cap)
        loss, m = algo.loss(LossInputs(
            logprobs=lp, old_logprobs=old, advantages=batch.advantages[rows],
            mask=batch.mask[rows], num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len,
            entropy=ent,
            proxy_logprobs=None if batch.proxy_logprobs is None else batch.proxy_logprobs[rows],
            selected=None if selected is None else selected[rows],
            is_weights=is_w,
        ))
        backward(loss, n == len(starts) - 1)
        m = {"loss/total": loss.detach(), **m}
        for k, v in m.items():
            metrics[k] = metrics[k] + v if k in metrics else v
    return metrics, selected
