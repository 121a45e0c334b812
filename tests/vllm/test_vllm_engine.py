"""The ``vllm`` engine against the learner's own arithmetic: sampled log-probs equal a
float32 transformers recomputation at the sampling temperature, and a weight update
is served at once (prefix cache included)."""

from __future__ import annotations

import pytest
import torch

from asyncrl.generator.engine import SamplingParams

pytestmark = pytest.mark.vllm

EOS = 1
TOL = 1e-4
# After an update to randomly perturbed weights, the comparison is against a float64
# copy of those weights and this looser bound: one CI host served them 1.1-1.5e-4 away
# from float32 HF, in-process only (here: ~1e-6; not reproduced, not explained). What
# these tests show is which weights are served: the other weights are > 1e-2 away.
TOL_UPDATED = 1e-3


def hf_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each completion token, in the model's dtype (float32 or
    float64), one forward pass."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # (C, V), the model's dtype
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def float64_copy(model):
    import copy

    return copy.deepcopy(model).double()


def max_error(model, prompts, outs, temperature) -> float:
    err = 0.0
    for prompt, comps in zip(prompts, outs):
        for c in comps:
            ref = hf_logprobs(model, prompt, c.token_ids, temperature)
            err = max(err, (torch.tensor(c.logprobs) - ref).abs().max().item())
    return err


@pytest.fixture(scope="module")
def hf_model(vllm_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()


PROMPTS = [[5, 6, 7, 15, 8], [9, 9, 3, 12, 4, 20, 11, 2], [14]]


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_logprobs_match_learner(vllm_engine, hf_model, temperature):
    params = SamplingParams(n=4, max_tokens=24, temperature=temperature, stop_token_ids=(EOS,))
    outs = vllm_engine.generate(PROMPTS, params)
    assert [len(o) for o in outs] == [4, 4, 4]
    for comps in outs:
        for c in comps:
            assert len(c.token_ids) == len(c.logprobs) == len(c.versions) >= 1
            assert c.versions == [vllm_engine.version] * len(c.token_ids)
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1]
            else:
                assert c.finish_reason == "length" and len(c.token_ids) == 24 and EOS not in c.token_ids
    assert max_error(hf_model, PROMPTS, outs, temperature) < TOL


def test_weight_update_is_served_at_once(vllm_engine, hf_model, vllm_model_dir):
    from transformers import AutoModelForCausalLM

    prompt = [[(3 * i) % 19 + 2 for i in range(160)]]  # > one KV block (128 tokens on CPU): prefix-cached on reuse
    params = SamplingParams(n=2, max_tokens=8, temperature=1.0, stop_token_ids=(EOS,))
    vllm_engine.generate(prompt, params)  # fill the prefix cache with the old weights' KV
    before = vllm_engine.generate(prompt, params)
    assert max_error(hf_model, prompt, before, 1.0) < TOL

    new = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # names as the learner publishes them: the tied lm_head.weight included
    named = [(n, p.detach().clone()) for n, p in new.named_parameters(remove_duplicate=False)]
    assert "lm_head.weight" in dict(named)
    old_version = vllm_engine.version
    vllm_engine.load_weights(named, version=old_version + 1)
    try:
        assert vllm_engine.version == old_version + 1
        after = vllm_engine.generate(prompt, params)
        assert all(c.versions == [old_version + 1] * len(c.token_ids) for c in after[0])
        assert max_error(float64_copy(new), prompt, after, 1.0) < TOL_UPDATED
        assert max_error(hf_model, prompt, after, 1.0) > 1e-2  # and not the old weights'
    finally:  # other tests share this engine: put the original weights back
        vllm_engine.load_weights(list(hf_model.named_parameters(remove_duplicate=False)), version=old_version)


def test_prefix_cache_would_be_stale_without_reset(vllm_engine, hf_model):
    """The control for the test above: loading weights without resetting vLLM's
    prefix cache serves KV computed by the old weights."""
    prompt = [[(5 * i) % 19 + 2 for i in range(160)]]
    params = SamplingParams(n=1, max_tokens=4, temperature=1.0, stop_token_ids=(EOS,))
    vllm_engine.generate(prompt, params)
    scaled = [(n, p.detach() * (1.5 if n.endswith("mlp.down_proj.weight") else 1.0)) for n, p in hf_model.named_parameters()]
    vllm_engine._load_buckets(scaled)  # what load_weights does, without reset_prefix_cache()
    try:
        stale = vllm_engine.generate(prompt, params)
        import copy

        new = copy.deepcopy(hf_model)
        new.load_state_dict(dict(scaled), strict=False)
        assert max_error(new, prompt, stale, 1.0) > 1e-3
    finally:
        vllm_engine.load_weights(list(hf_model.named_parameters(remove_duplicate=False)), version=vllm_engine.version)


