"""A single-turn task through the environment protocol returns exactly what the worker
returned before it (issue #18): same sampled tokens, log-probs, versions, rewards
(overlong penalty included) and finish reasons for the same seed, on the hf engine.

The oracle is the pre-protocol ``run_prompts`` (one ``engine.generate`` over the
groups' prompts with ``n`` samples each, the verifier through the reward pool), kept
here as it was. Also: the hf engine's per-prompt limits (which multi-turn rounds use)
cut each row to a prefix of what it samples without them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncrl.generator.engine import SamplingParams
from asyncrl.generator.hf import HFEngine
from asyncrl.generator.sglang_engine import build_generate_request
from asyncrl.generator.worker import Worker, batch_seed
from asyncrl.models import load_model, load_tokenizer
from asyncrl.rewards import RewardPool
from asyncrl.tasks.arith import ArithTask
from asyncrl.wire.codec import trajectory_arrays
from asyncrl.wire.schema import PromptGroup, Prompts

BASE = "builtin:quickstart-base"  # warm-started: it ends answers with EOS and solves some, so rewards differ


def old_run_prompts(engine, tok, msg: Prompts, rewards: RewardPool):
    """The worker's sampling and scoring before the environment protocol."""
    params = SamplingParams(n=msg.n, max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p,
                            stop_token_ids=(tok.eos_token_id,))
    outs = engine.generate([g.prompt_ids for g in msg.groups], params)
    items = [(g.data_source, tok.decode(c.token_ids, skip_special_tokens=True), g.ground_truth)
             for g, comps in zip(msg.groups, outs) for c in comps]
    scores = iter(rewards.rewards(items, [len(c.token_ids) for comps in outs for c in comps], msg.max_tokens,
                                  train=msg.purpose == "train"))
    return [[(c.token_ids, c.logprobs, c.versions, c.finish_reason, next(scores)) for c in comps] for comps in outs]


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return load_model(BASE, "float32"), load_tokenizer(BASE)


def _msg(tok, max_tokens: int) -> Prompts:
    task = ArithTask()
    probs = [task.sample(3, i) for i in range(4)]
    return Prompts(groups=[PromptGroup(group_id=20 + i, prompt_ids=tok.encode(p.prompt, add_special_tokens=False),
                                       ground_truth=p.ground_truth, data_source=p.data_source)
                           for i, p in enumerate(probs)],
                   min_version=0, n=3, temperature=1.0, top_p=1.0, max_tokens=max_tokens)


def test_single_turn_equals_the_pre_protocol_worker(base):
    model, tok = base
    msg = _msg(tok, max_tokens=37)  # its answers run 30-39 tokens: some end at EOS, some are cut
    pool = RewardPool(0, overlong_buffer_len=10, overlong_penalty_factor=0.5)
    worker = Worker(HFEngine(model, pad_id=tok.pad_token_id, version=2), tok, link=None, worker_id=0, seed=11,
                    rewards=pool)
    worker.poll = lambda: None
    got = []
    for header, frames in worker.generate(msg):
        got.append([(a.token_ids.tolist(), a.logprobs.tolist(), a.versions.tolist(), m.finish_reason, m.reward)
                    for a, m in zip(trajectory_arrays(header, frames), header.samples)])
        assert all(a.mask.tolist() == [1] * len(a.token_ids) for a in trajectory_arrays(header, frames))
    engine = HFEngine(model, pad_id=tok.pad_token_id, version=2)
    engine.reseed(batch_seed(11, msg.groups[0].group_id, 2))
    want = old_run_prompts(engine, tok, msg, pool)
    # the same tokens, versions, finish reasons and rewards; the log-probs to float32
    # rounding (exact equality failed 2 runs in 7 next to other tests, never alone;
    # suspected: the two engines' buffers sit at other addresses and take other MKL paths)
    strip = [[(t, v, f, r) for t, _, v, f, r in g] for g in got]
    assert strip == [[(t, v, f, r) for t, _, v, f, r in g] for g in want]
    lp, lp_want = [s[1] for g in got for s in g], [s[1] for g in want for s in g]
    for a, b in zip(lp, lp_want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    flat = [s for g in got for s in g]
    assert len({r for *_, r in flat}) > 1 and {f for *_, f, _ in flat} == {"stop", "length"}  # the check has teeth


def test_hf_per_prompt_limits_cut_rows_to_prefixes(base):
    model, tok = base
    prompts = [tok.encode("123+456+789=", add_special_tokens=False), tok.encode("1+2+3=", add_special_tokens=False)]
    free = SamplingParams(n=2, max_tokens=30, stop_token_ids=(tok.eos_token_id,))
    limited = SamplingParams(n=2, max_tokens=30, stop_token_ids=(tok.eos_token_id,), limits=(5, 30))
    a = HFEngine(model, pad_id=tok.pad_token_id, seed=3).generate(prompts, free)
    b = HFEngine(model, pad_id=tok.pad_token_id, seed=3).generate(prompts, limited)
    for x, y in zip(a[0], b[0]):  # limit 5: the first 5 tokens of the free sample, unless it stopped sooner
        assert y.token_ids == x.token_ids[:5] and y.logprobs == x.logprobs[:5]
        assert y.finish_reason == ("stop" if len(x.token_ids) <= 5 else "length")
    assert [(c.token_ids, c.finish_reason) for c in a[1]] == [(c.token_ids, c.finish_reason) for c in b[1]]
    with pytest.raises(ValueError, match="limits"):
        HFEngine(model, pad_id=tok.pad_token_id).generate(prompts, SamplingParams(n=1, max_tokens=4, limits=(5, 2)))
    with pytest.raises(ValueError, match="token ids only"):
        HFEngine(model, pad_id=tok.pad_token_id).generate(prompts, SamplingParams(n=1, max_tokens=4,
                                                                                  stop_strings=("</calc>",)))


def test_sglang_request_carries_one_limit_per_row():
    req = build_generate_request([[1, 2], [3]], SamplingParams(n=2, max_tokens=9, stop_token_ids=(1, 7),
                                                                limits=(4, 9)))
    assert req["input_ids"] == [[1, 2], [1, 2], [3], [3]]
    assert [s["max_new_tokens"] for s in req["sampling_params"]] == [4, 4, 9, 9]
    assert all(s["stop_token_ids"] == [1, 7] for s in req["sampling_params"])
    same = build_generate_request([[1, 2]], SamplingParams(n=2, max_tokens=9))
    assert same["sampling_params"]["max_new_tokens"] == 9  # no limits: today's single dict
    with pytest.raises(ValueError, match="token ids only"):
        build_generate_request([[1]], SamplingParams(n=1, max_tokens=4, stop_strings=("</calc>",)))
