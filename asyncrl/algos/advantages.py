"""Group-relative outcome advantages (GRPO and Dr.GRPO)."""

from __future__ import annotations

from torch import Tensor


def compute_advantages(rewards: Tensor, scale: bool) -> Tensor:
    """Advantages [G, n] of ``rewards`` [G, n] (G prompt groups of n samples).

    ``scale=True`` (GRPO): ``(r - mean) / (std + 1e-6)`` with the unbiased std of the
    group. ``scale=False`` (Dr.GRPO): ``r - mean``. As in the Lp-Reg reference, a group
    of a single sample has mean 0 and std 1, so its advantage is ``r / (1 + 1e-6)``
    (GRPO) or ``r`` (Dr.GRPO).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, samples], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] == 1:
        return rewards / (1.0 + 1e-6) if scale else rewards.clone()
    mean = rewards.mean(dim=1, keepdim=True)
    if not scale:
        return rewards - mean
    std = rewards.std(dim=1, unbiased=True, keepdim=True)
    return (rewards - mean) / (std + 1e-6)
