"""Baselines (GSPO, entropy bonus, 80/20, KL-Cov, Clip-Cov, Clip-Higher, Dr.GRPO)
against float64 loop oracles written from each paper's formula, single rank."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
import torch

from asyncrl.algos import build_algorithm
from asyncrl.algos.config import AlgoConfig
from asyncrl.algos.grpo import GRPO
from asyncrl.algos.minibatch import MiniBatch, run_minibatch
from asyncrl.algos.selection import local_all_gather


def problem(seed, B=6, T=8):
    rng = np.random.default_rng(seed)
    mask = np.arange(T)[None, :] < rng.integers(1, T + 1, size=B)[:, None]
    mask[1] = False  # a padding-only row
    lp = np.log(rng.uniform(0.02, 1, size=(B, T)))
    old = lp + rng.normal(0, 0.3, size=(B, T))
    adv = np.repeat(rng.normal(size=(B, 1)), T, 1)
    ent = rng.uniform(0, 3, size=(B, T))
    return lp, old, adv, mask, ent


def run(cfg, lp, old, adv, mask, ent, micro=2, seed=0):
    algo = build_algorithm(msgspec.convert(cfg, AlgoConfig))
    lp_t = torch.tensor(lp, requires_grad=True)
    ent_t = torch.tensor(ent, requires_grad=True)
    batch = MiniBatch(old_logprobs=torch.tensor(old), advantages=torch.tensor(adv), mask=torch.tensor(mask),
                      seed=seed)
    metrics, codes = run_minibatch(algo, batch, lambda r: (lp_t[r], ent_t[r]), micro_batch_size=micro,
                                   all_gather=local_all_gather, rank=0)
    return metrics["loss/total"].item(), lp_t.grad.numpy(), ent_t.grad, codes


def valid(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def ppo(a, r, lo, hi):
    """(value, d value / d lp) of max(-A r, -A clip(r))."""
    c = min(max(r, 1 - lo), 1 + hi)
    return (-a * r, -a * r) if -a * r >= -a * c else (-a * c, 0.0)


def top_k(keys, k):
    """The k tokens with the largest key, ties to the earlier token (keys: list of (key, (b, t)))."""
    return {bt for _, bt in sorted(keys, key=lambda kv: (-kv[0], kv[1]))[:k]}


def test_gspo():
    lp, old, adv, mask, ent = problem(0)
    lo, hi = 0.02, 0.03
    got, grad, _, _ = run({"type": "gspo", "clip_low": lo, "clip_high": hi}, lp, old, adv, mask, ent)
    seqs = [b for b in range(mask.shape[0]) if mask[b].any()]
    want, want_grad = 0.0, np.zeros_like(lp)
    for b in seqs:
        ts = [t for t in range(mask.shape[1]) if mask[b, t]]
        s = math.exp(sum(lp[b, t] - old[b, t] for t in ts) / len(ts))
        val, d = ppo(adv[b, 0], s, lo, hi)  # d = d value / d log s
        want += val / len(seqs)
        for t in ts:
            want_grad[b, t] = d / len(ts) / len(seqs)
    assert got == pytest.approx(want, rel=1e-10)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert (want_grad == 0).any() and (want_grad != 0).any()  # both clipped and unclipped rows


def test_entropy_bonus():
    lp, old, adv, mask, ent = problem(1)
    got, grad, ent_grad, _ = run({"type": "entropy_bonus", "coef": 0.05}, lp, old, adv, mask, ent)
    n = mask.sum()
    want, want_grad = 0.0, np.zeros_like(lp)
    for b, t in valid(mask):
        val, d = ppo(adv[b, t], math.exp(lp[b, t] - old[b, t]), 0.2, 0.2)
        want += (val - 0.05 * ent[b, t]) / n
        want_grad[b, t] = d / n
    assert got == pytest.approx(want, rel=1e-10)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ent_grad.numpy(), np.where(mask, -0.05 / n, 0.0), rtol=1e-12)


@pytest.mark.parametrize("seed,normaliser", [(2, "selected"), (3, "selected"), (2, "all")])
def test_eighty_twenty(seed, normaliser):
    """The reference code divides by the selected tokens (default), TRL by all valid ones."""
    lp, old, adv, mask, ent = problem(seed)
    ent[0, :3] = 2.5  # ties
    got, grad, _, codes = run({"type": "eighty_twenty", "normaliser": normaliser}, lp, old, adv, mask, ent)
    toks = valid(mask)
    k = max(1, math.floor(0.2 * len(toks)))
    n = k if normaliser == "selected" else len(toks)
    keep = top_k([(ent[bt], bt) for bt in toks], k)
    want, want_grad = 0.0, np.zeros_like(lp)
    for b, t in keep:
        val, d = ppo(adv[b, t], math.exp(lp[b, t] - old[b, t]), 0.2, 0.28)
        want += val / n
        want_grad[b, t] = d / n
    assert {tuple(i) for i in (codes != 0).nonzero().tolist()} == keep
    assert got == pytest.approx(want, rel=1e-10)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-12)


def covariances(lp, adv, mask):
    toks = valid(mask)
    ma = sum(adv[bt] for bt in toks) / len(toks)
    ml = sum(lp[bt] for bt in toks) / len(toks)
    return {bt: (adv[bt] - ma) * (lp[bt] - ml) for bt in toks}


def test_kl_cov():
    lp, old, adv, mask, ent = problem(4)
    got, grad, _, codes = run({"type": "kl_cov", "ratio": 0.1, "coef": 0.5}, lp, old, adv, mask, ent)
    cov = covariances(lp, adv, mask)
    n = len(cov)
    sel = top_k([(c, bt) for bt, c in cov.items()], max(1, math.floor(0.1 * n)))
    want, want_grad = 0.0, np.zeros_like(lp)
    for (b, t) in cov:
        a, d = adv[b, t], lp[b, t] - old[b, t]
        val, g = -a * math.exp(d), -a * math.exp(d)  # no clip in KL-Cov
        if (b, t) in sel:
            val, g = val + 0.5 * abs(d), g + 0.5 * math.copysign(1.0, d)
        want += val / n
        want_grad[b, t] = g / n
    assert {tuple(i) for i in (codes != 0).nonzero().tolist()} == sel and len(sel) > 1
    assert got == pytest.approx(want, rel=1e-10)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-12)


def test_clip_cov():
    """k = max(1, floor(ratio*N)) tokens picked at random among the unclipped ones with
    covariance in (lb, ub): the k eligible tokens with the smallest draw of the
    mini-batch seed's uniform stream, indexed by global token position."""
    lp, old, adv, mask, ent = problem(5)
    lb, ub, ratio, seed = 0.1, 1.0, 0.15, 1234
    cfg = {"type": "clip_cov", "ratio": ratio, "cov_lb": lb, "cov_ub": ub, "clip_low": 0.2, "clip_high": 0.2}
    got, grad, _, codes = run(cfg, lp, old, adv, mask, ent, seed=seed)
    cov = covariances(lp, adv, mask)
    n = len(cov)
    draws = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
    eligible = []
    for i, ((b, t), c) in enumerate(cov.items()):  # cov is in global (row-major) token order
        r = math.exp(lp[b, t] - old[b, t])
        clipped = -adv[b, t] * min(max(r, 0.8), 1.2) > -adv[b, t] * r
        if not clipped and lb < c < ub:
            eligible.append((-draws[i], (b, t)))
    sel = top_k(eligible, max(1, math.floor(ratio * n)))
    by_cov = top_k([(cov[bt], bt) for _, bt in eligible], len(sel))
    assert sel != by_cov  # a random pick, not the highest covariances
    other_seed = run(cfg, lp, old, adv, mask, ent, seed=seed + 1)[3]
    assert not torch.equal(other_seed, codes) and int((other_seed != 0).sum()) == len(sel)
    want, want_grad = 0.0, np.zeros_like(lp)
    for (b, t) in cov:
        if (b, t) in sel:
            continue
        val, g = ppo(adv[b, t], math.exp(lp[b, t] - old[b, t]), 0.2, 0.2)
        want += val / n
        want_grad[b, t] = g / n
    assert {tuple(i) for i in (codes != 0).nonzero().tolist()} == sel and len(sel) > 1
    assert len(eligible) > len(sel)  # the ranking mattered
    assert got == pytest.approx(want, rel=1e-10)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-12)


