"""The ``sglang`` engine's request building and response parsing, against payloads in
the formats of SGLang 0.5.x's source (no SGLang needed): ``/generate`` outputs
(``output_ids``, ``meta_info.output_token_logprobs`` / ``output_top_logprobs`` rows
``[logprob, token_id, text]``, ``finish_reason``), ``/update_weights_from_disk`` replies
``{"success", "message", "num_paused_requests"}`` (HTTP 400 when refused), refused
requests ``{"error": {"message"}}`` with HTTP 400, and ``/flush_cache``'s plain text."""

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


def fake_server(calls, *, original_logprob=False, update=(200, {"success": True, "message": "Succeeded to update "
                                                                 "model weights.", "num_paused_requests": 0})):
    """An SGLang 0.5.x server's answers, recorded: /generate (the log-prob probe among
    them: the top log-prob of one token depends on the temperature unless the server
    returns original log-probs) and /update_weights_from_disk."""

    def post(url, body, timeout_s):
        calls.append((url, body))
        if url.endswith("/generate"):
            if body.get("top_logprobs_num"):
                t = 1.0 if original_logprob else body["sampling_params"]["temperature"]
                return 200, [dict(out([3], [-0.5 / t], {"type": "length", "length": 1}),
                                  meta_info=dict(out([3], [-0.5 / t], {"type": "length", "length": 1})["meta_info"],
                                                 output_top_logprobs=[[[-0.5 / t, 3, None]]]))]
            return 200, [out([3], [-0.5], {"type": "length", "length": 1})] * len(body["input_ids"])
        if url.endswith("/update_weights_from_disk"):
            return update
        return 404, {"detail": "Not Found"}

    return post


def model_dir(tmp_path):
    import json

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    (model / "tokenizer.json").write_text("{}")
    return model


def test_server_mode_posts_payloads(monkeypatch, tmp_path):
    """Server mode without a server: the HTTP layer is replaced by a recorder. The
    weights are streamed into one safetensors file (tied head left out), loaded with
    one /update_weights_from_disk (0.5.x flushes the cache in it: no /flush_cache)."""
    import torch

    from asyncrl.generator import sglang_engine

    calls = []
    monkeypatch.setattr(sglang_engine, "_post", fake_server(calls))
    eng = SGLangEngine(str(model_dir(tmp_path)), url="http://h:1/", weights_dir=str(tmp_path / "w"))
    assert [b["sampling_params"]["temperature"] for _, b in calls] == [0.5, 2.0]  # the log-prob probe
    calls.clear()
    groups = eng.generate([[5]], SamplingParams(n=3, max_tokens=1))
    assert len(groups[0]) == 3 and calls[0][0] == "http://h:1/generate"
    emb, norm = torch.randn(4, 2), torch.randn(2).bfloat16()
    eng.load_weights([("model.embed_tokens.weight", emb), ("lm_head.weight", emb), ("model.norm.weight", norm)],
                     version=2)
    assert eng.version == 2
    assert [u for u, _ in calls[1:]] == ["http://h:1/update_weights_from_disk"]
    assert calls[1][1] == {"model_path": str(tmp_path / "w")}
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "w" / "model.safetensors"))
    assert list(saved) == ["model.embed_tokens.weight", "model.norm.weight"]
    assert torch.equal(saved["model.embed_tokens.weight"], emb) and torch.equal(saved["model.norm.weight"], norm)
    assert (tmp_path / "w" / "config.json").exists() and (tmp_path / "w" / "tokenizer.json").exists()


def test_server_refusals_are_read_from_the_body(monkeypatch, tmp_path):
    """HTTP 400 is an answer: the error says what SGLang said, it is not a transport error."""
    from asyncrl.generator import sglang_engine

    refused = (400, {"success": False, "message": "Failed to get weights iterator: no safetensors",
                     "num_paused_requests": 0})
    monkeypatch.setattr(sglang_engine, "_post", fake_server([], update=refused))
    eng = SGLangEngine(str(model_dir(tmp_path)), url="http://h:1", weights_dir=str(tmp_path / "w"))
    import torch

    with pytest.raises(SGLangError, match="version 3 failed: Failed to get weights iterator"):
        eng.load_weights([("model.norm.weight", torch.ones(2))], version=3)
    assert eng.version == 0

    def bad_request(url, body, timeout_s):
        return 400, {"error": {"message": "The input_ids 99999 exceed the vocabulary"}}

    monkeypatch.setattr(sglang_engine, "_post", bad_request)
    with pytest.raises(SGLangError, match=r"refused /generate \(HTTP 400\): The input_ids 99999"):
        eng.generate([[5]], SamplingParams(n=1, max_tokens=1))


def test_server_returning_original_logprobs_is_refused(monkeypatch, tmp_path):
    """SGLANG_RETURN_ORIGINAL_LOGPROB set on the server (not here): caught by the probe."""
    from asyncrl.generator import sglang_engine

    monkeypatch.setattr(sglang_engine, "_post", fake_server([], original_logprob=True))
    with pytest.raises(SGLangError, match="without temperature scaling"):
        SGLangEngine(str(model_dir(tmp_path)), url="http://h:1", weights_dir=str(tmp_path / "w"))


@pytest.mark.parametrize("resp, want", [
    ({"success": True, "message": "ok", "num_paused_requests": 0}, (True, "ok")),
    ({"success": False, "message": "busy"}, (False, "busy")),
    ({"error": {"message": "bad"}}, (False, "bad")),
    ("Cache flushed.\nPlease check backend logs for more details.", (False, "Cache flushed.\nPlease check backend "
                                                                     "logs for more details.")),
    ((True, "Success"), (True, "Success")),
    (None, (True, "")),
])
def test_status_reads_every_reply_shape(resp, want):
    from asyncrl.generator.sglang_engine import _status

    assert _status(resp) == want


class FakeInProcess:
    """sglang.Engine's weight API as 0.5.x has it: update_weights_from_tensor only
    inside a begin/end session; flush_cache answers a FlushCacheReqOutput."""

    def __init__(self):
        self.calls, self.open = [], False

    def begin_weight_update(self):
        assert not self.open
        self.open = True
        self.calls.append("begin")

    def update_weights_from_tensor(self, named_tensors, flush_cache=True):
        if not self.open:
            return False, "update_weights_from_tensor requires an open begin_weight_update session"
        self.calls.append(("bucket", [n for n, _ in named_tensors], flush_cache))
        return True, "Success"

    def end_weight_update(self):
        assert self.open
        self.open = False
        self.calls.append("end")

    def flush_cache(self):
        self.calls.append("flush")

        class Out:
            success, message = True, ""

        return Out()


def test_in_process_update_is_one_session_of_buckets_then_one_flush(tmp_path):
    import torch

    eng = SGLangEngine.__new__(SGLangEngine)
    eng.engine, eng.bucket_bytes, eng.version = FakeInProcess(), 64, 0
    named = [(f"w{i}", torch.zeros(8)) for i in range(5)]  # 32 bytes each: two per 64-byte bucket
    eng.load_weights(named, version=1)
    assert eng.engine.calls == ["begin", ("bucket", ["w0", "w1"], False), ("bucket", ["w2", "w3"], False),
                                ("bucket", ["w4"], False), "end", "flush"]
    assert eng.version == 1
