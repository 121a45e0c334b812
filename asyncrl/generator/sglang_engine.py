"""The ``sglang`` engine: SGLang behind the ``Engine`` protocol, in-process or over HTTP.

Two ways to reach SGLang (CUDA only; not runnable on the CPU machines CI uses):
- in-process ``sglang.Engine`` (``generator.sglang.url`` empty): weights are replaced
  with ``update_weights_from_tensor`` (which flushes the radix cache);
- a running server (``generator.sglang.url: http://host:port``): requests go to
  ``POST /generate``; weights are written as safetensors to a directory the server can
  read (streamed bucket by bucket: the generator never holds the whole model) and
  loaded with ``POST /update_weights_from_disk``, which flushes the radix cache itself.

In-process updates run inside SGLang's weight-update session where the installed
version has one (``begin_weight_update`` / ``end_weight_update``: 0.5.x refuses
``update_weights_from_tensor`` outside it), one ``update_weights_from_tensor`` call per
bucket (``transport.bucket_mb``; each moves only its bucket to the GPU), and one cache
flush after the last bucket.

Server replies are read from the JSON body whatever the HTTP status: SGLang answers a
refused request with 400 and ``{"success": false, "message": ...}`` (or an ``error``
object), and that message is what the error must say.

The request payload and the response parsing are pure functions
(:func:`build_generate_request`, :func:`parse_generate_response`) so they are unit
tested without SGLang. Field names follow SGLang's ``GenerateReqInput`` (input_ids,
sampling_params with max_new_tokens / temperature / top_p / stop_token_ids,
return_logprob) and its output (``output_ids``, ``meta_info.output_token_logprobs`` as
``[logprob, token_id, text]`` rows, ``meta_info.finish_reason.type`` "stop" or "length").

Log-probs: SGLang returns log-softmax of logits / temperature (unless the server sets
``SGLANG_RETURN_ORIGINAL_LOGPROB``, which drops the temperature), and does not
renormalise over the top-p nucleus. Both would make the behaviour log-probs wrong, so
this engine refuses ``top_p < 1``, and checks the log-prob mode where it applies, on
the server's side: at start-up it asks for the top log-prob of one next token at two
temperatures (:func:`check_logprob_mode`); equal answers mean the server ignores the
temperature. The variable in this process's environment is refused too (an in-process
engine's scheduler inherits it).

Multi-turn episodes (``asyncrl.envs.runner``) send each turn as one such request with
the episode's whole context (per-row ``max_new_tokens`` when budgets differ); SGLang's
radix cache serves the part it computed in the previous turn. Stop strings are refused
(the in-process engine has no tokenizer): tool delimiters must be single tokens, which
arrive as ``stop_token_ids``. Weights wait for a turn to finish, and load between turns.

Written against SGLang 0.5.x (``pyproject``: ``sglang>=0.5.9,<0.6``); the payload tests
(tests/unit/test_sglang_payloads.py) use that version's request and reply formats.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from asyncrl.generator.engine import Completion, SamplingParams
from asyncrl.wire.weights import WeightStream, iter_buckets

log = logging.getLogger(__name__)


class SGLangError(RuntimeError):
    """SGLang answered something this engine cannot use."""


def check_params(params: SamplingParams) -> None:
    if params.stop_strings:
        # the in-process engine runs without a tokenizer (skip_tokenizer_init), so it cannot
        # match text; one-token delimiters arrive as stop_token_ids instead
        raise ValueError(f"generator.engine=sglang stops on token ids only, not on the strings "
                         f"{params.stop_strings}: use delimiters that are one token each, or generator.engine=vllm")
    if params.top_p < 1.0:
        raise ValueError(
            "generator.engine=sglang returns log-probs of softmax(logits / T) without top-p "
            "renormalisation, which are not the sampling distribution when top_p < 1; "
            "set generator.top_p=1.0 or use generator.engine=vllm"
        )


def build_generate_request(prompts: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    """The ``/generate`` body (also ``Engine.generate``'s keyword arguments): one row per
    sample, prompt-major (``params.n`` copies of each prompt, so the radix cache shares
    the prompt), sampled-token log-probs only. Per-prompt ``params.limits`` (multi-turn
    rounds) make ``sampling_params`` a list, one per row, as ``GenerateReqInput`` takes."""
    check_params(params)
    params.check(len(prompts))
    rows = [list(map(int, p)) for p in prompts for _ in range(params.n)]
    sampling = {
        "max_new_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stop_token_ids": list(params.stop_token_ids),
    }
    if params.limits:
        per_row = [dict(sampling, max_new_tokens=params.limit(i // params.n)) for i in range(len(rows))]
        return {"input_ids": rows, "sampling_params": per_row, "return_logprob": True}
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
    in-process engine, ``{"success", "message", ...}`` from the server (also with an
    error status), ``{"error": {"message"}}`` or plain text from a refused request."""
    if resp is None:  # in-process calls that answer nothing (begin/end on some versions)
        return True, ""
    if isinstance(resp, dict):
        if "success" in resp:
            return bool(resp["success"]), str(resp.get("message", ""))
        err = resp.get("error")
        if err is not None:
            return False, str(err.get("message", err) if isinstance(err, dict) else err)
    if isinstance(resp, (tuple, list)) and resp:
        return bool(resp[0]), str(resp[1]) if len(resp) > 1 else ""
    if isinstance(resp, str):
        return False, resp[:500]
    raise SGLangError(f"unexpected weight-update answer {resp!r}")


def _post(url: str, body: dict[str, Any] | None, timeout_s: float) -> tuple[int, Any]:
    """(HTTP status, body as JSON, or as text when it is not JSON). A 4xx/5xx reply is
    an answer, not a transport error: SGLang says in its body why it refused."""
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:  # noqa: S310 - a configured SGLang URL
            status, text = r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def _reply(status: int, resp: Any, what: str) -> Any:
    """The body of a successful reply; else SGLangError with SGLang's own message."""
    if status == 200:
        return resp
    _, message = _status(resp) if isinstance(resp, (dict, str)) else (False, repr(resp)[:500])
    raise SGLangError(f"SGLang refused {what} (HTTP {status}): {message}")


def probe_request(temperature: float, prompt: list[int]) -> dict[str, Any]:
    """One next token with its top log-prob, for :func:`check_logprob_mode`."""
    return {"input_ids": [list(prompt)], "return_logprob": True, "top_logprobs_num": 1,
            "sampling_params": {"max_new_tokens": 1, "temperature": temperature}}


def check_logprob_mode(generate: Callable[[dict[str, Any]], Any], prompt: list[int] = (1, 2, 3)) -> None:
    """Refuse a server that returns log-probs without the temperature
    (``SGLANG_RETURN_ORIGINAL_LOGPROB`` in *its* environment): the top log-prob of one
    next token, same context, at temperatures 0.5 and 2.0, must differ."""
    top = []
    for t in (0.5, 2.0):
        resp = generate(probe_request(t, list(prompt)))
        out = resp[0] if isinstance(resp, list) else resp
        try:
            top.append(float(out["meta_info"]["output_top_logprobs"][0][0][0]))
        except (KeyError, IndexError, TypeError) as e:
            raise SGLangError(f"SGLang's probe answer has no meta_info.output_top_logprobs ({e!r})") from None
    if abs(top[0]) < 1e-6 and abs(top[1]) < 1e-6:  # a certain next token: no temperature can show
        log.warning("the log-prob mode probe was inconclusive (next token certain); not checked")
    elif abs(top[0] - top[1]) < 1e-6:
        raise SGLangError("the SGLang server returns log-probs without temperature scaling "
                          "(SGLANG_RETURN_ORIGINAL_LOGPROB is set where it runs); unset it there: asyncrl needs "
                          "the log-probs of the sampling distribution")


_ST_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def save_streaming(path: Path, named: Iterable[tuple[str, Tensor]], skip: frozenset[str] = frozenset()) -> int:
    """Write a safetensors file tensor by tensor (header first, from the names, dtypes
    and shapes known up front), so only the tensor being written is held; to a
    temporary name, then renamed. Returns the number of tensors written."""
    if isinstance(named, WeightStream):
        rows = [(m.name, m.dtype, list(m.shape)) for m in named.metas]
        source: Iterable[tuple[str, Tensor]] = named
    else:
        named = list(named)
        rows = [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in named]
        source = named
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in rows:
        if name in skip:
            continue
        n = _ST_ITEMSIZE[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": _ST_CODES[dtype], "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    written = 0
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name, t in source:
            if name in skip:
                continue
            t = t.detach().cpu().contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            written += 1
    if written != len(header):
        tmp.unlink(missing_ok=True)
        raise SGLangError(f"weight update ended after {written} of {len(header)} tensors")
    os.replace(tmp, path)
    return written


_ST_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2,
                "int8": 1, "uint8": 1, "bool": 1}


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
        bucket_bytes: int = 512 << 20,
        tp_size: int = 1,
        version: int = 0,
    ) -> None:
        if os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes"):
            raise ValueError("unset SGLANG_RETURN_ORIGINAL_LOGPROB: asyncrl needs log-probs after temperature")
        self.model_path = model_path
        self.url = url.rstrip("/") if url else None
        self.timeout_s = timeout_s
        self.weights_dir = Path(weights_dir) if weights_dir else None
        self.bucket_bytes = bucket_bytes
        self.version = version
        config = json.loads((Path(model_path) / "config.json").read_text())
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.engine = None
        if self.url is None:
            import sglang  # CUDA only; imported here so other engines never need it

            self.engine = sglang.Engine(model_path=model_path, dtype=dtype, random_seed=seed,
                                        mem_fraction_static=mem_fraction_static, skip_tokenizer_init=True,
                                        tp_size=tp_size, log_level="error")
        check_logprob_mode(self._generate)

    def _generate(self, req: dict[str, Any]) -> Any:
        if self.engine is not None:
            return self.engine.generate(**req)
        return _reply(*_post(f"{self.url}/generate", req, self.timeout_s), "/generate")

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, between_steps: Callable[[], None] | None = None
    ) -> list[list[Completion]]:
        """One blocking request; ``between_steps`` is never called: SGLang does not
        hand control back between decode steps, so new weights wait for the batch."""
        version = self.version
        resp = self._generate(build_generate_request(prompts, params))
        return parse_generate_response(resp, len(prompts), params.n, version)

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        if self.engine is not None:
            self._update_in_process(named_tensors, version)
        else:
            ok, msg = self._update_from_disk(named_tensors)
            if not ok:
                raise SGLangError(f"SGLang weight update to version {version} failed: {msg}")
        self.version = version

    def _update_in_process(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        """One weight-update session (where the version has them), a bucket per
        ``update_weights_from_tensor`` call, one cache flush at the end."""
        def check(resp: Any, what: str) -> None:
            ok, msg = _status(resp)
            if not ok:
                raise SGLangError(f"SGLang {what} for weights v{version} failed: {msg}")

        session = hasattr(self.engine, "begin_weight_update")
        if session:
            check(self.engine.begin_weight_update(), "begin_weight_update")
        try:
            for bucket in iter_buckets(named_tensors, self.bucket_bytes):
                check(self.engine.update_weights_from_tensor(named_tensors=[(n, t.contiguous()) for n, t in bucket],
                                                             flush_cache=False), "update_weights_from_tensor")
                del bucket
        finally:
            if session:
                check(self.engine.end_weight_update(), "end_weight_update")
        flushed = self.engine.flush_cache()  # a FlushCacheReqOutput; refused while requests run (none do here)
        if getattr(flushed, "success", flushed) is False:
            raise SGLangError(f"SGLang refused to flush its cache after weights v{version}: "
                              f"{getattr(flushed, 'message', '')}")

    def _update_from_disk(self, named: Iterable[tuple[str, Tensor]]) -> tuple[bool, str]:
        if self.weights_dir is None:
            raise ValueError("server mode needs weights_dir (generator.sglang.weights_dir) readable by the server")
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        for f in Path(self.model_path).iterdir():  # config + tokenizer next to the new weights
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                shutil.copy2(f, self.weights_dir / f.name)
        # a tied head is the embedding: SGLang ties it again when it loads
        skip = frozenset({"lm_head.weight"}) if self.tied else frozenset()
        save_streaming(self.weights_dir / "model.safetensors", named, skip)
        # 0.5.x flushes the radix cache as part of the update (and fails it when the flush
        # is refused), so no separate /flush_cache, which a busy server answers with 400
        status, resp = _post(f"{self.url}/update_weights_from_disk", {"model_path": str(self.weights_dir)},
                             self.timeout_s)
        ok, msg = _status(resp)
        return ok and status == 200, msg or f"HTTP {status}"

    def pause(self) -> None:
        """Stop admitting requests (server: ``/pause_generation``), e.g. around an
        update when other clients share the server."""
        if self.engine is None:
            _reply(*_post(f"{self.url}/pause_generation", {}, self.timeout_s), "/pause_generation")

    def resume(self) -> None:
        if self.engine is None:
            _reply(*_post(f"{self.url}/continue_generation", {}, self.timeout_s), "/continue_generation")

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
