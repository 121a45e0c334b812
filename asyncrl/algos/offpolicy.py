"""Behaviour-policy corrections and the train-inference mismatch, as pure functions.

The behaviour policy is whatever sampled the tokens: the engine's numerics (vLLM or
SGLang kernels in bf16, or the hf engine) at the version each token records. The
learner's pi_old is its own recomputation. They differ for two reasons: staleness
(older weights, asynchronous runs) and numerics (another engine, another dtype), and
:func:`behaviour_weights` corrects both.
"""

from __future__ import annotations

import torch
from torch import Tensor

OffPolicy = str  # "decoupled" | "tis" | "none" (learner.off_policy)


def behaviour_weights(old: Tensor, behaviour: Tensor, mask: Tensor, mode: OffPolicy, cap: float) -> Tensor | None:
    """Per-token importance weight pi_old / pi_behaviour, 0 on padding.

    decoupled (decoupled PPO): the weight as is, but tokens whose weight exceeds ``cap``
    (or is not finite) are dropped (weight 0); tis: truncated at ``cap``; none: no
    weight (the PPO ratio is taken against the behaviour log-probs instead).
    A select, not a product: ``w * (w <= cap)`` would turn a dropped inf into NaN."""
    if mode == "none":
        return None
    w = torch.exp(old - behaviour)
    if mode == "tis":
        w = w.clamp(max=cap)
        keep = mask & ~torch.isnan(w)
    else:
        keep = mask & (w <= cap)  # False for inf and NaN
    return torch.where(keep, w, torch.zeros_like(w))


def mismatch_stats(learner: Tensor, behaviour: Tensor, mask: Tensor) -> Tensor:
    """float64 [sum of k3, max |lp_learner - lp_behaviour|, valid tokens] over ``mask``.

    k3 estimates KL(pi_behaviour || pi_learner) from tokens sampled by the behaviour
    policy: with log r = lp_learner - lp_behaviour, ``k3 = exp(log r) - 1 - log r``
    (unbiased, >= 0). Sums, so the caller can add them over ranks before dividing."""
    d = torch.where(mask, learner.double() - behaviour.double(), torch.zeros((), dtype=torch.float64,
                                                                                device=mask.device))
    k3 = torch.expm1(d) - d
    return torch.stack([k3.sum(), d.abs().max() if d.numel() else d.new_zeros(()), mask.sum().double()])
