"""RMSNorm as one autograd function, for the decoders whose norm is ``weight * x / rms(x)``.

Hugging Face's RMSNorm is five tensor ops forward, and autograd runs about a dozen
backward; on CPU, where the quickstart's tokens are [~1200, 128] per micro-batch, that
is memory traffic and dispatch, not arithmetic: 2.0 ms forward and backward per norm,
against 1.2 ms here (a Qwen3 layer has four; the training step: ``benchmarks/learner_ab.py``).
The backward is the closed form

    y = w * x * r,  r = 1 / sqrt(mean(x^2) + eps),  x_hat = x * r
    dx = r * (g w - x_hat * mean(g w x_hat)),  dw = sum over tokens of g * x_hat

:func:`fuse_rms_norms` swaps it in for the norms of a loaded model whose parameters
and inputs are float32 or float64. Other dtypes keep Hugging Face's forward: in bf16
it rounds the normalised activations before the weight multiplies them, which this
function does not mimic. (HF's forward also computes float64 inputs in float32; here a
float64 model is float64 throughout, which is what the float64 oracles want.)
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

# transformers' classes with exactly that forward (Gemma's norm scales by 1 + w: not one)
FUSABLE = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
DTYPES = (torch.float32, torch.float64)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        r = torch.rsqrt(torch.mean(x * x, -1, keepdim=True).add_(eps))
        x_hat = x * r
        ctx.save_for_backward(x_hat, r, weight)
        return x_hat * weight

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_hat, r, weight = ctx.saved_tensors
        gw = g * weight
        dw = (g * x_hat).reshape(-1, weight.shape[0]).sum(0) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dot = torch.mean(gw * x_hat, -1, keepdim=True)
            dx = torch.addcmul(gw, x_hat, dot, value=-1).mul_(r)
        return dx, dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return RMSNormFunction.apply(x, weight, eps)


def _fused_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    if hidden_states.dtype in DTYPES and self.weight.dtype == hidden_states.dtype:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def fuse_rms_norms(model: nn.Module) -> int:
    """Route every fusable RMSNorm of ``model`` through :class:`RMSNormFunction` (the
    module, its parameter and its state-dict name stay as they are); returns how many."""
    n = 0
    for module in model.modules():
        if type(module).__name__ in FUSABLE and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
