"""The packed rows' span attention (shared prompts, ``learner.share_prompts``) on a GPU:
CUDA's sdpa backends on the bucketed, gathered layout equal dense masked attention,
values and gradients, in float32 and bf16 (the CPU tests cover float64)."""

from __future__ import annotations

import pytest
import torch

from asyncrl.learner.attention import plan_span_attention, span_batch_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# a shared 6-token prompt with answers of 3, 17 and 1 tokens, a lone sample, a second
# unit, a padding tail, and one long answer (a call of its own)
SPANS = [(0, 6, 0, 0), (6, 3, 0, 6), (9, 17, 0, 6), (26, 1, 0, 6), (27, 4, 0, 0), (31, 2, 27, 4), (33, 9, 27, 4),
         (42, 300, 27, 4), (342, 10, 0, 0)]


def dense(q, k, v, spans):
    N = q.shape[2]
    allowed = torch.zeros((N, N), dtype=torch.bool, device=q.device)
    for a, n, ca, cn in spans:
        allowed[a:a + n, a:a + n] = torch.ones((n, n), dtype=torch.bool, device=q.device).tril()
        allowed[a:a + n, ca:ca + cn] = True
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.float()).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_span_attention_matches_dense_on_cuda(dtype):
    torch.manual_seed(0)
    N, H, Hkv, d = 352, 8, 2, 64
    q, k, v = (torch.randn(1, h, N, d, device="cuda", dtype=dtype, requires_grad=True) for h in (H, Hkv, Hkv))
    plan = plan_span_attention(SPANS, torch.device("cuda"))
    w = torch.randn(1, N, H, d, device="cuda")
    got = span_batch_attention(q, k, v, plan, 0.0, None)
    want = dense(q, k, v, SPANS)
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, rtol=0, atol=tol)
    grads = torch.autograd.grad((got.float() * w).sum(), (q, k, v))
    refs = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=10 * tol)
