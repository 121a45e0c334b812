"""Lp-Reg loss and selection against a float64 oracle written from docs/lpreg.md 2-3, 5.2
with plain loops (it does not call the implementation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asyncrl.algos.lpreg import REG_NEG, SCREENED_NEG, lpreg_loss

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def oracle_selection(lp, adv, mask, proxy, rho, sign):
    """Set of (b, t) regularised for the advantage sign ``sign`` (+1/-1), and the
    screened set: k = floor(rho*N) lowest lp (never rounded up), ties to the earlier token."""
    B, T = lp.shape
    cands = [(lp[b, t], b * T + t, b, t) for b in range(B) for t in range(T)
             if mask[b, t] and sign * adv[b, t] > 0]
    if rho == 0 or not cands:
        return set(), set()
    k = math.floor(rho * len(cands))
    cands.sort(key=lambda c: (c[0], c[1]))
    screened = {(b, t) for _, _, b, t in cands[:k]}
    return {(b, t) for (b, t) in screened if lp[b, t] < proxy[b, t]}, screened


def oracle_weights(mask, agg, max_len):
    """d(loss)/d(per-token loss) for each aggregation mode."""
    B, T = mask.shape
    n_tok = mask.sum()
    n_seq = sum(1 for b in range(B) if mask[b].any())
    w = np.zeros((B, T))
    for b in range(B):
        length = mask[b].sum()
        for t in range(T):
            if not mask[b, t]:
                continue
            if agg == "token-mean":
                w[b, t] = 1.0 / n_tok
            elif agg == "seq-mean-token-mean":
                w[b, t] = 1.0 / (length * n_seq)
            elif agg == "seq-mean-token-sum":
                w[b, t] = 1.0 / n_seq
            else:
                w[b, t] = 1.0 / (n_seq * max_len)
    return w


def oracle_lpreg(lp, old, proxy, adv, mask, *, rho, rho_pos, beta, lo, hi, agg, max_len):
    """(loss, d loss / d lp, regularised set, screened count)."""
    reg_n, scr_n = oracle_selection(lp, adv, mask, proxy, rho, -1)
    reg_p, scr_p = oracle_selection(lp, adv, mask, proxy, rho_pos, +1)
    reg = reg_n | reg_p
    w = oracle_weights(mask, agg, max_len)
    loss, grad = 0.0, np.zeros_like(lp)
    B, T = lp.shape
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            a, r = adv[b, t], math.exp(lp[b, t] - old[b, t])
            if (b, t) in reg:
                d = proxy[b, t] - lp[b, t]
                kl = math.exp(d) - d - 1
                val = -a * r + beta * min(max(kl, -10.0), 10.0)
                g = -a * r + (beta * (1 - math.exp(d)) if -10 < kl < 10 else 0.0)
            else:
                c = min(max(r, 1 - lo), 1 + hi)
                val = max(-a * r, -a * c)
                g = -a * r if -a * r >= -a * c else 0.0
            loss += w[b, t] * val
            grad[b, t] = w[b, t] * g
    return loss, grad, reg, len(scr_n) + len(scr_p)


def random_batch(seed, B=6, T=9, p_filtered=0.2):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[2] = 0  # a padding-only row
    mask = np.arange(T)[None, :] < lengths[:, None]
    lp = np.log(rng.uniform(0.01, 1.0, size=(B, T)))
    old = lp + rng.normal(0, 0.3, size=(B, T))
    proxy = lp + rng.normal(0, 1.0, size=(B, T))
    proxy[rng.uniform(size=(B, T)) < p_filtered] = -np.inf
    adv = np.repeat(rng.normal(0, 1, size=(B, 1)), T, axis=1)
    return lp, old, proxy, adv, mask


def run_impl(lp, old, proxy, adv, mask, **kw):
    lp_t = torch.tensor(lp, requires_grad=True)
    loss, metrics = lpreg_loss(lp_t, torch.tensor(old), torch.tensor(proxy), torch.tensor(adv),
                               torch.tensor(mask), **kw)
    loss.backward()
    return loss.item(), lp_t.grad.numpy(), metrics


def check(lp, old, proxy, adv, mask, *, rho, rho_pos=0.0, beta=1.0, lo=0.2, hi=0.28,
          agg="token-mean", max_len=16.0):
    want, want_grad, reg, n_scr = oracle_lpreg(lp, old, proxy, adv, mask, rho=rho, rho_pos=rho_pos,
                                               beta=beta, lo=lo, hi=hi, agg=agg, max_len=max_len)
    got, got_grad, m = run_impl(lp, old, proxy, adv, mask, rho=rho, rho_pos=rho_pos, beta=beta,
                                clip_low=lo, clip_high=hi, agg=agg, max_len=max_len)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-9, atol=1e-10)
    assert m["lpreg/regularised"].item() == len(reg)
    assert m["lpreg/screened"].item() == n_scr
    np.testing.assert_allclose((m["loss/pg"] + m["lpreg/kl"]).item(), want, rtol=1e-9, atol=1e-10)
    return reg, m


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_oracle_random(seed, agg):
    reg, _ = check(*random_batch(seed), rho=0.3, rho_pos=0.2, beta=0.7, agg=agg)
    assert reg, "the random batch should regularise something"


def test_reference_clip_and_kl_sum():
    lp, old, proxy, adv, mask = random_batch(3)
    reg, m = check(lp, old, proxy, adv, mask, rho=0.5, beta=1.0, lo=1.0, hi=9.0)
    k3 = [min(math.exp(proxy[b, t] - lp[b, t]) - (proxy[b, t] - lp[b, t]) - 1, 10.0) for b, t in reg]
    np.testing.assert_allclose(m["lpreg/kl_sum"].item(), sum(k3), rtol=1e-12)


def test_no_negative_advantage_tokens_is_plain_grpo():
    lp, old, proxy, adv, mask = random_batch(4)
    adv = np.abs(adv)
    reg, m = check(lp, old, proxy, adv, mask, rho=0.5)
    assert not reg and m["lpreg/screened"].item() == 0


def test_every_selected_token_filtered():
    lp, old, proxy, adv, mask = random_batch(5)
    proxy[:] = -np.inf
    reg, m = check(lp, old, proxy, adv, mask, rho=0.5)
    assert not reg and m["lpreg/screened"].item() > 0


def test_k_is_floor_never_rounded_up():
    """contract 5.2: k = floor(rho * N_neg); rho * N_neg < 1 selects nothing."""
    lp, old, proxy, adv, mask = random_batch(6, p_filtered=0.0)
    proxy[:] = 0.0  # every token is below its proxy
    adv[:] = -1.0
    n_neg = int(mask.sum())
    reg, m = check(lp, old, proxy, adv, mask, rho=0.99 / n_neg)  # rho * N_neg = 0.99
    assert not reg and m["lpreg/screened"].item() == 0
    reg, m = check(lp, old, proxy, adv, mask, rho=1.5 / n_neg)  # floor(1.5) = 1
    assert len(reg) == 1 and m["lpreg/screened"].item() == 1
    (b, t), = reg
    assert lp[b, t] == lp[mask].min()


def test_ties_at_threshold_go_to_earlier_tokens():
    lp = np.full((2, 4), -1.0)
    lp[1, 0] = -3.0  # the unique lowest
    mask = np.ones((2, 4), dtype=bool)
    adv = -np.ones((2, 4))
    proxy = np.zeros((2, 4))
    proxy[0, 1] = -np.inf  # second tied token is filtered: screened, not regularised
    old = lp.copy()
    # k = floor(0.5 * 8) = 4: (1,0), then the tied -1.0 tokens in order (0,0), (0,1), (0,2)
    reg, m = check(lp, old, proxy, adv, mask, rho=0.5)
    assert reg == {(1, 0), (0, 0), (0, 2)}
    assert m["lpreg/screened"].item() == 4


def test_random_ties_match_oracle():
    lp, old, proxy, adv, mask = random_batch(7, B=8, T=12)
    lp = np.round(lp)  # few distinct values: many ties
    proxy = np.where(np.isinf(proxy), proxy, lp + 0.5)
    check(lp, old, proxy, adv, mask, rho=0.37, rho_pos=0.11)


def test_padding_only_batch_is_zero():
    lp, old, proxy, adv, mask = random_batch(8)
    mask[:] = False
    loss, grad, m = run_impl(lp, old, proxy, adv, mask, rho=0.5, beta=1.0, clip_low=0.2, clip_high=0.2)
    assert loss == 0.0 and not grad.any() and m["lpreg/screened"].item() == 0


def test_codes_from_select():
    from asyncrl.algos.base import SelectInputs
    from asyncrl.algos.lpreg import lpreg_select
    from asyncrl.algos.selection import local_all_gather

    lp = torch.tensor([-5.0, -4.0, -1.0, -6.0, -4.5])
    x = SelectInputs(logprobs=lp, old_logprobs=lp, advantages=torch.tensor([-1.0, -1.0, -1.0, 1.0, -1.0]),
                     entropy=None, proxy_logprobs=torch.tensor([-1.0, -9.0, 0.0, 0.0, -4.5]))
    codes = lpreg_select(x, local_all_gather, rho=0.75, rho_pos=0.0)  # k = 3 of 4 negatives
    assert codes.dtype == torch.int8
    # lp == proxy is not strictly below: screened, not regularised
    assert codes.tolist() == [REG_NEG, SCREENED_NEG, 0, 0, SCREENED_NEG]


def test_k3_is_clamped_at_ten():
    """contract 3.3: k3 = clamp(exp(d) - d - 1, -10, 10), d = lp_proxy - lp; past the
    clamp the KL term has no gradient (the reference's low_var_kl)."""
    from asyncrl.algos.lpreg.loss import k3

    lp = torch.tensor([-0.5, -4.0, -12.0], dtype=torch.float64, requires_grad=True)
    proxy = torch.tensor([-0.2, -0.1, -0.1], dtype=torch.float64)
    got = k3(lp, proxy)
    d = (proxy - lp).detach()
    want = torch.clamp(torch.exp(d) - d - 1, max=10.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert got[1] == 10.0 and got[2] == 10.0 and got[0] < 10.0
    got.sum().backward()
    assert lp.grad[1] == 0 and lp.grad[2] == 0 and lp.grad[0] == pytest.approx(-(math.exp(d[0]) - 1), rel=1e-12)
