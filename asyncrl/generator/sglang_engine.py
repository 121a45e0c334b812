"""The ``sglang`` engine: SGLang behind the ``Engine`` protocol, in-process or over HTTP.

Two ways to reach SGLang (CUDA only; not runnable on the CPU machines CI uses):
- in-process ``sglang.Engine`` (``generator.sglang.url`` empty): weights are replaced
  with ``update_weights_from_tensor`` (which flushes the radix cache);
- a running server (``generator.sglang.url: http://host:port``): requests go to
  ``POST /generate``; weights are written as safetensors to a directory the server can
  read and loaded with ``POST /update_weights_from_disk``, then ``/flush_cache``.

The request payload and the response parsing are pure functions
(:func:`build_generate_request`, :func:`parse_generate_response`) so they are unit
tested without SGLang. Field names follow SGLang's ``GenerateReqInput`` (input_ids,
sampling_params with max_new_tokens / temperature / top_p / stop_token_ids,
return_logprob) and its output (``output_ids``, ``meta_info.output_token_logprobs`` as
``[logprob, token_id, text]`` rows, ``meta_info.finish_reason.type`` "stop" or "length").

Log-probs: SGLang returns log-softmax of logits / temperature (unless the server sets
``SGLANG_RETURN_ORIGINAL_LOGPROB``, which drops the temperature), and does not
renormalise over the top-p nucleus. Both would make the behaviour log-probs wrong, so
this engine refuses ``top_p < 1`` and that environment variable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

from torch import Tensor

from asyncrl.generator.engine import Completion, SamplingParams

log = logging.getLogger(__name__)


class SGLangError(RuntimeError):
    """SGLang answered something this engine cannot use."""


def check_params(params: SamplingParams) -> None:
    if params.top_p < 1.0:
        raise ValueError(
            "generator.engine=sglang returns log-probs of softmax(logits / T) without top-p "
            "renormalisation, which are not the sampling distribution when top_p < 1; "
            "set generator.top_p=1.0 or use generator.engine=vllm"
        )


def build_generate_request(prompts: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    """The ``/generate`` body (also ``Engine.generate``'s keyword arguments): one row per
    sample, prompt-major (``params.n`` copies of each prompt, so the radix cache shares
    the prompt), sampled-token log-probs only."""
    check_params(params)
    rows = [list(map(int, p)) for p in prompts for _ in range(params.n)]
    sampling = {
        "max_new_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stop_token_ids": list(params.stop_token_ids),
    }
    return {"input_ids": rows, "sampling_params": sampling, "return_logprob": True}


def _completion(out: dict[str, Any], version: int) -> Completion:
    meta = out.get("meta_info")
    if not isinstance(meta, dict) or "output_token_logprobs" not in meta:
        raise SGLangError(f"SGLang output without meta_info.output_token_logprobs (keys: {sorted(out)})")
    rows = meta["output_token_logprobs"]
    ids = [int(r[1]) for r in rows]
    lps = [float(r[0]) for r in rows]
    if "output_ids" in out and list(out["output_ids"]) != ids:
        raise SGLangError("output_ids and output_token_logprobs disagree")
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type") if isinstance(finish, dict) else finish
    if kind not in ("stop", "length"):
        raise SGLangError(f"unexpected finish_reason {finish!r}")
    return Completion(ids, lps, [version] * len(ids), kind)


def parse_generate_response(resp: Any, num_prompts: int, n: int, version: int) -> list[list[Completion]]:
    """SGLang's answer to :func:`build_generate_request` -> ``n`` completions per prompt.
    ``version`` is the policy version the engine held for the whole (blocking) call."""
    outs = resp if isinstance(resp, list) else [resp]
    if len(outs) != num_prompts * n:
        raise SGLangError(f"expected {num_prompts * n} outputs ({num_prompts} prompts x n={n}), got {len(outs)}")
    comps = [_completion(o, version) for o in outs]
    return [comps[i * n : (i + 1) * n] for i in range(num_prompts)]


def _status(resp: Any) -> tuple[bool, str]:
    """(success, message) from SGLang's weight-update answers: a tuple from the
    in-process engine, ``{"success", "message", ...}`` from the server."""
    if isinstance(resp, dict):
        return bool(resp.get("success")), str(resp.get("message", ""))
    if isinstance(resp, (tuple, list)) and resp:
        return bool(resp[0]), str(resp[1]) if len(resp) > 1 else ""
    raise SGLangError(f"unexpected weight-update answer {resp!r}")


def _post(url: str, body: dict[str, Any] | None, timeout_s: float) -> Any:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout_s) as r:  # noqa: S310 - a configured SGLang URL
        text = r.read().decode()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class SGLangEngine:
    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        seed: int = 0,
        url: str | None = None,
        mem_fraction_static: float = 0.5,
        weights_dir: str | None = None,
        timeout_s: float = 600.0,
        version: int = 0,
    ) -> None:
        if os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes"):
            raise ValueError("unset SGLANG_RETURN_ORIGINAL_LOGPROB: asyncrl needs log-probs after temperature")
        self.model_path = model_path
        self.url = url.rstrip("/") if url else None
        self.timeout_s = timeout_s
        self.weights_dir = Path(weights_dir) if weights_dir else None
        self.version = version
        config = json.loads((Path(model_path) / "config.json").read_text())
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.engine = None
        if self.url is None:
            import sglang  # CUDA only; imported here so other engines never need it

            self.engine = sglang.Engine(model_path=model_path, dtype=dtype, random_seed=seed,
                                        mem_fraction_static=mem_fraction_static, skip_tokenizer_init=True,
                                        log_level="error")

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, between_steps: Callable[[], None] | None = None
    ) -> list[list[Completion]]:
        """One blocking request; ``between_steps`` is never called: SGLang does not
        hand control back between decode steps, so new weights wait for the batch."""
        req = build_generate_request(prompts, params)
        version = self.version
        if self.engine is not None:
            resp = self.engine.generate(**req)
        else:
            resp = _post(f"{self.url}/generate", req, self.timeout_s)
        return parse_generate_response(resp, len(prompts), params.n, version)

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        named = [(n, t.contiguous()) for n, t in named_tensors]
        if self.engine is not None:
            ok, msg = _status(self.engine.update_weights_from_tensor(named_tensors=named, flush_cache=True))
        else:
            ok, msg = self._update_from_disk(named)
        if not ok:
            raise SGLangError(f"SGLang weight update to version {version} failed: {msg}")
        self.version = version

    def _update_from_disk(self, named: list[tuple[str, Tensor]]) -> tuple[bool, str]:
        from safetensors.torch import save_file

        if self.weights_dir is None:
            raise ValueError("server mode needs weights_dir (generator.sglang.weights_dir) readable by the server")
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        for f in Path(self.model_path).iterdir():  # config + tokenizer next to the new weights
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                shutil.copy2(f, self.weights_dir / f.name)
        # a tied head is the embedding: saving both would share storage, which safetensors refuses
        state = {n: t.detach().cpu() for n, t in named if not (self.tied and n == "lm_head.weight")}
        save_file(state, str(self.weights_dir / "model.safetensors"))
        resp = _post(f"{self.url}/update_weights_from_disk", {"model_path": str(self.weights_dir)}, self.timeout_s)
        _post(f"{self.url}/flush_cache", None, self.timeout_s)  # older servers do not flush on update
        return _status(resp)

    def pause(self) -> None:
        """Stop admitting requests (server: ``/pause_generation``), e.g. around an
        update when other clients share the server."""
        if self.engine is None:
            _post(f"{self.url}/pause_generation", {}, self.timeout_s)

    def resume(self) -> None:
        if self.engine is None:
            _post(f"{self.url}/continue_generation", {}, self.timeout_s)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
