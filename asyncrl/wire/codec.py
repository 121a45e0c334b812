"""Encode/decode messages to ZeroMQ frames, and the raw array frames they carry.

``decode`` reads the header only; ``decode_checked`` is what a receiver calls: size
limits, header, protocol version, the kinds this receiver takes, and every array frame
against what the header declares. A message it returns can be handed to
``trajectory_arrays`` / ``weight_tensors`` without another failure mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec
import numpy as np
import torch

from asyncrl.wire.schema import (
    MAX_DIMS, MAX_TENSORS, PROTOCOL_VERSION, WEIGHT_DTYPES, Message, TensorMeta, TrajectoryGroup, WeightUpdate,
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)

MAX_HEADER_BYTES = 1 << 20
MAX_EXTENT = 1 << 48  # product of a shape's dimensions (zeros counted as 1): far above any real tensor

_TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in WEIGHT_DTYPES}


class WireError(ValueError):
    """A message that does not decode into the schema; the receiver drops it and goes on.

    ``reason`` is a short stable tag (the receiver counts rejections per reason)."""

    def __init__(self, detail: str, reason: str = "invalid") -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What one receiver accepts. libzmq drops a single frame over ``max_message_bytes``
    before allocating it (ZMQ_MAXMSGSIZE); the total and the frame count are checked here."""

    max_message_bytes: int = 64 << 20
    max_header_bytes: int = MAX_HEADER_BYTES
    max_frames: int = MAX_TENSORS + 1
    kinds: tuple[type, ...] | None = None  # message types this receiver takes; None = all


def encode(msg: Message, frames=()) -> list:
    return [_encoder.encode(msg), *frames]