def test_paper_defaults():
    conv = lambda t: msgspec.convert({"type": t}, AlgoConfig)  # noqa: E731
    ch, dr = conv("clip_higher"), conv("dr_grpo")
    assert (ch.clip_low, ch.clip_high, ch.agg) == (0.2, 0.28, "token-mean")
    assert (dr.agg, dr.scale_advantages) == ("seq-mean-token-sum-norm", False)
    assert isinstance(build_algorithm(ch), GRPO) and isinstance(build_algorithm(dr), GRPO)
    g = conv("gspo")
    assert (g.clip_low, g.clip_high, g.agg) == (3e-4, 4e-4, "seq-mean-token-mean")
    k, c = conv("kl_cov"), conv("clip_cov")
    assert (k.ratio, k.coef) == (2e-3, 1.0)
    assert (c.ratio, c.cov_lb, c.cov_ub, c.clip_low, c.clip_high) == (2e-4, 1.0, 5.0, 1.0, 1.0)  # published recipe
    assert conv("eighty_twenty").normaliser == "selected"
    assert build_algorithm(conv("entropy_bonus")).needs_entropy
    e = build_algorithm(conv("eighty_twenty"))
    assert e.needs_entropy and e.needs_selection
    lp = build_algorithm(conv("lpreg"))
    assert lp.needs_proxy and lp.needs_selection and (lp.clip_low, lp.clip_high) == (1.0, 9.0)


def test_invalid_configs_name_the_key():
    for bad, key in [({"type": "lpreg", "rho": 2.0}, "algo.rho"), ({"type": "kl_cov", "ratio": 0.0}, "algo.ratio"),
                     ({"type": "clip_cov", "cov_lb": 5.0, "cov_ub": 1.0}, "algo.cov_lb"),
                     ({"type": "grpo", "clip_low": 1.5}, "algo.clip_low"),
                     ({"type": "eighty_twenty", "agg": "seq-mean-token-mean"}, "algo.normaliser")]:
        with pytest.raises(msgspec.ValidationError, match=key):
            msgspec.convert(bad, AlgoConfig)
    with pytest.raises(msgspec.ValidationError, match="rhoo"):
        msgspec.convert({"type": "lpreg", "rhoo": 0.1}, AlgoConfig)
