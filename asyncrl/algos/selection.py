"""Global token selection over a whole mini-batch, across micro-batches and ranks.

Algorithms that regularise "the k tokens of the mini-batch with the lowest X"
(Lp-Reg, 80/20, KL-Cov, Clip-Cov) all reduce to :func:`global_lowest`. Doing it
once per mini-batch, over every rank, makes the chosen set independent of the
micro-batch size and of the world size (docs/lpreg.md 5.2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from asyncrl.algos.base import AllGather


def local_all_gather(t: Tensor) -> Tensor:
    """The ``all_gather`` of a single process: the identity."""
    return t


def num_selected(fraction: float, total: int, *, at_least_one: bool) -> int:
    """``floor(fraction * total)``, raised to 1 when ``at_least_one`` and there is
    anything to select (the covariance and entropy baselines' ``max(1, int(r*N))``).
    Lp-Reg passes ``at_least_one=False``: its contract is ``k = floor(rho * N_neg)``,
    so a mini-batch with ``rho * N_neg < 1`` regularises nothing."""
    if fraction <= 0.0 or total <= 0:
        return 0
    k = math.floor(fraction * total)
    return max(k, 1) if at_least_one else k


def global_sums(values: Tensor, all_gather: AllGather) -> Tensor:
    """Sum of a small 1-D float tensor over ranks (float64, rank order)."""
    v = values.to(torch.float64).reshape(-1)
    return all_gather(v).reshape(-1, v.numel()).sum(dim=0)


def global_lowest(
    values: Tensor, candidates: Tensor, fraction: float, all_gather: AllGather, rank: int, *,
    at_least_one: bool,
) -> Tensor:
    """Mark this rank's tokens among the ``k`` lowest ``values`` over all ranks'
    candidates, ``k = num_selected(fraction, number of candidates)``; see :func:`lowest_k`."""
    total = int(all_gather(candidates.sum().reshape(1).to(torch.int64)).sum())
    return lowest_k(values, candidates, num_selected(fraction, total, at_least_one=at_least_one),
                    all_gather, rank)


def global_uniform(seed: int, n: int, all_gather: AllGather, rank: int, device: torch.device) -> Tensor:
    """float64 priorities in [0, 1) for this rank's ``n`` tokens: element ``offset + i``
    of one uniform stream seeded by ``seed``, where ``offset`` is this rank's place in
    the global token order. A token's draw depends only on the seed and its global
    position, so a random pick made with it (:func:`lowest_k` over the priorities) is
    reproducible and the same for any micro-batch size or world size."""
    counts = all_gather(torch.tensor([n], dtype=torch.int64, device=device))
    total, offset = int(counts.sum()), int(counts[:rank].sum())
    stream = torch.rand(total, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return stream[offset : offset + n].to(device)


def lowest_k(values: Tensor, candidates: Tensor, k: int, all_gather: AllGather, rank: int) -> Tensor:
    """Mark this rank's tokens among the ``k`` lowest ``values`` over all ranks' candidates.

    ``values`` [N] and ``candidates`` [N] bool are this rank's tokens in global token
    order; ``all_gather`` concatenates 1-D tensors (of possibly different lengths)
    across ranks in rank order and ``rank`` is this rank's place in that order. ``k``
    must be the same on every rank (it is capped by the number of candidates). Ties
    are broken by global token order (earlier wins), so the result is deterministic.
    Returns a bool mask [N].
    """
    local = values[candidates]  # (n_r,) this rank's candidates, in token order
    counts = all_gather(torch.tensor([local.numel()], dtype=torch.int64, device=values.device))
    out = torch.zeros_like(candidates)
    if k <= 0 or int(counts.sum()) == 0:
        return out
    gathered = all_gather(local.contiguous())  # (total,) global candidate order
    # stable sort: equal values keep their global order, so ties go to earlier tokens
    chosen = torch.sort(gathered, stable=True).indices[:k]
    offset = int(counts[:rank].sum())
    mine = chosen[(chosen >= offset) & (chosen < offset + local.numel())] - offset
    hit = torch.zeros(local.numel(), dtype=torch.bool, device=values.device)
    hit[mine] = True
    out[candidates] = hit
    return out