def decode(frames: list, max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[Message, list]:
    """Header only: (message, the raw frames after it)."""
    if not frames:
        raise WireError("empty message", "empty")
    head = frames[0]
    if len(head) > max_header_bytes:
        raise WireError(f"header of {len(head)} bytes exceeds {max_header_bytes}", "oversize")
    try:
        msg = _decoder.decode(head)
    except msgspec.ValidationError as e:  # msgpack, but not our schema (or out of bounds)
        raise WireError(f"invalid header: {e}", "schema") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # msgspec raises the latter for bad UTF-8 in a str
        raise WireError(f"undecodable header: {e}", "undecodable") from None
    if msg.proto != PROTOCOL_VERSION:
        raise WireError(f"protocol version {msg.proto}, expected {PROTOCOL_VERSION}", "version")
    return msg, list(frames[1:])


def decode_checked(frames: list, limits: Limits = Limits()) -> tuple[Message, list]:
    """Everything a receiver checks before it trusts a message; raises WireError."""
    if len(frames) > limits.max_frames:
        raise WireError(f"{len(frames)} frames exceed {limits.max_frames}", "oversize")
    total = sum(memoryview(f).nbytes for f in frames)
    if total > limits.max_message_bytes:
        raise WireError(f"message of {total} bytes exceeds {limits.max_message_bytes} "
                        "(transport.max_message_mb / max_weights_mb)", "oversize")
    msg, rest = decode(frames, limits.max_header_bytes)
    if limits.kinds is not None and not isinstance(msg, limits.kinds):
        raise WireError(f"{type(msg).__name__} messages are not accepted by this endpoint", "kind")
    if isinstance(msg, TrajectoryGroup):
        trajectory_arrays(msg, rest)
    elif isinstance(msg, WeightUpdate) and msg.transport == "zmq" and not msg.buckets:
        _weight_layout(msg, rest)
        _check_ipc_notice(msg)  # none on a zmq update
    elif isinstance(msg, WeightUpdate):  # a notice: the tensors travel by disk, broadcast, CUDA IPC or zmq pulls
        if msg.buckets and sum(msg.buckets) != len(msg.tensors):
            raise WireError(f"buckets of {sum(msg.buckets)} tensors for {len(msg.tensors)}", "arrays")
        if msg.serve_port and msg.transport != "zmq":
            raise WireError(f"a {msg.transport} weight notice carries serve_port", "schema")
        if rest:
            raise WireError(f"a {msg.transport} weight notice carries no frames, got {len(rest)}", "frames")
        for meta in msg.tensors:
            if math.prod(max(d, 1) for d in meta.shape) > MAX_EXTENT:
                raise WireError(f"{meta.name[:200]!r}: shape {meta.shape} is absurd", "arrays")
        _check_ipc_notice(msg)
    elif rest:
        raise WireError(f"{type(msg).__name__} carries no array frames, got {len(rest)}", "frames")
    return msg, rest


# ----------------------------------------------------------------- trajectories


@dataclass
class SampleArrays:
    """One sample's response tokens (everything after the prompt, in order). Multi-turn:
    model turns and environment observations interleaved; ``mask`` tells them apart.
    An environment token is context only: logprob 0.0 and version -1 (it was not sampled)."""

    token_ids: np.ndarray  # int32 [L]
    logprobs: np.ndarray  # float32 [L]
    versions: np.ndarray  # int32 [L]
    # uint8 [L]: 1 = sampled by the model, 0 = environment (observation) token, context only;
    # None = every token sampled (single-turn). trajectory_arrays always returns an array.
    mask: np.ndarray | None = None

    def model_mask(self) -> np.ndarray:
        """bool [L]: the tokens the model sampled (all of them when ``mask`` is None)."""
        return np.ones(len(self.token_ids), bool) if self.mask is None else self.mask.astype(bool)


_FRAME_DTYPES = ("<i4", "<f4", "<i4", "u1")  # token ids, log-probs, versions, model mask


def trajectory_frames(samples: list[SampleArrays]) -> list[bytes]:
    masks = [np.ones(len(s.token_ids), np.uint8) if s.mask is None else s.mask for s in samples]
    return [
        np.concatenate([s.token_ids for s in samples]).astype("<i4").tobytes(),
        np.concatenate([s.logprobs for s in samples]).astype("<f4").tobytes(),
        np.concatenate([s.versions for s in samples]).astype("<i4").tobytes(),
        np.concatenate(masks).astype("u1").tobytes(),
    ]


def trajectory_arrays(msg: TrajectoryGroup, frames: list) -> list[SampleArrays]:
    """Zero-copy views of the four frames, split per sample (``mask`` always an array);
    raises WireError."""
    if len(frames) != len(_FRAME_DTYPES):
        raise WireError(f"trajectory message needs {len(_FRAME_DTYPES)} array frames, got {len(frames)}", "frames")
    if not msg.samples:
        raise WireError("trajectory message without samples", "arrays")
    if any(s.num_tokens < 0 for s in msg.samples):
        raise WireError("negative sample length", "arrays")
    total = sum(s.num_tokens for s in msg.samples)  # Python ints: a huge declaration cannot wrap
    if total == 0:  # no token, no policy version: staleness is undefined
        raise WireError("trajectory message without tokens", "arrays")
    arrays = []
    for frame, dtype in zip(frames, _FRAME_DTYPES):
        buf, size = memoryview(frame), np.dtype(dtype).itemsize
        if buf.nbytes != size * total:
            raise WireError(f"array frame of {buf.nbytes} bytes, header declares {total} x {size}", "arrays")
        arrays.append(np.frombuffer(buf, dtype=dtype))
    starts = np.cumsum([0] + [s.num_tokens for s in msg.samples[:-1]])
    _check_mask(*arrays[1:], starts[[s.num_tokens > 0 for s in msg.samples]])
    out, start = [], 0
    for s in msg.samples:
        end = start + s.num_tokens
        out.append(SampleArrays(*(a[start:end] for a in arrays)))
        start = end
    return out


def _check_mask(logprobs: np.ndarray, versions: np.ndarray, mask: np.ndarray, first: np.ndarray) -> None:
    """The model mask against the other frames (all samples concatenated; ``first``: the
    offset of each non-empty sample's first token). A model token has a policy version
    >= 0; an environment token was not sampled: version -1, log-prob 0.0. A response
    starts with a model token, so every non-empty sample has one and every message a
    version to measure staleness by."""
    if int(mask.max()) > 1:
        raise WireError(f"model mask value {int(mask.max())} (0 or 1 only)", "values")
    model = mask.astype(bool)
    if (versions[model] < 0).any():
        raise WireError("negative policy version on a model token", "values")
    env = ~model
    if (versions[env] != -1).any():
        raise WireError("environment token with a policy version (must be -1)", "values")
    if (logprobs[env] != 0.0).any():  # NaN included
        raise WireError("environment token with a sampled log-prob (must be 0.0)", "values")
    if not model[first].all():
        raise WireError("a sample's response starts with an environment token", "values")


# ----------------------------------------------------------------- weights


def weight_frames(named: list[tuple[str, torch.Tensor]], version: int) -> tuple[WeightUpdate, list]:
    metas, frames = [], []
    for name, t in named:
        t = t.detach().cpu().contiguous()
        metas.append(TensorMeta(name, str(t.dtype).removeprefix("torch."), list(t.shape)))
        frames.append(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # 0-d: view needs dim >= 1
    return WeightUpdate(version=version, tensors=metas), frames


def _weight_layout(msg: WeightUpdate, frames: list) -> list[tuple[TensorMeta, torch.dtype, memoryview]]:
    """Check every tensor's dtype, shape and byte count against its frame (no copies)."""
    if len(frames) != len(msg.tensors):
        raise WireError(f"weight message has {len(frames)} frames for {len(msg.tensors)} tensors", "frames")
    out = []
    for meta, frame in zip(msg.tensors, frames):
        dtype = _TORCH_DTYPES.get(meta.dtype) if isinstance(meta.dtype, str) else None
        if dtype is None:
            raise WireError(f"unknown dtype {str(meta.dtype)[:64]!r} for {meta.name[:200]!r}", "dtype")
        if len(meta.shape) > MAX_DIMS:
            raise WireError(f"{meta.name[:200]!r}: {len(meta.shape)} dimensions exceed {MAX_DIMS}", "arrays")
        if any(d < 0 for d in meta.shape):
            raise WireError(f"negative dimension in {meta.name[:200]!r}", "arrays")
        if math.prod(max(d, 1) for d in meta.shape) > MAX_EXTENT:  # torch overflows on empty [2**62, 2**62, 0]
            raise WireError(f"{meta.name[:200]!r}: shape {meta.shape} is absurd", "arrays")
        numel = math.prod(meta.shape)  # exact: [2**32, 2**32] must not wrap to 0 as int64 would
        buf = memoryview(frame)
        if buf.nbytes != numel * dtype.itemsize:
            raise WireError(f"{meta.name[:200]!r}: {buf.nbytes} bytes, header declares {meta.shape} {meta.dtype}",
                            "arrays")
        out.append((meta, dtype, buf))
    return out


def weight_tensors(msg: WeightUpdate, frames: list) -> list[tuple[str, torch.Tensor]]:
    out = []
    for meta, dtype, buf in _weight_layout(msg, frames):
        # a copy: the engine keeps these tensors after the ZeroMQ frame is released
        raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if buf.nbytes else torch.empty(0, dtype=torch.uint8)
        out.append((meta.name, raw.view(dtype).reshape(meta.shape)))
    return out


# ----------------------------------------------------------------- cuda_ipc


STAMP = 1  # element 0 of a cuda_ipc slot's int64 buffer: the version the slot holds (-1 while it is rewritten)


def ipc_layout(tensors: list[TensorMeta]) -> tuple[list[tuple[str, int, int]], dict[str, int]]:
    """Where each tensor of a cuda_ipc notice lives: (dtype, element offset, numel) in the
    flat buffer of its dtype (tensors of one dtype back to back, in notice order; the
    int64 buffer starts with the slot's version stamp), and the buffers' sizes per
    dtype. A pure function of the notice, so the learner and the generators agree on it
    without sending offsets."""
    totals: dict[str, int] = {"int64": STAMP}
    places = []
    for meta in tensors:
        numel = math.prod(meta.shape)
        start = totals.get(meta.dtype, 0)
        places.append((meta.dtype, start, numel))
        totals[meta.dtype] = start + numel
    return places, {d: n for d, n in totals.items() if n}


def _check_ipc_notice(msg: WeightUpdate) -> None:
    """cuda_ipc: exactly one buffer per dtype that has elements, each exactly the size the
    tensors need and inside its shared storage (a view past it would read foreign GPU
    memory); any other transport: no CUDA IPC fields at all."""
    if msg.transport != "cuda_ipc":
        if msg.ipc_buffers or msg.ack_port:
            raise WireError(f"a {msg.transport} weight update carries cuda_ipc fields", "schema")
        return
    if not msg.ack_port:
        raise WireError("a cuda_ipc weight notice without ack_port", "schema")
    _, totals = ipc_layout(msg.tensors)
    dtypes = [b.dtype for b in msg.ipc_buffers]
    if sorted(dtypes) != sorted(totals):
        raise WireError(f"cuda_ipc buffers for dtypes {sorted(dtypes)}, the tensors need {sorted(totals)}", "arrays")
    for b in msg.ipc_buffers:
        itemsize = _TORCH_DTYPES[b.dtype].itemsize
        if b.numel != totals[b.dtype]:
            raise WireError(f"cuda_ipc {b.dtype} buffer of {b.numel} elements, the tensors need {totals[b.dtype]}",
                            "arrays")
        if (b.tensor_offset + b.numel) * itemsize > b.storage_size_bytes:
            raise WireError(f"cuda_ipc {b.dtype} buffer ends past its shared storage ({b.storage_size_bytes} bytes)",
                            "arrays")
