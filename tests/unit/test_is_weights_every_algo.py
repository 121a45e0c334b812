"""Off-policy importance weights (``LossInputs.is_weights``, pi_old / pi_behaviour) in
every registered algorithm, not only GRPO.

For each algorithm the loss is affine in the weights: ``L(w) = R + sum_t w_t c_t``,
where R is the part the weights must not touch (Lp-Reg's KL pull, KL-Cov's penalty,
the entropy bonus) and ``c_t`` is token t's policy-gradient term. Checked in float64:

- ``w = 1`` is the same loss and gradient as no weights at all;
- the loss and the gradient are exactly affine in ``w`` (one-hot weights give c_t);
- ``c_t`` is the token's policy-gradient value from a loop oracle written here from
  each algorithm's definition, times its aggregation weight: zero exactly where the
  algorithm trains no policy gradient (padding, Clip-Cov's detached tokens, 80/20's
  low-entropy tokens), non-zero elsewhere, so an algorithm that ignores the weights,
  or weights the wrong tokens, fails;
- the learner's ``run_minibatch`` (micro-batches of 2) passes the weights through:
  same gradient as one ``loss`` call; on the one-step path (no pi_old pass) it forms
  them from the behaviour log-probs, truncated as ``learner.off_policy`` says.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
import torch

from asyncrl.algos import build_algorithm
from asyncrl.algos.base import LossInputs, SelectInputs
from asyncrl.algos.config import (
    ClipCovConfig, ClipHigherConfig, DrGRPOConfig, EightyTwentyConfig, EntropyBonusConfig, GRPOConfig, GSPOConfig,
    KLCovConfig, LpRegConfig,
)
from asyncrl.algos.minibatch import MiniBatch, run_minibatch
from asyncrl.algos.registry import REGISTRY
from asyncrl.algos.selection import local_all_gather

B, T = 6, 7
TOL = dict(rtol=1e-10, atol=1e-12)

# (config class, how its policy-gradient term of one token is defined, overrides);
# selections made large enough that every algorithm selects something in this batch
CASES = [
    (GRPOConfig, "ppo", {}),
    (ClipHigherConfig, "ppo", {}),
    (DrGRPOConfig, "ppo", {}),
    (LpRegConfig, "lpreg", {"rho": 0.4, "rho_pos": 0.3, "kappa": 0.2}),
    (GSPOConfig, "gspo", {"clip_low": 0.05, "clip_high": 0.08}),
    (EntropyBonusConfig, "ppo", {"coef": 0.05}),
    (EightyTwentyConfig, "eighty_twenty", {"top_frac": 0.4}),  # normaliser: selected
    (EightyTwentyConfig, "eighty_twenty", {"top_frac": 0.4, "normaliser": "all"}),
    (KLCovConfig, "kl_cov", {"ratio": 0.2, "coef": 0.7}),
    (ClipCovConfig, "clip_cov", {"ratio": 0.2, "cov_lb": -1e3, "cov_ub": 1e3}),
]
IDS = [c.__name__.removesuffix("Config") + "".join(f"-{v}" for k, v in o.items() if k == "normaliser")
       for c, _, o in CASES]


def test_every_registered_algorithm_is_covered():
    assert {c for c, _, _ in CASES} == set(REGISTRY)


def config(case):
    cfg_cls, _, overrides = case
    return msgspec.convert({"type": cfg_cls.__struct_config__.tag, **overrides}, cfg_cls)


def make_inputs(seed: int):
    g = np.random.default_rng(seed)
    lengths = g.integers(2, T + 1, size=B)
    lengths[1] = 0  # a sequence without valid tokens
    mask = np.arange(T)[None, :] < lengths[:, None]
    lp = np.log(g.uniform(0.02, 0.98, size=(B, T)))
    old = lp + g.normal(0, 0.3, size=(B, T))
    adv = np.repeat(g.choice([-1.3, -0.4, 0.6, 1.1], size=(B, 1)), T, 1) * mask
    proxy = np.where(g.uniform(size=(B, T)) < 0.8, lp + g.normal(0.3, 0.4, size=(B, T)), -np.inf)
    entropy = g.uniform(0.1, 2.0, size=(B, T))
    w = g.uniform(0.1, 3.0, size=(B, T))
    return mask, lp, old, adv, proxy, entropy, w


class Problem:
    """One micro-batch that is the whole mini-batch, float64, and the algorithm's selection."""

    def __init__(self, case, seed: int = 0):
        cfg_cls, self.kind, _ = case
        self.cfg = config(case)
        self.algo = build_algorithm(self.cfg)
        mask, lp, old, adv, proxy, ent, w = make_inputs(seed)
        self.np = dict(mask=mask, lp=lp, old=old, adv=adv, proxy=proxy, w=w)
        self.mask = torch.tensor(mask)
        self.lp0, self.old, self.adv = torch.tensor(lp), torch.tensor(old), torch.tensor(adv)
        self.proxy = torch.tensor(proxy) if self.algo.needs_proxy else None
        self.ent0 = torch.tensor(ent) if self.algo.needs_entropy else None
        self.w = torch.tensor(w)
        self.selected = None
        if self.algo.needs_selection:
            m = self.mask
            codes = self.algo.select(SelectInputs(
                logprobs=self.lp0[m], old_logprobs=self.old[m], advantages=self.adv[m],
                entropy=None if self.ent0 is None else self.ent0[m],
                proxy_logprobs=None if self.proxy is None else self.proxy[m]), local_all_gather)
            self.selected = torch.zeros(m.shape, dtype=torch.int8)
            self.selected[m] = codes
            assert (codes != 0).any(), f"{cfg_cls.__name__}: nothing selected; the test needs a selection"

    def loss(self, w: torch.Tensor | None) -> tuple[float, torch.Tensor]:
        lp = self.lp0.clone().requires_grad_(True)
        ent = None if self.ent0 is None else self.ent0.clone().requires_grad_(True)
        loss, _ = self.algo.loss(LossInputs(
            logprobs=lp, old_logprobs=self.old, advantages=self.adv, mask=self.mask,
            num_tokens=float(self.mask.sum()), num_seqs=float(self.mask.any(-1).sum()), max_len=float(T),
            entropy=ent, proxy_logprobs=self.proxy, selected=self.selected, is_weights=w))
        loss.backward()
        return loss.item(), lp.grad.clone()

    def oracle_pg(self) -> np.ndarray:
        """Each valid token's policy-gradient value at weight 1, times its aggregation
        weight: loops over python floats, from the algorithms' definitions."""
        d, c = self.np, self.cfg
        lo, hi = c.clip_low, c.clip_high
        sel = None if self.selected is None else self.selected.numpy()
        n_tok, n_seq = d["mask"].sum(), d["mask"].any(-1).sum()
        out = np.zeros((B, T))
        for b in range(B):
            length = int(d["mask"][b].sum())
            if length == 0:
                continue
            seq_log_r = sum(d["lp"][b, t] - d["old"][b, t] for t in range(length)) / length
            for t in range(length):
                a, r = d["adv"][b, t], math.exp(d["lp"][b, t] - d["old"][b, t])
                ppo = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
                code = 0 if sel is None else int(sel[b, t])
                if self.kind == "ppo":
                    v = ppo
                elif self.kind == "lpreg":  # regularised tokens (codes 1, 2): unclipped
                    v = -a * r if code in (1, 2) else ppo
                elif self.kind == "gspo":
                    s = math.exp(min(seq_log_r, 10.0))
                    v = max(-a * s, -a * min(max(s, 1 - lo), 1 + hi))
                elif self.kind == "kl_cov":  # unclipped everywhere
                    v = -a * r
                elif self.kind == "clip_cov":  # selected tokens are detached
                    v = 0.0 if code == 1 else ppo
                elif self.kind == "eighty_twenty":  # only selected (high-entropy) tokens
                    v = ppo if code == 1 else 0.0
                else:
                    raise AssertionError(self.kind)
                n = n_tok
                if self.kind == "eighty_twenty" and c.normaliser == "selected":  # the k selected tokens
                    n = max(1, math.floor(c.top_frac * n_tok))
                agg = {"token-mean": 1 / n, "seq-mean-token-mean": 1 / (length * n_seq),
                       "seq-mean-token-sum": 1 / n_seq, "seq-mean-token-sum-norm": 1 / (n_seq * T)}[c.agg]
                out[b, t] = v * agg
        return out


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unit_weights_change_nothing(case):
    p = Problem(case)
    l_none, g_none = p.loss(None)
    l_one, g_one = p.loss(torch.ones(B, T, dtype=torch.float64))
    np.testing.assert_allclose(l_one, l_none, **TOL)
    torch.testing.assert_close(g_one, g_none, **TOL)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_weights_scale_exactly_the_policy_gradient_terms(case, seed):
    p = Problem(case, seed)
    zero = torch.zeros(B, T, dtype=torch.float64)
    l0, g0 = p.loss(zero)
    c, dg = np.zeros((B, T)), torch.zeros(B, T, B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            e = zero.clone()
            e[b, t] = 1.0
            lt, gt = p.loss(e)
            c[b, t], dg[b, t] = lt - l0, gt - g0

    # c_t is the oracle's policy-gradient term: zero where none is trained (padding too)
    want = p.oracle_pg()
    np.testing.assert_allclose(c, want, rtol=1e-9, atol=1e-13)
    trained = np.abs(want) > 0
    assert trained.sum() >= 5, "too few tokens carry a policy gradient to test the weights"

    # the loss and the gradient are affine in w: the weights change them exactly so
    lw, gw = p.loss(p.w)
    np.testing.assert_allclose(lw - l0, float((p.w.numpy() * c).sum()), **TOL)
    torch.testing.assert_close(gw - g0, torch.einsum("bt,btij->ij", p.w, dg), **TOL)
    assert abs(lw - p.loss(None)[0]) > 1e-6, "random weights do not change the loss"
    if p.kind != "gspo":  # token-level terms: a token's weight scales its own gradient only
        for b in range(B):
            for t in range(T):
                others = dg[b, t].clone()
                others[b, t] = 0.0
                assert float(others.abs().max()) <= 1e-14, (b, t)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_run_minibatch_passes_the_weights(case):
    """The learner's path: micro-batches of 2 rows, selection inside run_minibatch."""
    p = Problem(case)
    theta = p.lp0.clone().requires_grad_(True)
    ent = None if p.ent0 is None else p.ent0.clone().requires_grad_(True)

    def forward(rows):
        return theta[rows] * 1.0, None if ent is None else ent[rows] * 1.0

    mini = MiniBatch(p.old, p.adv, p.mask, proxy_logprobs=p.proxy, is_weights=p.w)
    _, selected = run_minibatch(p.algo, mini, forward, micro_batch_size=2, all_gather=local_all_gather, rank=0,
                                max_len=float(T))
    if p.selected is not None:
        assert torch.equal(selected, p.selected)
    want_loss, want_grad = p.loss(p.w)
    torch.testing.assert_close(theta.grad, want_grad, **TOL)
    _, g_unweighted = p.loss(None)
    assert float((want_grad - g_unweighted).abs().max()) > 1e-6


# the one-step path exists for algorithms without a selection (those need pi_old's pass)
FUSED = [(c, i) for c, i in zip(CASES, IDS) if not build_algorithm(config(c)).needs_selection]


@pytest.mark.parametrize("mode", ["tis", "decoupled"])
@pytest.mark.parametrize("case", [c for c, _ in FUSED], ids=[i for _, i in FUSED])
def test_fused_one_step_path_weights_by_the_behaviour_logprobs(case, mode):
    """On-policy with one optimiser step the learner passes no pi_old (old_logprobs None:
    the training forward's detached log-probs are pi_old) and the behaviour log-probs:
    the weight pi_old / pi_behaviour, truncated (tis, cap 1.5) or dropped above the cap
    (decoupled), must reach the loss exactly as if it had been given."""
    p = Problem(case)
    g = np.random.default_rng(7)
    behaviour = p.lp0 + torch.tensor(g.normal(0, 0.5, size=(B, T)))  # another engine's numerics
    cap = 1.5
    ratio = torch.exp(p.lp0 - behaviour)
    want_w = torch.where(p.mask, ratio.clamp(max=cap) if mode == "tis" else torch.where(ratio <= cap, ratio, 0.0),
                         0.0)
    assert bool(((ratio > cap) & p.mask).any()) and bool(((ratio < 1) & p.mask).any())

    theta = p.lp0.clone().requires_grad_(True)
    ent = None if p.ent0 is None else p.ent0.clone().requires_grad_(True)

    def forward(rows):
        return theta[rows] * 1.0, None if ent is None else ent[rows] * 1.0

    mini = MiniBatch(None, p.adv, p.mask, behaviour_logprobs=behaviour, off_policy=mode, is_cap=cap)
    run_minibatch(p.algo, mini, forward, micro_batch_size=2, all_gather=local_all_gather, rank=0, max_len=float(T))

    p.old = p.lp0.clone()  # pi_old is the current weights
    _, want_grad = p.loss(want_w)
    torch.testing.assert_close(theta.grad, want_grad, **TOL)
    _, g_unweighted = p.loss(None)
    assert float((want_grad - g_unweighted).abs().max()) > 1e-6
