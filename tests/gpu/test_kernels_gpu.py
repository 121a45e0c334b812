"""Triton kernels on a real GPU against the float64 dense oracle (bf16 and fp32).

Skipped without CUDA. fp32 inputs use exact fp32 dots, so forward and
gradients must match the oracle to 1e-5 relative (max|x - ref| / max|ref|);
bf16 inputs are compared with the oracle on the bf16-rounded inputs: forward
values 1e-5 (fp32 accumulation of exact bf16 products), gradients 1e-2 (the
logit gradient is rounded to bf16 before the cuBLAS GEMMs, as in dense bf16).
"""

import importlib.util
import math
import pathlib

import pytest
import torch

from asyncrl.kernels import IGNORE_INDEX, token_logprobs, token_proxy_logprobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_spec = importlib.util.spec_from_file_location(
    "_kernel_oracle", pathlib.Path(__file__).resolve().parents[1] / "unit" / "test_kernels.py")
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-2)}  # (forward, gradients)
SHAPES = [(37, 48, 1001), (300, 512, 32007), (64, 896, 151936)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}_D{d}_V{v}" for n, d, v in SHAPES])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_entropy_grads(dtype, shape, temperature):
    n, d, v = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, d, device="cuda", generator=g).to(dtype)
    w = (torch.randn(v, d, device="cuda", generator=g) * (2.0 / math.sqrt(d))).to(dtype)
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    t[::7] = IGNORE_INDEX
    a, b = torch.randn(n, device="cuda", generator=g), torch.randn(n, device="cuda", generator=g)

    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = token_logprobs(h1, w1, t, temperature=temperature, with_entropy=True)
    ((a * lp).sum() + (b * ent).sum()).backward()
    h2, w2 = h.double().requires_grad_(), w.double().requires_grad_()
    lp_ref, ent_ref = oracle.dense_oracle(h2, w2, t, temperature)
    ((a.double() * lp_ref).sum() + (b.double() * ent_ref).sum()).backward()

    fwd_tol, grad_tol = TOL[dtype]
    errs = {"logprobs": oracle.rel_err(lp, lp_ref), "entropy": oracle.rel_err(ent, ent_ref)}
    gerrs = {"dX": oracle.rel_err(h1.grad, h2.grad), "dW": oracle.rel_err(w1.grad, w2.grad)}
    assert h1.grad.dtype == w1.grad.dtype == dtype
    assert all(e <= fwd_tol for e in errs.values()), errs
    assert all(e <= grad_tol for e in gerrs.values()), gerrs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kappa", [0.0, 0.05, 1.0])
def test_proxy(dtype, kappa):
    g = torch.Generator(device="cuda").manual_seed(1)
    n, d, v = 200, 256, 32007
    h = torch.randn(n, d, device="cuda", generator=g).to(dtype)
    w = (torch.randn(v, d, device="cuda", generator=g) * (3.0 / math.sqrt(d))).to(dtype)
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    t[::3] = (h.float() @ w.float().T).argmax(-1)[::3]
    t[1] = IGNORE_INDEX
    out = token_proxy_logprobs(h, w, t, kappa=kappa, temperature=0.9)
    ref = oracle.dense_proxy_oracle(h, w, t, kappa, 0.9)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    keep = ~torch.isinf(ref)
    assert oracle.rel_err(out[keep], ref[keep]) <= 1e-5


def test_deterministic():
    g = torch.Generator(device="cuda").manual_seed(2)
    h = torch.randn(513, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(20011, 256, device="cuda", generator=g, dtype=torch.bfloat16) * 0.1
    t = torch.randint(0, 20011, (513,), device="cuda", generator=g)
    grads = []
    for _ in range(2):
        h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = token_logprobs(h1, w1, t, with_entropy=True)
        (lp.sum() + 0.1 * ent.sum()).backward()
        grads.append((lp, h1.grad, w1.grad))
    for x, y in zip(*grads):
        assert torch.equal(x, y)
