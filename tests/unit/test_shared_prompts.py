"""Packed rows with shared prompts (learner.share_prompts): a group's samples run their
common prompt through the decoder once, and the learner still gets exactly the
per-token quantities, loss and gradient of padded rows (float64, 1e-10), for every
algorithm; the layout and the batched span attention keep their promises.

Two float64 caveats, both about the reference rather than the layout. The chunked-logit
kernels compute in float32 by design, so the float64 comparisons use dense float64
heads (as test_packing.py does). And transformers' Qwen3 RMSNorm computes in float32
whatever the model's dtype: a shared prompt sums its samples' upstream gradients
before the norm's backward instead of after it, which agrees only to float32 rounding,
so those comparisons also run the norm in the model's dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asyncrl.kernels import IGNORE_INDEX
from asyncrl.learner.attention import plan_span_attention, span_batch_attention
from asyncrl.learner.packing import row_lengths
from asyncrl.learner.shared_prompts import Unit, pack_shared, plan_units, prefix_lengths, shared_positions
from testkit import LAYOUT_ALGOS, assert_layouts_equal_padded, dense_logprobs, dense_proxy, make_tiny_model

TEMPERATURE = 0.8
ALGOS = LAYOUT_ALGOS


def grouped_rollout(seed=0, L=30, vocab=21):
    """A GRPO batch's layout: consecutive samples of one prompt. Group A (prompt of 5)
    rows 0-2, with a one-token answer (row 1) and environment tokens inside row 2;
    group C rows 3-4, whose prompt differs from A's in its last token only; group B
    (prompt of 7) rows 5-6; row 7 has nothing to score."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(2, vocab, (5,), generator=g)
    c = a.clone()
    c[-1] = 2 + (int(a[-1]) - 1) % (vocab - 2)  # another token
    b = torch.randint(2, vocab, (7,), generator=g)
    rows = [(a, 20), (a, 5), (a, 30), (c, 9), (c, 14), (b, 12), (b, 25)]
    ids = torch.zeros((len(rows) + 1, L), dtype=torch.long)
    tgt = torch.full((len(rows) + 1, L), IGNORE_INDEX)
    for i, (prompt, n) in enumerate(rows):
        seq = torch.cat([prompt, torch.randint(2, vocab, (n - len(prompt) + 1,), generator=g)])
        ids[i, :n] = seq[:n]
        tgt[i, len(prompt) - 1:n] = seq[len(prompt):n + 1]
    tgt[2, 12:16] = IGNORE_INDEX  # environment tokens: context, not scored
    ids[7, :4] = a[:4]  # an unscored row (its prefix would match A's): left out
    return ids, tgt


@pytest.fixture
def float64_everywhere(monkeypatch):
    """Dense float64 log-probs; the norms are float64 already (load_model's fused RMSNorm
    computes in the input's dtype, where Hugging Face's would round to float32)."""
    import asyncrl.learner.policy as policy_module

    monkeypatch.setattr(policy_module, "token_logprobs", dense_logprobs)
    monkeypatch.setattr(policy_module, "token_proxy_logprobs", dense_proxy)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from asyncrl.learner.policy import Policy
    from asyncrl.models import load_model

    d = make_tiny_model(Path(tmp_path_factory.mktemp("share")) / "model", initializer_range=0.3)
    return Policy(load_model(str(d), "float32")).double()


def test_units_are_runs_of_one_prompt():
    ids, tgt = grouped_rollout()
    assert prefix_lengths(tgt) == [5, 5, 5, 5, 5, 7, 7, 0]
    assert plan_units(ids, tgt) == [Unit((0, 1, 2), 5), Unit((3, 4), 5), Unit((5, 6), 7)]
    # a unit stops growing at the capacity: row 2 then starts one of its own, which shares nothing
    assert plan_units(ids, tgt, capacity=40) == [Unit((0, 1), 5), Unit((2,), 0), Unit((3, 4), 5), Unit((5, 6), 7)]
    lengths = row_lengths(tgt).tolist()
    assert Unit((0, 1, 2), 5).length(lengths) == 5 + 15 + 0 + 25
    # the same tokens but scored from one position earlier: another prefix, so no sharing
    tgt[1, 3] = ids[1, 4]
    assert prefix_lengths(tgt)[:3] == [5, 4, 5]
    assert plan_units(ids, tgt)[:3] == [Unit((0,), 0), Unit((1,), 0), Unit((2,), 0)]


