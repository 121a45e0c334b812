"""GRPO loss and group advantages against float64 loop oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asyncrl.algos import build_algorithm, compute_advantages
from asyncrl.algos.base import LossInputs
from asyncrl.algos.config import GRPOConfig

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def oracle_grpo(lp, old, adv, mask, isw, *, lo, hi, agg, n_tok, n_seq, max_len):
    loss, grad = 0.0, np.zeros_like(lp)
    for b in range(lp.shape[0]):
        length = mask[b].sum()
        for t in range(lp.shape[1]):
            if not mask[b, t]:
                continue
            w = {"token-mean": 1 / n_tok, "seq-mean-token-mean": 1 / (length * n_seq),
                 "seq-mean-token-sum": 1 / n_seq, "seq-mean-token-sum-norm": 1 / (n_seq * max_len)}[agg]
            a, r = adv[b, t], math.exp(lp[b, t] - old[b, t])
            c = min(max(r, 1 - lo), 1 + hi)
            val = max(-a * r, -a * c)
            g = -a * r if -a * r >= -a * c else 0.0
            loss += w * isw[b, t] * val
            grad[b, t] = w * isw[b, t] * g
    return loss, grad


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("with_is", [False, True])
def test_grpo_matches_oracle(agg, with_is):
    rng = np.random.default_rng(0)
    B, T = 5, 7
    mask = np.arange(T)[None, :] < rng.integers(0, T + 1, size=B)[:, None]
    lp = np.log(rng.uniform(0.01, 1, size=(B, T)))
    old = lp + rng.normal(0, 0.4, size=(B, T))
    old[0, 0] = 1e3  # padding with a huge ratio must not poison the gradient
    mask[0, 0] = False
    adv = np.repeat(rng.normal(size=(B, 1)), T, 1)
    isw = rng.uniform(0.2, 2.0, size=(B, T)) if with_is else np.ones((B, T))
    # global normalisers as if this were one micro-batch of a bigger mini-batch
    n_tok, n_seq, max_len = 40.0, 9.0, 12.0
    algo = build_algorithm(GRPOConfig(clip_low=0.2, clip_high=0.28, agg=agg))
    lp_t = torch.tensor(lp, requires_grad=True)
    x = LossInputs(logprobs=lp_t, old_logprobs=torch.tensor(old), advantages=torch.tensor(adv),
                   mask=torch.tensor(mask), num_tokens=n_tok, num_seqs=n_seq, max_len=max_len,
                   is_weights=torch.tensor(isw) if with_is else None)
    loss, metrics = algo.loss(x)
    loss.backward()
    want, want_grad = oracle_grpo(lp, old, adv, mask, isw, lo=0.2, hi=0.28, agg=agg,
                                  n_tok=n_tok, n_seq=n_seq, max_len=max_len)
    np.testing.assert_allclose(loss.item(), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lp_t.grad.numpy(), want_grad, rtol=1e-10, atol=1e-12)
    r = np.exp(lp - old)
    a = adv
    clipped = mask & (-a * np.clip(r, 0.8, 1.28) > -a * r)
    np.testing.assert_allclose(metrics["loss/clip_frac"].item(), clipped.sum() / n_tok, rtol=1e-12)
    np.testing.assert_allclose(metrics["loss/approx_kl"].item(), (old - lp)[mask].sum() / n_tok, rtol=1e-12)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_sum_norm_needs_max_len():
    algo = build_algorithm(GRPOConfig(agg="seq-mean-token-sum-norm"))
    z = torch.zeros(1, 2)
    x = LossInputs(logprobs=z, old_logprobs=z, advantages=z, mask=z > -1, num_tokens=2, num_seqs=1)
    with pytest.raises(ValueError, match="max_len"):
        algo.loss(x)


def test_advantages():
    rng = np.random.default_rng(0)
    r = rng.integers(0, 2, size=(4, 5)).astype(np.float64)
    r[1] = 1.0  # a constant group: advantages 0
    got = compute_advantages(torch.tensor(r), scale=True).numpy()
    got_dr = compute_advantages(torch.tensor(r), scale=False).numpy()
    for g in range(4):
        mean = sum(r[g]) / 5
        std = math.sqrt(sum((v - mean) ** 2 for v in r[g]) / 4)
        for i in range(5):
            assert got[g, i] == pytest.approx((r[g, i] - mean) / (std + 1e-6), abs=1e-12)
            assert got_dr[g, i] == pytest.approx(r[g, i] - mean, abs=1e-12)
    single = torch.tensor([[0.5], [-2.0]], dtype=torch.float64)
    # a group of one: mean 0, std 1, so r / (1 + 1e-6) with the std scaling, r without (exactly)
    assert torch.equal(compute_advantages(single, scale=True), single / (1 + 1e-6))
    assert torch.equal(compute_advantages(single, scale=False), single)
