"""Encode/decode messages to ZeroMQ frames, and the raw array frames they carry."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np
import torch

from asyncrl.wire.schema import PROTOCOL_VERSION, Message, TensorMeta, TrajectoryGroup, WeightUpdate

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)

MAX_HEADER_BYTES = 1 << 20


class WireError(ValueError):
    """A frame that does not decode into the schema; the receiver drops it and goes on."""


def encode(msg: Message, frames=()) -> list:
    return [_encoder.encode(msg), *frames]


def decode(frames: list) -> tuple[Message, list]:
    if not frames:
        raise WireError("empty message")
    head = frames[0]
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        msg = _decoder.decode(head)
    except msgspec.DecodeError as e:
        raise WireError(f"undecodable header: {e}") from None
    if msg.proto != PROTOCOL_VERSION:
        raise WireError(f"protocol version {msg.proto}, expected {PROTOCOL_VERSION}")
    return msg, list(frames[1:])


# ----------------------------------------------------------------- trajectories


@dataclass
class SampleArrays:
    token_ids: np.ndarray  # int32 [L]
    logprobs: np.ndarray  # float32 [L]
    versions: np.ndarray  # int32 [L]


def trajectory_frames(samples: list[SampleArrays]) -> list[bytes]:
    return [
        np.concatenate([s.token_ids for s in samples]).astype("<i4").tobytes(),
        np.concatenate([s.logprobs for s in samples]).astype("<f4").tobytes(),
        np.concatenate([s.versions for s in samples]).astype("<i4").tobytes(),
    ]


def trajectory_arrays(msg: TrajectoryGroup, frames: list) -> list[SampleArrays]:
    if len(frames) != 3:
        raise WireError(f"trajectory message needs 3 array frames, got {len(frames)}")
    total = sum(s.num_tokens for s in msg.samples)
    if any(s.num_tokens < 0 for s in msg.samples):
        raise WireError("negative sample length")
    arrays = []
    for frame, dtype in zip(frames, ("<i4", "<f4", "<i4")):
        buf = memoryview(frame)
        if buf.nbytes != 4 * total:
            raise WireError(f"array frame of {buf.nbytes} bytes, header declares {total} x 4")
        arrays.append(np.frombuffer(buf, dtype=dtype))
    out, start = [], 0
    for s in msg.samples:
        end = start + s.num_tokens
        out.append(SampleArrays(*(a[start:end] for a in arrays)))
        start = end
    return out


# ----------------------------------------------------------------- weights


def weight_frames(named: list[tuple[str, torch.Tensor]], version: int) -> tuple[WeightUpdate, list]:
    metas, frames = [], []
    for name, t in named:
        t = t.detach().cpu().contiguous()
        metas.append(TensorMeta(name, str(t.dtype).removeprefix("torch."), list(t.shape)))
        frames.append(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # 0-d: view needs dim >= 1
    return WeightUpdate(version=version, tensors=metas), frames


def weight_tensors(msg: WeightUpdate, frames: list) -> list[tuple[str, torch.Tensor]]:
    if len(frames) != len(msg.tensors):
        raise WireError(f"weight message has {len(frames)} frames for {len(msg.tensors)} tensors")
    out = []
    for meta, frame in zip(msg.tensors, frames):
        dtype = getattr(torch, meta.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise WireError(f"unknown dtype {meta.dtype!r} for {meta.name}")
        if any(d < 0 for d in meta.shape):
            raise WireError(f"negative dimension in {meta.name}")
        numel = int(np.prod(meta.shape, dtype=np.int64))
        buf = memoryview(frame)
        if buf.nbytes != numel * dtype.itemsize:
            raise WireError(f"{meta.name}: {buf.nbytes} bytes, header declares {meta.shape} {meta.dtype}")
        raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if numel else torch.empty(0, dtype=torch.uint8)
        out.append((meta.name, raw.view(dtype).reshape(meta.shape)))
    return out
