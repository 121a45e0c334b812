"""The ``all_gather`` that ``Algorithm.select`` expects, over torch.distributed.

Ranks may hold different numbers of tokens, so this gathers the lengths first,
pads to the longest, gathers, and trims: the result is the rank-order
concatenation of every rank's 1-D tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from asyncrl.algos.base import AllGather


def dist_all_gather(group: dist.ProcessGroup | None = None) -> AllGather:
    """An ``AllGather`` over ``group`` (default: the world)."""

    def gather(t: Tensor) -> Tensor:
        world = dist.get_world_size(group)
        t = t.reshape(-1).contiguous()
        n = torch.tensor([t.numel()], dtype=torch.int64, device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n, group=group)
        lengths = [int(s) for s in sizes]
        if max(lengths) == 0:
            return t[:0]
        padded = torch.zeros(max(lengths), dtype=t.dtype, device=t.device)
        padded[: t.numel()] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:k] for p, k in zip(parts, lengths)])

    return gather