@pytest.mark.parametrize("capacity", [0, 40, 64])
def test_layout_computes_each_prompt_once(capacity):
    """Every real position of the padded rows maps to a packed slot holding its token
    at its position id; a unit's samples share their prefix's slots; nothing else is
    shared; the layout's counts are what ``shared_positions`` reports."""
    ids, tgt = grouped_rollout()
    lengths = row_lengths(tgt).tolist()
    p = pack_shared(ids, tgt, pad_id=0, capacity=capacity)
    real = torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    assert torch.equal(p.slots >= 0, real)
    flat_ids, flat_pos = p.input_ids.reshape(-1), p.position_ids.reshape(-1)
    assert torch.equal(flat_ids[p.slots[real]], ids[real])
    assert torch.equal(flat_pos[p.slots[real]], real.nonzero()[:, 1])
    units = plan_units(ids, tgt, capacity)
    for unit in units:
        for i in unit.samples[1:]:
            assert torch.equal(p.slots[i, :unit.prefix], p.slots[unit.samples[0], :unit.prefix])
    used = p.slots[real].unique()
    assert used.numel() == sum(lengths) - sum((len(u.samples) - 1) * u.prefix for u in units)
    assert used.numel() + p.padding == p.input_ids.numel()
    assert shared_positions(ids, tgt, capacity) == (sum(lengths), p.input_ids.numel(), p.padding)
    if capacity == 0:
        assert p.padding == 0 and p.input_ids.shape[0] == 1
    for start, n, ctx, ctx_n in p.spans:  # no span crosses a row; a context is its unit's prefix
        assert start // p.input_ids.shape[1] == (start + n - 1) // p.input_ids.shape[1]
        if ctx_n:
            assert (ctx, ctx_n) in {(s[0], s[1]) for s in p.spans} and ctx_n in (5, 7)


def dense_span_attention(q, k, v, spans):
    """The reference: one [N, N] mask, the whole context and own keys causally."""
    N = q.shape[2]
    allowed = torch.zeros((N, N), dtype=torch.bool)
    for a, n, ca, cn in spans:
        allowed[a:a + n, a:a + n] = torch.ones((n, n), dtype=torch.bool).tril()
        allowed[a:a + n, ca:ca + cn] = True
    rep = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.repeat_interleave(rep, 1)
    return out.transpose(1, 2)  # (1, N, H, d)


