"""Methods mixed into vLLM's worker (``worker_extension_cls``) so the ``vllm`` engine
can replace weights in place through ``LLM.collective_rpc``, bucket by bucket.

Only small, msgpack-friendly arguments cross ``collective_rpc`` (strings, numbers,
lists): with vLLM's multiprocessing engine core the call is serialised to another
process, and with tensor parallelism broadcast again to every worker. The tensors
themselves reach the worker another way:

- ``asyncrl_load_bucket(path, layout)``: a bucket file written by the engine's client
  (flat bytes, one tensor after another, on tmpfs), memory-mapped here and read as
  views, so a bucket costs its own size once, not once per hop;
- ``asyncrl_broadcast_update(...)``: the worker joins the learner's weight broadcast
  group itself (nccl on GPUs, gloo on CPU) and receives every bucket, so each tensor
  parallel rank loads its own shard as the buckets arrive.

A load is vLLM's layerwise reload (the lifecycle of vLLM's own chunked weight-transfer
engines): ``initialize_layerwise_reload`` once, ``model.load_weights`` per bucket
(checkpoint names -> fused ``qkv_proj`` / ``gate_up_proj``; a layer is processed and
copied into the served tensors as soon as all of its weights arrived), then
``finalize_layerwise_reload``. Between begin and end the model is not servable: the
engine pauses vLLM's scheduler around the whole update.

vLLM imports this module inside its worker; vLLM modules are imported inside methods.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable

import torch

HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def _dtype(name: str) -> torch.dtype:
    from asyncrl.wire.codec import _TORCH_DTYPES  # the same closed list the wire accepts

    return _TORCH_DTYPES[name]


def read_bucket(path: str, layout: list[list]) -> list[tuple[str, torch.Tensor]]:
    """Views of the tensors in a bucket file; ``layout`` rows are [name, dtype, shape,
    byte offset]. The mapping is private copy-on-write: nothing is copied unless
    written, and it stays valid after the writer unlinks the file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else b""
    raw = torch.frombuffer(buf, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    out = []
    for name, dtype, shape, offset in layout:
        dt = _dtype(dtype)
        n = dt.itemsize
        for d in shape:
            n *= d
        out.append((name, raw[offset : offset + n].view(dt).reshape(shape)))
    return out


class WeightLoaderExtension:
    """``self`` is vLLM's worker: ``self.model_runner.model`` is the served model."""

    def _asyncrl_config(self):
        return self.model_runner.model_config

    def asyncrl_begin_update(self, names: list[str]) -> None:
        """Start a layerwise reload; ``names`` are every tensor of the update (to know
        whether a tied head must be filled in from the embedding)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        config = self._asyncrl_config().hf_config
        # vLLM's tied lm_head is a layer of its own sharing embed_tokens' weight: the
        # layerwise reload waits for its weight too, so a learner that leaves the tied
        # head out gets the embedding loaded under the head's name as well
        self._asyncrl_fill_head = bool(getattr(config, "tie_word_embeddings", False)) and HEAD not in names
        self._asyncrl_loaded = 0
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())

    def _asyncrl_load(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        from vllm.config import set_current_vllm_config

        if self._asyncrl_fill_head:
            weights = weights + [(HEAD, t) for n, t in weights if n == EMBED]
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.get_model().load_weights(weights)
        self._asyncrl_loaded += len(weights)
        return len(weights)

    def asyncrl_load_bucket(self, path: str, layout: list[list]) -> int:
        """Load one bucket file (see :func:`read_bucket`); returns tensors loaded."""
        weights = read_bucket(path, layout)
        n = self._asyncrl_load(weights)
        del weights  # layers still incomplete keep their own references until processed
        return n

    def asyncrl_end_update(self) -> int:
        """Process what is left (attention layers, padded weights) and drop state
        derived from the old weights, as vLLM's ``reload_weights`` does."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.get_model(), self._asyncrl_config())
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(self.model_runner, reset, None)
            if fn is not None:
                fn()
        return self._asyncrl_loaded

    def asyncrl_load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """All weights in one call (in-process engine core only: tensors cannot cross
        vLLM's msgpack boundary); kept for tests."""
        weights = list(named_tensors)
        self.asyncrl_begin_update([n for n, _ in weights])
        self._asyncrl_load(weights)
        return self.asyncrl_end_update()

    def asyncrl_broadcast_update(self, group: dict, tensors: list[list], buckets: list[int]) -> int:
        """Receive one version from the learner's broadcast group and load it bucket by
        bucket. ``group``: host, port, world_size, backend, timeout_s and ``first_rank``
        (this engine's first rank; tensor-parallel rank r joins as first_rank + r);
        ``tensors`` rows [name, dtype, shape] in notice order."""
        from asyncrl.wire.weights import BroadcastGroup, receive_bucket

        g = getattr(self, "_asyncrl_group", None)
        if g is None:
            rank = group["first_rank"] + self._asyncrl_tp_rank()
            if torch.cuda.is_available() and group["backend"] == "nccl":
                torch.cuda.set_device(self.device)
            g = self._asyncrl_group = BroadcastGroup(group["host"], group["port"], rank, group["world_size"],
                                                     group["backend"], group["timeout_s"])
        self.asyncrl_begin_update([row[0] for row in tensors])
        start = 0
        for count in buckets:
            rows = tensors[start : start + count]
            start += count
            self._asyncrl_load(receive_bucket(g, [(name, _dtype(dt), shape) for name, dt, shape in rows]))
        return self.asyncrl_end_update()

    def _asyncrl_tp_rank(self) -> int:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()

    def asyncrl_get_weight(self, name: str) -> torch.Tensor:
        """A copy of one served parameter (vLLM naming), for tests (in-process only)."""
        return dict(self.model_runner.model.named_parameters())[name].detach().clone()

    def asyncrl_weight_sum(self, name: str) -> float:
        """A checksum of one served parameter (vLLM naming; this rank's shard), for tests
        in any engine-core mode."""
        return float(dict(self.model_runner.model.named_parameters())[name].detach().double().sum())
