"""A weight update that arrives mid-generation: per-token versions change exactly at
the update point, and the log-probs after it are those of the new weights (the KV
cache is rebuilt with them), while those before it are the old weights'."""

import torch
from transformers import AutoModelForCausalLM

from asyncrl.generator.engine import SamplingParams
from asyncrl.generator.hf import HFEngine


def _full_logprobs(model, prompt, tokens, temperature):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double() / temperature
    lp = torch.log_softmax(logits, -1)
    P = len(prompt)
    return lp[P - 1 : P - 1 + len(tokens)].gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_versions_switch_at_update_and_logprobs_follow_new_weights(tiny_model_dir):
    torch.manual_seed(0)
    old = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    new = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.3 * torch.randn_like(p))
    engine_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine = HFEngine(engine_model, pad_id=0, seed=3, version=4)
    update_at = 5  # the update lands before the 6th token is sampled
    calls = []

    def between_steps():
        calls.append(1)
        if len(calls) == update_at:
            engine.load_weights(list(new.state_dict().items()), version=5)

    prompts = [[3, 4, 5, 6], [7, 8]]  # different lengths: left padding is exercised
    T = 0.8
    outs = engine.generate(prompts, SamplingParams(n=2, max_tokens=12, temperature=T), between_steps=between_steps)
    for prompt, comps in zip(prompts, outs):
        for c in comps:
            assert len(c.token_ids) == 12  # no stop tokens: every sample runs across the update
            assert c.versions == [4] * update_at + [5] * (12 - update_at)
            lp = torch.tensor(c.logprobs, dtype=torch.float64)
            ref_old = _full_logprobs(old, prompt, c.token_ids, T)
            ref_new = _full_logprobs(new, prompt, c.token_ids, T)
            torch.testing.assert_close(lp[:update_at], ref_old[:update_at], atol=1e-4, rtol=0)
            torch.testing.assert_close(lp[update_at:], ref_new[update_at:], atol=1e-4, rtol=0)
            assert (lp[update_at:] - ref_old[update_at:]).abs().max() > 1e-3  # the update mattered
