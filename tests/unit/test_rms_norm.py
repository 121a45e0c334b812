"""The one-function RMSNorm (asyncrl.kernels.rms_norm) against float64 oracles and
Hugging Face's own forward."""

from __future__ import annotations

import importlib

import pytest
import torch

from asyncrl.kernels.rms_norm import FUSABLE, fuse_rms_norms, rms_norm
from asyncrl.models import load_model

NORMS = {"LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3"}


def oracle(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The definition, in float64 autograd."""
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def hf_norm(name: str, dim: int, eps: float = 1e-6):
    mod = importlib.import_module(f"transformers.models.{NORMS[name]}.modeling_{NORMS[name]}")
    return getattr(mod, name)(dim, eps=eps)


def test_every_fusable_class_is_checked():
    assert set(NORMS) == FUSABLE


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x, w))


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=["x+w", "x", "w"])
def test_matches_the_float64_oracle(needs):
    g = torch.Generator().manual_seed(1)
    x0, w0 = torch.randn(2, 7, 4, 16, dtype=torch.float64, generator=g), torch.randn(16, dtype=torch.float64, generator=g)
    up = torch.randn(2, 7, 4, 16, dtype=torch.float64, generator=g)
    grads = []
    for fn in (rms_norm, oracle):
        x, w = x0.clone().requires_grad_(needs[0]), w0.clone().requires_grad_(needs[1])
        y = fn(x, w, 1e-5)
        y.backward(up)
        grads.append((y.detach(), x.grad, w.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = grads
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    for got, ref in ((dx, dx_ref), (dw, dw_ref)):
        assert (got is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(NORMS))
def test_fused_module_matches_hugging_face_in_float32(name):
    ref, fused = hf_norm(name, 32), hf_norm(name, 32)
    torch.manual_seed(2)
    with torch.no_grad():
        ref.weight.normal_()
        fused.weight.copy_(ref.weight)
    assert fuse_rms_norms(fused) == 1
    x = torch.randn(3, 11, 32) * 3
    up = torch.randn(3, 11, 32)
    outs = []
    for m in (ref, fused):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(up)
        outs.append((y.detach(), xi.grad, m.weight.grad))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_other_dtypes_keep_hugging_faces_forward():
    ref, fused = hf_norm("Qwen3RMSNorm", 32).to(torch.bfloat16), hf_norm("Qwen3RMSNorm", 32).to(torch.bfloat16)
    fuse_rms_norms(fused)
    x = torch.randn(4, 32).to(torch.bfloat16)
    assert torch.equal(fused(x), ref(x))  # bit for bit: the same code ran


def test_load_model_fuses_every_norm_and_changes_nothing_else():
    from asyncrl.models import resolve_model_path
    from transformers import AutoModelForCausalLM

    model = load_model("builtin:quickstart-base")
    plain = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:quickstart-base"), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    layers = model.config.num_hidden_layers
    assert fuse_rms_norms(plain.__class__(plain.config)) == 4 * layers + 1  # input, post-attention, q, k; final
    assert sum("forward" in vars(m) for m in model.modules()) == 4 * layers + 1
    assert model.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(2, model.config.vocab_size, (2, 9))
    torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