def test_weights_loaded_between_decode_steps(vllm_engine, hf_model, vllm_model_dir):
    """An update in flight: tokens before it carry the old version and the old
    weights' log-probs, tokens after it the new ones (prefix re-encoded)."""
    from transformers import AutoModelForCausalLM

    new = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(2)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn_like(p))
    named = [(n, p.detach().clone()) for n, p in new.named_parameters(remove_duplicate=False)]
    v0, steps = vllm_engine.version, []

    def between_steps():
        steps.append(1)
        if len(steps) == 3:
            vllm_engine.load_weights(named, version=v0 + 1)

    prompts = [[5, 6, 7], [(3 * i) % 19 + 2 for i in range(140)]]
    params = SamplingParams(n=3, max_tokens=10, temperature=1.0)  # vLLM still stops at the model's EOS
    try:
        outs = vllm_engine.generate(prompts, params, between_steps=between_steps)
        new64, spanning, off_old = float64_copy(new), 0, 0.0
        for prompt, comps in zip(prompts, outs):
            for c in comps:
                n = len(c.token_ids)
                k = c.versions.index(v0 + 1) if v0 + 1 in c.versions else n  # finished before the update
                assert c.versions == [v0] * k + [v0 + 1] * (n - k)
                spanning += 0 < k < n
                old = hf_logprobs(hf_model, prompt, c.token_ids, 1.0)
                upd = hf_logprobs(new64, prompt, c.token_ids, 1.0)
                lp = torch.tensor(c.logprobs)
                assert (lp[:k] - old[:k]).abs().max() < TOL
                if k < n:
                    assert (lp[k:] - upd[k:]).abs().max() < TOL_UPDATED
                    off_old = max(off_old, (lp[k:] - old[k:]).abs().max().item())
        assert spanning >= 1
        assert off_old > 1e-2  # the tokens after the update were not the old weights'
    finally:
        vllm_engine.load_weights(list(hf_model.named_parameters(remove_duplicate=False)), version=v0)


def test_interrupted_batch_is_released(vllm_engine, hf_model):
    """generator.on_weight_update=restart: ``between_steps`` raising GenerationInterrupted
    abandons the batch; its requests leave the engine, and the next batch runs clean."""
    from asyncrl.generator.engine import GenerationInterrupted

    steps = []

    def between_steps():
        steps.append(1)
        if len(steps) == 2:
            raise GenerationInterrupted

    params = SamplingParams(n=2, max_tokens=16, temperature=1.0)
    with pytest.raises(GenerationInterrupted):
        vllm_engine.generate(PROMPTS, params, between_steps=between_steps)
    assert not vllm_engine.llm.llm_engine.has_unfinished_requests()

    def only_while_running():  # never after the last request finished: restart would resample a finished batch
        assert vllm_engine.llm.llm_engine.has_unfinished_requests()

    outs = vllm_engine.generate(PROMPTS, params, between_steps=only_while_running)
    assert [len(o) for o in outs] == [2, 2, 2]
    assert max_error(hf_model, PROMPTS, outs, 1.0) < TOL


def test_weights_by_broadcast_reach_every_tensor_parallel_rank(vllm_engine, hf_model, vllm_model_dir):
    """transport.weights=nccl, here over gloo: each of the engine's workers (one per
    tensor-parallel rank) joins the learner's broadcast group itself and loads its shard
    of every bucket; the learner leaves the tied head out, the workers fill it in."""
    import threading

    from transformers import AutoModelForCausalLM

    from asyncrl.wire.weights import BroadcastWeightReceiver, BroadcastWeightSender
    from testkit import free_port

    new = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn_like(p))
    named = [(n, p.detach().clone()) for n, p in new.named_parameters()]  # tied: no lm_head.weight
    assert "lm_head.weight" not in dict(named)
    tp, port, v0 = vllm_engine.tensor_parallel_size, free_port(), vllm_engine.version
    sender = BroadcastWeightSender("127.0.0.1", port, num_generators=1, backend="gloo", timeout_s=120,
                                   bucket_bytes=16 << 10, ranks_per_generator=tp)
    receiver = BroadcastWeightReceiver("127.0.0.1", port, worker_id=0, num_generators=1, backend="gloo",
                                       timeout_s=120, ranks_per_generator=tp)
    msg, _ = sender.notice(named, v0 + 1)
    assert len(msg.buckets) > 3
    learner = threading.Thread(target=sender.after_notice, args=(named,))
    learner.start()
    try:
        vllm_engine.load_weights(receiver.receive(msg, []), v0 + 1)
        learner.join(120)
        prompt = [[(3 * i) % 19 + 2 for i in range(40)], [5, 6, 7]]
        outs = vllm_engine.generate(prompt, SamplingParams(n=2, max_tokens=8, temperature=1.0, stop_token_ids=(EOS,)))
        assert all(c.versions == [v0 + 1] * len(c.token_ids) for g in outs for c in g)
        assert max_error(float64_copy(new), prompt, outs, 1.0) < TOL_UPDATED
        assert max_error(hf_model, prompt, outs, 1.0) > 1e-2
    finally:
        sender.close()
        vllm_engine.load_weights(list(hf_model.named_parameters(remove_duplicate=False)), version=v0)
