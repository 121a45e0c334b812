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

import pytest
import torch

from asyncrl.kernels import IGNORE_INDEX
from asyncrl.learner.packing import (first_fit_decreasing, input_positions, pack, pack_rows, row_lengths,
                                     split_to_count, token_budget_slices, unpack)
from testkit import LAYOUT_ALGOS, assert_layouts_equal_padded, dense_logprobs, dense_proxy, make_tiny_model

TEMPERATURE = 0.8
ALGOS = LAYOUT_ALGOS


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
    """Right-padded rows of lengths varying 10x: prompt 3, then scored tokens, except
    a few environment tokens inside two responses (not trained on, but context)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [40, 4, 22, 9, 31, 4, 15, 12][:B]
    ids = torch.zeros((B, L), dtype=torch.long)
    tgt = torch.full((B, L), IGNORE_INDEX)
    for i, n in enumerate(lengths):
        seq = torch.randint(2, vocab, (n + 1,), generator=g)
        ids[i, :n] = seq[:-1]
        tgt[i, 2:n] = seq[3:n + 1]  # prompt of 3 tokens: positions 2.. predict the response
    tgt[0, 10:16] = IGNORE_INDEX  # environment tokens
    tgt[4, 20:23] = IGNORE_INDEX
    return ids, tgt


def spans_of(p):
    """Each packed row's spans from ``cu_seq_lens``: [(row, start, stop)], none crossing a row."""
    bounds, C = p.cu_seq_lens.tolist(), p.input_ids.shape[1]
    spans = [(a // C, a % C, a % C + b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    assert all(stop <= C for _, _, stop in spans)
    return spans


def test_layout_helpers():
    ids, tgt = rollout()
    lengths = row_lengths(tgt)
    assert lengths.tolist() == [40, 4, 22, 9, 31, 4, 15, 12]
    rows = first_fit_decreasing(lengths.tolist(), 40)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(sum(lengths[i] for i in r) <= 40 for r in rows) and len(rows) == 4  # 137 tokens in 4 rows of 40
    assert pack_rows(lengths.tolist(), 0) == ([list(range(8))], 137)  # one row of everything, in order
    assert pack_rows([0, 3, 0], 0) == ([[1]], 3) and pack_rows([0, 0], 0) == ([[]], 1)
    p = pack(ids, tgt, pad_id=0, capacity=40)
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
    assert input_positions(lengths, [slice(0, 8)], 40, 40) == (137, 160)
    assert input_positions(lengths, [slice(0, 3), slice(3, 8)], 40, 0) == (137, 137)  # no padding


@pytest.mark.parametrize("capacity", [0, 40, 64])
def test_samples_are_whole_spans(capacity):
    """Every sample is one contiguous span of one row, with positions 0..n-1, and the
    spans (samples and padding tails) tile the rows exactly."""
    ids, tgt = rollout()
    B, L = tgt.shape
    lengths = row_lengths(tgt).tolist()
    p = pack(ids, tgt, pad_id=0, capacity=capacity)
    seen = []
    for r, start, stop in spans_of(p):
        src = p.source[r, start:stop]
        if (src < 0).all():  # a padding tail reaches the end of its row
            assert stop == p.input_ids.shape[1]
            continue
        i = int(src[0]) // L
        assert torch.equal(src, torch.arange(i * L, i * L + lengths[i]))  # all of sample i, in order
        assert torch.equal(p.position_ids[r, start:stop], torch.arange(lengths[i]))
        seen.append(i)
    assert sorted(seen) == list(range(B))
    if capacity == 0:
        assert p.padding_frac == 0.0 and seen == list(range(B))


def test_varlen_attention_is_per_sample(policy):
    """The packed decoder's hidden states at every real position are the padded
    decoder's (float64, exact causal spans), and attention that ignored the spans would
    mix samples: the test can tell."""
    ids, tgt = rollout(2)
    with torch.no_grad():
        h0 = policy.lm.model(input_ids=ids, use_cache=False).last_hidden_state.reshape(-1, 32)
        for capacity in (0, 40):
            p = pack(ids, tgt, pad_id=0, capacity=capacity)
            h = policy.lm.model(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False,
                                **policy._packed_attention(p)).last_hidden_state
            real = p.source >= 0
            torch.testing.assert_close(h[real], h0[p.source[real]], rtol=0, atol=1e-12)
        mixed = policy.lm.model(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False,
                                attention_mask={"full_attention": None}).last_hidden_state
        assert (mixed[real] - h0[p.source[real]]).abs().max() > 1e-3


def packed_vs_padded(policy, name, tol, capacities=(0, 40, 64)):
    """One row per micro-batch; rows of the longest sample; wider rows."""
    ids, tgt = rollout(1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    assert_layouts_equal_padded(policy, ids, tgt, rewards, name, [{"pack_capacity": c} for c in capacities], atol=tol)


@pytest.mark.parametrize("name", list(ALGOS))
def test_packed_equals_padded_for_every_algorithm(policy, float64_heads, name):
    packed_vs_padded(policy, name, 1e-10)


@pytest.mark.parametrize("name", ["grpo", "lpreg"])
def test_packed_equals_padded_through_the_kernels(policy, name):
    packed_vs_padded(policy, name, 1e-6)


@pytest.mark.parametrize("name", ["grpo", "clip_cov"])
def test_packed_equals_padded_with_transformers_masks(policy, float64_heads, name):
    """Under another attention implementation (plain sdpa here) the packed rows get
    transformers' block-diagonal mask from the restarting position ids instead."""
    from asyncrl.learner.attention import SDPA_VARLEN

    policy.lm.set_attn_implementation("sdpa")
    try:
        packed_vs_padded(policy, name, 1e-10, capacities=(0, 40, 64))
    finally:
        policy.lm.set_attn_implementation(SDPA_VARLEN)


def test_sliding_window_layers_keep_their_window(tmp_path, float64_heads):
    """A sliding-window layer is not a per-sample causal span: such models take
    transformers' packed masks (windowed and block-diagonal), still equal to padded."""
    from asyncrl.learner.policy import Policy
    from asyncrl.models import load_model

    d = make_tiny_model(tmp_path / "model", initializer_range=0.3, use_sliding_window=True, sliding_window=5,
                        max_window_layers=0, layer_types=["sliding_attention"])
    policy = Policy(load_model(str(d), "float32")).double()
    assert set(policy.lm.config.layer_types) == {"sliding_attention"}
    ids, tgt = rollout(3)
    padded = policy(ids, tgt, temperature=TEMPERATURE)[0]
    for capacity in (0, 40):
        packed = policy(ids, tgt, temperature=TEMPERATURE, pack_capacity=capacity)[0]
        torch.testing.assert_close(packed, padded, rtol=0, atol=1e-10)
