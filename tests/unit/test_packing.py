"""Sequence packing: packed rows give the learner exactly the per-token quantities of
padded rows, so for every algorithm a packed and a padded run of the same mini-batch
have the same loss and gradient (float64, 1e-10); and the layout helpers keep their
promises (row capacity, order, token budgets, equal micro-batch counts).

The chunked-logit kernels compute in float32 by design (their float64 oracles are in
test_kernels.py), so the float64 comparison swaps them for dense float64 log-softmax:
what is tested here is the decoder's packed input and the scatter back. A float32 run
through the real kernels agrees to float32 rounding."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import torch

from asyncrl.algos import build_algorithm
from asyncrl.algos.config import AlgoConfig
from asyncrl.algos.minibatch import MiniBatch, run_minibatch
from asyncrl.algos.selection import local_all_gather
from asyncrl.kernels import IGNORE_INDEX
from asyncrl.learner.packing import (first_fit_decreasing, input_positions, pack, row_lengths, split_to_count,
                                     token_budget_slices, unpack)
from testkit import make_tiny_model

TEMPERATURE = 0.8
ALGOS = {
    "grpo": {"type": "grpo"},
    "dr_grpo": {"type": "dr_grpo"},
    "gspo": {"type": "gspo"},
    "clip_higher": {"type": "clip_higher"},
    "entropy_bonus": {"type": "entropy_bonus", "coef": 0.1},
    "eighty_twenty": {"type": "eighty_twenty"},
    "kl_cov": {"type": "kl_cov", "ratio": 0.1},
    "clip_cov": {"type": "clip_cov", "ratio": 0.1, "cov_lb": 0.0, "cov_ub": 5.0},
    "lpreg": {"type": "lpreg", "rho": 0.3, "kappa": 0.2},
}


def dense_logprobs(hidden, weight, targets, *, temperature=1.0, with_entropy=False):
    logp = torch.log_softmax(hidden @ weight.T / temperature, -1)  # (N, V) float64
    lp = logp.gather(-1, targets[:, None])[:, 0]
    return lp, (-(logp.exp() * logp).sum(-1) if with_entropy else None)


def dense_proxy(hidden, weight, targets, *, kappa, temperature=1.0):
    from asyncrl.algos.lpreg import minp_proxy_logprobs

    return minp_proxy_logprobs(hidden @ weight.T, targets, kappa, temperature)


@pytest.fixture
def float64_heads(monkeypatch):
    import asyncrl.learner.policy as policy_module

    monkeypatch.setattr(policy_module, "token_logprobs", dense_logprobs)
    monkeypatch.setattr(policy_module, "token_proxy_logprobs", dense_proxy)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from asyncrl.learner.policy import Policy
    from asyncrl.models import load_model

    d = make_tiny_model(Path(tmp_path_factory.mktemp("pack")) / "model", initializer_range=0.3)
    return Policy(load_model(str(d), "float32")).double()


def rollout(seed=0, B=8, L=40, vocab=21):
    """Right-padded rows of lengths varying 10x: prompt 3, then scored tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = [40, 4, 22, 9, 31, 4, 15, 12][:B]
    ids = torch.zeros((B, L), dtype=torch.long)
    tgt = torch.full((B, L), IGNORE_INDEX)
    for i, n in enumerate(lengths):
        seq = torch.randint(2, vocab, (n + 1,), generator=g)
        ids[i, :n] = seq[:-1]
        tgt[i, 2:n] = seq[3:n + 1]  # prompt of 3 tokens: positions 2.. predict the response
    return ids, tgt


def test_layout_helpers():
    ids, tgt = rollout()
    lengths = row_lengths(tgt)
    assert lengths.tolist() == [40, 4, 22, 9, 31, 4, 15, 12]
    rows = first_fit_decreasing(lengths.tolist(), 40)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(sum(lengths[i] for i in r) <= 40 for r in rows) and len(rows) == 4  # 137 tokens in 4 rows of 40
    p = pack(ids, tgt, pad_id=0, capacity=0)
    assert p.input_ids.shape == (4, 40) and p.padding_frac == pytest.approx(1 - 137 / 160)
    values = torch.arange(int((p.targets != IGNORE_INDEX).sum()), dtype=torch.float64)
    back = unpack(values, p, tgt.shape, fill=-1.0)
    assert torch.equal(back != -1.0, tgt != IGNORE_INDEX)  # every scored token placed once, nothing else
    assert torch.equal(ids.reshape(-1)[p.source[p.source >= 0]], p.input_ids[p.source >= 0])
    slices = token_budget_slices(slice(0, 8), lengths, max_rows=3, max_tokens=45)
    assert slices == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    slices = token_budget_slices(slice(0, 8), lengths, max_rows=3, max_tokens=20)  # 40 and 22, 31 alone
    assert slices == [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 4), slice(4, 5), slice(5, 7), slice(7, 8)]
    assert token_budget_slices(slice(2, 8), lengths, max_rows=2, max_tokens=0) == [slice(2, 4), slice(4, 6),
                                                                                    slice(6, 8)]
    four = split_to_count([slice(0, 8)], 4, lengths)
    assert len(four) == 4 and [r for s in four for r in range(s.start, s.stop)] == list(range(8))
    assert input_positions(lengths, [slice(0, 8)], 40, None) == (137, 320)


def packed_vs_padded(policy, name, tol):
    ids, tgt = rollout(1)
    mask = tgt != IGNORE_INDEX
    algo = build_algorithm(msgspec.convert(ALGOS[name], AlgoConfig))
    kappa = 0.2 if algo.needs_proxy else None
    with torch.no_grad():
        old, _, proxy = policy(ids, tgt, temperature=TEMPERATURE, kappa=kappa)
        old = old - 0.05 * torch.linspace(-1, 1, old.numel(), dtype=old.dtype).reshape(old.shape) * mask
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    adv = ((rewards - 0.5) * 2)[:, None].expand(mask.shape) * mask
    batch = MiniBatch(old, adv, mask, proxy_logprobs=proxy, seed=3)

    def run(capacity):
        policy.zero_grad(set_to_none=True)

        def forward(rows):
            lp, ent, _ = policy(ids[rows], tgt[rows], temperature=TEMPERATURE, with_entropy=algo.needs_entropy,
                                pack_capacity=capacity)
            return lp, ent

        metrics, codes = run_minibatch(algo, batch, forward, micro_batch_size=3, all_gather=local_all_gather,
                                       rank=0, max_len=40.0)
        return metrics["loss/total"], [p.grad.clone() for p in policy.parameters()], codes

    loss0, grads0, codes0 = run(None)
    assert sum(float(g.abs().sum()) for g in grads0) > 0
    for capacity in (0, 64):  # rows of the longest sample; wider rows holding more samples
        loss, grads, codes = run(capacity)
        torch.testing.assert_close(loss, loss0, rtol=0, atol=tol)
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(g, g0, rtol=0, atol=tol)
        if codes0 is not None:
            assert torch.equal(codes, codes0) and (codes0 != 0).any()


@pytest.mark.parametrize("name", list(ALGOS))
def test_packed_equals_padded_for_every_algorithm(policy, float64_heads, name):
    packed_vs_padded(policy, name, 1e-10)


@pytest.mark.parametrize("name", ["grpo", "lpreg"])
def test_packed_equals_padded_through_the_kernels(policy, name):
    packed_vs_padded(policy, name, 1e-6)
