"""Fused lm_head + log-softmax kernels: per-token log-probs, entropy, min-p proxy.

The learner needs log pi(y) (with gradient), the entropy (metric or bonus) and
the Lp-Reg min-p proxy log-prob, without ever materialising [tokens, vocab]
logits. Two implementations share one set of mathematics:

- `triton_impl`: Triton kernels, used when `hidden` is on CUDA;
- `torch_chunked`: a chunked pure-PyTorch twin, used on CPU and as fallback.

The implementation is chosen by device; `impl="torch" | "triton"` or the
environment variable ASYNCRL_KERNELS_IMPL forces one (tests, debugging).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from asyncrl.kernels import torch_chunked
from asyncrl.kernels.torch_chunked import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "token_logprobs", "token_proxy_logprobs"]

log = logging.getLogger(__name__)

_IMPLS = ("torch", "triton")
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _pick_impl(hidden: torch.Tensor, impl: str | None):
    """Return the implementation module for `hidden`'s device (or the forced one)."""
    name = impl or os.environ.get("ASYNCRL_KERNELS_IMPL") or None
    if name is None:
        name = "triton" if (hidden.is_cuda and _HAS_TRITON) else "torch"
    if name not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS} (or unset to choose by device), got {name!r}")
    if name == "torch":
        return torch_chunked
    if not _HAS_TRITON:
        raise RuntimeError("impl='triton' requested but triton is not installed; use impl='torch'")
    # Imported lazily: TRITON_INTERPRET must be set before the kernels are defined.
    from asyncrl.kernels import triton_impl

    return triton_impl


def _check(hidden, weight, targets, temperature):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets [N={hidden.shape[0]}], got {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


class _TokenLogprobs(torch.autograd.Function):
    """Autograd wrapper: saves only O(N) state (lse, entropy) and recomputes in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, mod):
        lp, lse, ent = mod.forward(hidden, weight, targets, temperature, with_entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, ent if with_entropy else None)
        ctx.temperature, ctx.with_entropy, ctx.mod = temperature, with_entropy, mod
        ctx.set_materialize_grads(False)
        if ent is None:
            return lp, torch.zeros_like(lp)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        if grad_lp is None and (grad_ent is None or not ctx.with_entropy):
            return None, None, None, None, None, None
        valid = targets != IGNORE_INDEX
        grad_lp = torch.zeros_like(lse) if grad_lp is None else torch.where(valid, grad_lp.float(), 0.0)
        if ctx.with_entropy and grad_ent is not None:
            grad_ent = torch.where(valid, grad_ent.float(), 0.0)
        else:
            grad_ent = None
        dx, dw = ctx.mod.backward(hidden, weight, targets, lse, ent, grad_lp, grad_ent, ctx.temperature)
        return (dx if ctx.needs_input_grad[0] else None,
                dw if ctx.needs_input_grad[1] else None, None, None, None, None)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0, with_entropy: bool = False, impl: str | None = None):
    """Log-prob of each target under softmax(hidden @ weight^T / T), without [N, V] logits.

    hidden [N, D], weight [V, D] (any float dtype), targets [N] int (-100 = ignore).
    Returns (logprobs [N] float32, entropy [N] float32 or None). Both outputs are
    differentiable w.r.t. hidden and weight; ignored positions give 0 and no gradient.
    """
    _check(hidden, weight, targets, temperature)
    mod = _pick_impl(hidden, impl)
    lp, ent = _TokenLogprobs.apply(hidden, weight, targets, float(temperature), bool(with_entropy), mod)
    return lp, (ent if with_entropy else None)


@torch.no_grad()
def token_proxy_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         kappa: float, temperature: float = 1.0, impl: str | None = None):
    """Lp-Reg min-p proxy log-prob of each target (forward only), float32 [N].

    Keep set K = {v : z_v >= max(z) + ln(kappa)} on raw logits z = hidden @ weight^T;
    proxy = log softmax over K of z / T at the target, -inf if the target is not in K,
    0 at ignored positions. kappa=0 keeps everything, kappa=1 only the argmax ties.
    """
    _check(hidden, weight, targets, temperature)
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(f"kappa must be in [0, 1], got {kappa}")
    mod = _pick_impl(hidden, impl)
    return mod.proxy_logprobs(hidden, weight, targets, float(kappa), float(temperature))
