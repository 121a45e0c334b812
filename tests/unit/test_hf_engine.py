"""The ``hf`` engine: its per-token log-probs are those of the sampling distribution
(temperature, top-p) recomputed independently with one plain forward per sequence;
stop/length semantics; versions; weight loading."""

from __future__ import annotations

import math

import pytest
import torch

from asyncrl.generator.engine import SamplingParams
from asyncrl.generator.hf import HFEngine, sampling_logprobs
from asyncrl.models import load_model, load_tokenizer

from testkit import make_tiny_model

ATOL = 1e-4
PROMPTS = ["1+2=", "417+385+296=", "9=", "12+345="]  # different lengths: left padding is exercised


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Larger init than the default 0.02, so next-token distributions are far from
    uniform and a log-prob taken at the wrong position or temperature stands out."""
    return make_tiny_model(tmp_path_factory.mktemp("peaked") / "model", seed=0, initializer_range=0.3)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=1, initializer_range=0.3)


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(str(model_dir))


def engine_for(path, tok, seed=0, version=0) -> HFEngine:
    return HFEngine(load_model(str(path)), pad_id=tok.pad_token_id, seed=seed, version=version)


def prompt_ids(tok) -> list[list[int]]:
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids)
    return ids


def nucleus_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Independent reference, float64, one position: keep the most probable tokens, in
    order, until their mass reaches top_p (the token that crosses it is kept)."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = sorted(range(len(p)), key=lambda i: -float(p[i]))
    keep, mass = [], 0.0
    for i in order:
        keep.append(i)
        mass += float(p[i])
        if mass >= top_p:
            break
    out = torch.full_like(p, -math.inf)
    z = float(p[keep].sum())
    for i in keep:
        out[i] = math.log(float(p[i]) / z)
    return out


@torch.no_grad()
def reference_logprobs(model, prompt: list[int], tokens: list[int], temperature: float, top_p: float) -> list[float]:
    """One full forward over prompt + completion, no cache, no padding, one sequence."""
    full = torch.tensor([prompt + tokens])
    logits = model(input_ids=full, use_cache=False).logits[0].float()  # (P + R, V)
    P = len(prompt)
    return [float(nucleus_logprobs(logits[P - 1 + i], temperature, top_p)[t]) for i, t in enumerate(tokens)]


def check_against_reference(engine, model, tok, temperature, top_p, n=3, max_tokens=12):
    prompts = prompt_ids(tok)
    params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            stop_token_ids=(tok.eos_token_id,))
    outs = engine.generate(prompts, params)
    assert len(outs) == len(prompts) and all(len(o) == n for o in outs)
    checked = 0
    for prompt, comps in zip(prompts, outs):
        for c in comps:
            assert len(c.token_ids) == len(c.logprobs) == len(c.versions) >= 1
            ref = reference_logprobs(model, prompt, c.token_ids, temperature, top_p)
            assert all(math.isfinite(x) for x in ref), "sampled a token outside the nucleus"
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                                       atol=ATOL, rtol=0)
            checked += len(c.token_ids)
    return outs, checked


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_full_forward(model_dir, tok, temperature):
    engine = engine_for(model_dir, tok)
    _, checked = check_against_reference(engine, engine.model, tok, temperature, top_p=1.0)
    assert checked > 20


@pytest.mark.parametrize("top_p", [0.9, 0.5])
def test_top_p_logprobs_match_independent_nucleus(model_dir, tok, top_p):
    engine = engine_for(model_dir, tok)
    outs, checked = check_against_reference(engine, engine.model, tok, 0.8, top_p=top_p)
    assert checked > 20
    # not vacuous: the nucleus really truncated, so the log-probs are above the untruncated ones
    c, prompt = outs[0][0], prompt_ids(tok)[0]
    untruncated = reference_logprobs(engine.model, prompt, c.token_ids, 0.8, 1.0)
    assert min(a - b for a, b in zip(c.logprobs, untruncated)) > 0.01


def test_sampling_logprobs_matches_reference_on_random_logits():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 40, generator=g)
    for temperature, top_p in [(1.0, 1.0), (0.6, 0.95), (1.3, 0.3), (1.0, 1e-6)]:
        got = sampling_logprobs(logits, temperature, top_p)
        for row in range(logits.shape[0]):
            ref = nucleus_logprobs(logits[row], temperature, top_p)
            assert torch.equal(torch.isinf(got[row]), torch.isinf(ref)), (temperature, top_p, row)
            finite = torch.isfinite(ref)
            torch.testing.assert_close(got[row][finite].double(), ref[finite], atol=1e-5, rtol=0)
        if top_p == 1e-6:
            assert (torch.isfinite(got).sum(-1) == 1).all()  # only the argmax survives


def test_stop_and_length(model_dir, tok):
    engine = engine_for(model_dir, tok, version=3)
    eos, max_tokens = tok.eos_token_id, 24
    params = SamplingParams(n=16, max_tokens=max_tokens, temperature=1.5, stop_token_ids=(eos,))
    outs = engine.generate(prompt_ids(tok), params)
    reasons = set()
    for comps in outs:
        for c in comps:
            reasons.add(c.finish_reason)
            assert 1 <= len(c.token_ids) <= max_tokens
            assert eos not in c.token_ids[:-1], "generation went on after EOS"
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == eos
            else:
                assert c.finish_reason == "length"
                assert len(c.token_ids) == max_tokens and c.token_ids[-1] != eos
            assert c.versions == [3] * len(c.token_ids)
    assert reasons == {"stop", "length"}, "the seed should produce both outcomes; pick another if the model changed"


def test_same_seed_same_samples(model_dir, tok):
    params = SamplingParams(n=2, max_tokens=10, temperature=1.0, stop_token_ids=(tok.eos_token_id,))
    a = engine_for(model_dir, tok, seed=5).generate(prompt_ids(tok), params)
    b = engine_for(model_dir, tok, seed=5).generate(prompt_ids(tok), params)
    assert a == b


def test_load_weights_changes_outputs(model_dir, other_model_dir, tok):
    params = SamplingParams(n=2, max_tokens=10, temperature=1.0, stop_token_ids=(tok.eos_token_id,))
    before = engine_for(model_dir, tok, seed=9).generate(prompt_ids(tok), params)

    other = load_model(str(other_model_dir))
    engine = engine_for(model_dir, tok, seed=9)
    engine.load_weights(list(other.state_dict().items()), version=4)
    assert engine.version == 4
    after = engine.generate(prompt_ids(tok), params)
    fresh = engine_for(other_model_dir, tok, seed=9).generate(prompt_ids(tok), params)
    flat = lambda outs: [lp for o in outs for c in o for lp in c.logprobs]  # noqa: E731
    assert flat(after) != flat(before)
    torch.testing.assert_close(torch.tensor(flat(after)), torch.tensor(flat(fresh)), atol=ATOL, rtol=0)
    assert all(c.versions == [4] * len(c.token_ids) for o in after for c in o)
    # and the log-probs are those of the new weights
    check_against_reference(engine, other, tok, 1.0, 1.0, n=1, max_tokens=6)


def test_load_weights_rejects_unknown_names(model_dir, tok):
    engine = engine_for(model_dir, tok, version=2)
    with pytest.raises(KeyError, match="model.layers.99.bogus"):
        engine.load_weights([("model.layers.99.bogus", torch.zeros(3))], version=3)
    assert engine.version == 2


def dense_attention(query, key, value, mask, scaling):
    """The reference, float64: each query head against its key-value head (h // group)."""
    group = query.shape[1] // key.shape[1]
    k, v = (t.double().repeat_interleave(group, 1) for t in (key, value))
    scores = query.double() @ k.transpose(-1, -2) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (B, q, H, dv)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_dense_attention(masked, dtype):
    """The engine's attention (its decode-step path at one query, sdpa's for a prefill)
    against dense attention: grouped query heads, left-padding masks, a value head of
    another size; bf16 within bf16 rounding (its softmax runs in float32)."""
    from types import SimpleNamespace

    from asyncrl.generator.hf import decode_attention

    g = torch.Generator().manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    B, H, Hkv, L, d, dv = 5, 6, 2, 9, 8, 4
    key = torch.randn(B, Hkv, L, d, generator=g, dtype=torch.float64).to(dtype)
    value = torch.randn(B, Hkv, L, dv, generator=g, dtype=torch.float64).to(dtype)
    for q_len in (1, 4):
        query = torch.randn(B, H, q_len, d, generator=g, dtype=torch.float64).to(dtype)
        mask = None
        if masked:  # row b skips its first b positions (left padding), causal over the rest
            mask = torch.ones(B, 1, q_len, L, dtype=torch.bool).tril(L - q_len)
            for b in range(B):
                mask[b, :, :, :b] = False
        elif q_len > 1:
            mask = torch.ones(B, 1, q_len, L, dtype=torch.bool).tril(L - q_len)  # causal
        got, _ = decode_attention(module, query, key, value, mask, scaling=0.3)
        assert got.shape == (B, q_len, H, dv) and got.dtype == dtype
        tol = 1e-12 if dtype == torch.float64 else 2e-2
        torch.testing.assert_close(got.double(), dense_attention(query, key, value, mask, 0.3), rtol=0, atol=tol)


def test_decode_attention_leaves_what_it_does_not_cover_to_sdpa():
    """Additive masks and position biases (one query each) go to sdpa, which applies them."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from asyncrl.generator.hf import decode_attention

    g = torch.Generator().manual_seed(1)
    module = SimpleNamespace(num_key_value_groups=1, is_causal=True, training=False)
    query, key, value = (torch.randn(3, 2, n, 8, generator=g, dtype=torch.float64) for n in (1, 7, 7))
    additive = torch.randn(3, 1, 1, 7, generator=g, dtype=torch.float64)
    got, _ = decode_attention(module, query, key, value, additive, scaling=0.5)
    torch.testing.assert_close(got, dense_attention(query, key, value, additive, 0.5), rtol=0, atol=1e-12)
    bias = torch.randn(3, 2, 1, 7, generator=g, dtype=torch.float64)
    got, _ = decode_attention(module, query, key, value, None, scaling=0.5, position_bias=bias)
    want, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.5, position_bias=bias)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (got - dense_attention(query, key, value, None, 0.5)).abs().max() > 1e-2  # the bias mattered


def test_engine_uses_the_decode_attention(model_dir, tok):
    from asyncrl.generator.hf import DECODE_ATTENTION

    assert engine_for(model_dir, tok).model.config._attn_implementation == DECODE_ATTENTION