def test_span_attention_matches_dense_masks():
    """Spans of very different sizes (several buckets), contexts shared by several
    spans, GQA: the batched attention equals the dense masked one, values and
    gradients (float64)."""
    torch.manual_seed(0)
    spans = [(0, 6, 0, 0), (6, 3, 0, 6), (9, 17, 0, 6), (26, 1, 0, 6), (27, 4, 0, 0), (31, 2, 27, 4),
             (33, 9, 27, 4), (42, 6, 0, 0)]
    N, H, Hkv, d = 48, 4, 2, 8
    q, k, v = (torch.randn(1, h, N, d, dtype=torch.float64, requires_grad=True) for h in (H, Hkv, Hkv))
    plan = plan_span_attention(spans, torch.device("cpu"))
    assert len(plan.shapes) > 2
    w = torch.randn(1, N, H, d, dtype=torch.float64)
    got = span_batch_attention(q, k, v, plan, 0.0, None)
    want = dense_span_attention(q, k, v, spans)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((want * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # rows: the same flat positions read as 2 rows of 24
    got_rows = span_batch_attention(*(t.detach().reshape(t.shape[1], 2, 24, d).transpose(0, 1) for t in (q, k, v)),
                                    plan, 0.0, None)
    torch.testing.assert_close(got_rows.reshape(1, N, H, d), want.detach(), rtol=0, atol=1e-12)


def test_span_plan_rejects_what_it_cannot_express():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="tile"):
        plan_span_attention([(0, 4, 0, 0), (5, 3, 0, 0)], cpu)  # a gap
    with pytest.raises(ValueError, match="earlier span"):
        plan_span_attention([(0, 4, 4, 3), (4, 3, 0, 0)], cpu)  # a context after its span
    with pytest.raises(ValueError, match="earlier span"):
        plan_span_attention([(0, 4, 0, 0), (4, 3, 0, 2)], cpu)  # a context that is not a span
    plan = plan_span_attention([(0, 4, 0, 0)], cpu)
    with pytest.raises(ValueError, match="covers 4 positions"):
        span_batch_attention(*(torch.zeros(1, 2, 5, 8) for _ in range(3)), plan, 0.0, None)


def test_hidden_states_equal_padded(policy, float64_everywhere):
    """The decoder's hidden state at every real position is the padded decoder's, and
    answers that did not see their shared prompt would differ: the test can tell."""
    ids, tgt = grouped_rollout(1)
    real = tgt != IGNORE_INDEX
    with torch.no_grad():
        h0 = policy.lm.model(input_ids=ids, use_cache=False).last_hidden_state[real]
        for capacity in (0, 40):
            p = pack_shared(ids, tgt, pad_id=0, capacity=capacity)
            h = policy.lm.model(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False,
                                attention_mask={"full_attention": None}, prompt_spans=p.attention).last_hidden_state
            torch.testing.assert_close(h.reshape(-1, 32)[p.slots[real]], h0, rtol=0, atol=1e-12)
        blind = plan_span_attention([(a, n, 0, 0) for a, n, _, _ in p.spans], torch.device("cpu"))
        h = policy.lm.model(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False,
                            attention_mask={"full_attention": None}, prompt_spans=blind).last_hidden_state
        assert (h.reshape(-1, 32)[p.slots[real]] - h0).abs().max() > 1e-3


def shared_vs_padded(policy, name, rtol, atol, micro_batch_size=3, capacities=(0, 40)):
    ids, tgt = grouped_rollout(2)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    layouts = [{"pack_capacity": c, "share_prompts": True} for c in capacities]
    assert_layouts_equal_padded(policy, ids, tgt, rewards, name, layouts, micro_batch_size=micro_batch_size,
                                rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(ALGOS))
def test_shared_equals_padded_for_every_algorithm(policy, float64_everywhere, name):
    shared_vs_padded(policy, name, 0, 1e-10)


def test_shared_equals_padded_whatever_the_micro_batches(policy, float64_everywhere):
    """Micro-batches that cut groups (3 rows) and that hold the whole batch (8)."""
    shared_vs_padded(policy, "lpreg", 0, 1e-10, micro_batch_size=8)


@pytest.mark.parametrize("name", ["grpo", "lpreg"])
def test_shared_equals_padded_through_the_kernels(policy, name):
    """The real float32 kernels and float32 norms: equal to float32 rounding."""
    shared_vs_padded(policy, name, 1e-5, 1e-5)


def test_other_attention_keeps_a_copy_per_sample(tmp_path, float64_everywhere):
    """Plain sdpa (transformers' packed masks) cannot express a context: the policy
    says so and packs without sharing, still equal to padded."""
    from asyncrl.learner.policy import Policy
    from asyncrl.models import load_model

    policy = Policy(load_model(str(make_tiny_model(tmp_path / "m", initializer_range=0.3)), "float32")).double()
    assert policy.shares_prompts
    policy.lm.set_attn_implementation("sdpa")
    assert not policy.shares_prompts
    ids, tgt = grouped_rollout(3)
    padded = policy(ids, tgt, temperature=TEMPERATURE)[0]
    shared = policy(ids, tgt, temperature=TEMPERATURE, pack_capacity=0, share_prompts=True)[0]
    torch.testing.assert_close(shared, padded, rtol=0, atol=1e-10)
