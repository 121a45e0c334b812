"""The ``sglang`` engine on a real GPU: sampled log-probs equal a float32
transformers recomputation at the sampling temperature, and a weight update is
served at once. Needs sglang and CUDA; skipped elsewhere (SGLang is CUDA-only, so
CPU CI never runs it)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from asyncrl.generator.engine import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="SGLang needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang is not installed (pip install sglang)"),
]

EOS = 1


def hf_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    lp = torch.log_softmax(logits / temperature, dim=-1)
    return lp.gather(-1, torch.tensor(completion, device=model.device)[:, None])[:, 0].cpu()


def max_error(model, prompts, outs, temperature):
    return max((torch.tensor(c.logprobs) - hf_logprobs(model, p, c.token_ids, temperature)).abs().max().item()
               for p, comps in zip(prompts, outs) for c in comps)


def test_sglang_logprobs_and_weight_update(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    from asyncrl.generator.sglang_engine import SGLangEngine
    from asyncrl.models import save_hf, tiny_qwen3_config
    from asyncrl.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    save_hf(Qwen3ForCausalLM(tiny_qwen3_config(len(tok), tok.eos_token_id, tok.pad_token_id)), tok, tmp_path / "m")
    engine = SGLangEngine(str(tmp_path / "m"), dtype="float32", mem_fraction_static=0.3)
    try:
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).cuda().eval()
        prompts = [[5, 6, 7, 15, 8], [(3 * i) % 19 + 2 for i in range(160)]]
        for t in (0.7, 1.0):
            outs = engine.generate(prompts, SamplingParams(n=4, max_tokens=16, temperature=t, stop_token_ids=(EOS,)))
            assert max_error(ref, prompts, outs, t) < 1e-3  # GPU kernels: not bit-equal to transformers
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.05 * torch.randn_like(p))
        engine.load_weights([(n, p.detach().cpu()) for n, p in ref.named_parameters(remove_duplicate=False)], 1)
        outs = engine.generate(prompts, SamplingParams(n=2, max_tokens=8, temperature=1.0, stop_token_ids=(EOS,)))
        assert engine.version == 1 and all(c.versions == [1] * len(c.token_ids) for g in outs for c in g)
        assert max_error(ref, prompts, outs, 1.0) < 1e-3
    finally:
        engine.shutdown()
