"""The ``sglang`` engine's request building and response parsing, against payloads
written by hand in SGLang's documented format (no SGLang needed)."""

from __future__ import annotations

import pytest

from asyncrl.generator.engine import SamplingParams
from asyncrl.generator.sglang_engine import (
    SGLangEngine,
    SGLangError,
    build_generate_request,
    parse_generate_response,
)


def out(ids, lps, finish):
    """One /generate output as SGLang returns it with skip_tokenizer_init and return_logprob."""
    return {
        "output_ids": ids,
        "meta_info": {
            "id": "abc",
            "prompt_tokens": 3,
            "completion_tokens": len(ids),
            "finish_reason": finish,
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, ids)],
        },
    }


def test_request_rows_are_prompt_major_with_sampling_fields():
    req = build_generate_request([[5, 6], [7]], SamplingParams(n=2, max_tokens=9, temperature=0.7, stop_token_ids=(1,)))
    assert req == {
        "input_ids": [[5, 6], [5, 6], [7], [7]],
        "sampling_params": {"max_new_tokens": 9, "temperature": 0.7, "top_p": 1.0, "stop_token_ids": [1]},
        "return_logprob": True,
    }


def test_request_refuses_top_p_below_one():
    with pytest.raises(ValueError, match="top_p"):
        build_generate_request([[5]], SamplingParams(n=1, max_tokens=4, top_p=0.9))


def test_parse_groups_samples_per_prompt_and_reads_logprobs():
    resp = [
        out([3, 4, 1], [-0.5, -1.25, -0.125], {"type": "stop", "matched": 1}),
        out([9, 9], [-2.0, -3.0], {"type": "length", "length": 2}),
        out([1], [-0.75], {"type": "stop", "matched": 1}),
        out([2, 2], [-1.0, -1.5], {"type": "length", "length": 2}),
    ]
    groups = parse_generate_response(resp, num_prompts=2, n=2, version=7)
    assert [[c.token_ids for c in g] for g in groups] == [[[3, 4, 1], [9, 9]], [[1], [2, 2]]]
    assert groups[0][0].logprobs == [-0.5, -1.25, -0.125]
    assert [c.finish_reason for g in groups for c in g] == ["stop", "length", "stop", "length"]
    assert groups[1][1].versions == [7, 7]


def test_parse_single_dict_response():
    groups = parse_generate_response(out([4], [-0.25], {"type": "length", "length": 1}), num_prompts=1, n=1, version=0)
    assert groups[0][0].token_ids == [4] and groups[0][0].logprobs == [-0.25]


@pytest.mark.parametrize(
    "resp, match",
    [
        ([out([4], [-0.1], {"type": "stop"})], "expected 2 outputs"),
        ([{"output_ids": [4], "meta_info": {"finish_reason": {"type": "stop"}}}] * 2, "output_token_logprobs"),
        ([out([4], [-0.1], {"type": "abort", "message": "x"})] * 2, "finish_reason"),
        ([dict(out([4], [-0.1], {"type": "stop"}), output_ids=[5])] * 2, "disagree"),
    ],
)
def test_parse_rejects_what_it_cannot_use(resp, match):
    with pytest.raises(SGLangError, match=match):
        parse_generate_response(resp, num_prompts=1, n=2, version=0)


def test_engine_refuses_original_logprob_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "true")
    with pytest.raises(ValueError, match="SGLANG_RETURN_ORIGINAL_LOGPROB"):
        SGLangEngine(str(tmp_path), url="http://127.0.0.1:1")


def test_server_mode_posts_payloads(monkeypatch, tmp_path):
    """Server mode without a server: the HTTP layer is replaced by a recorder."""
    import json

    import torch

    from asyncrl.generator import sglang_engine

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    (model / "tokenizer.json").write_text("{}")
    calls = []

    def fake_post(url, body, timeout_s):
        calls.append((url, body))
        if url.endswith("/generate"):
            return [out([3], [-0.5], {"type": "length", "length": 1})] * len(body["input_ids"])
        return {"success": True, "message": "ok", "num_paused_requests": 0}

    monkeypatch.setattr(sglang_engine, "_post", fake_post)
    eng = SGLangEngine(str(model), url="http://h:1/", weights_dir=str(tmp_path / "w"))
    groups = eng.generate([[5]], SamplingParams(n=3, max_tokens=1))
    assert len(groups[0]) == 3 and calls[0][0] == "http://h:1/generate"
    emb = torch.randn(4, 2)
    eng.load_weights([("model.embed_tokens.weight", emb), ("lm_head.weight", emb)], version=2)
    assert eng.version == 2
    assert [u for u, _ in calls[1:]] == ["http://h:1/update_weights_from_disk", "http://h:1/flush_cache"]
    assert calls[1][1] == {"model_path": str(tmp_path / "w")}
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "w" / "model.safetensors"))
    assert list(saved) == ["model.embed_tokens.weight"] and torch.equal(saved["model.embed_tokens.weight"], emb)
    assert (tmp_path / "w" / "config.json").exists() and (tmp_path / "w" / "tokenizer.json").exists()
