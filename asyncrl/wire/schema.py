"""Every message that crosses a socket: msgspec Structs plus raw array frames.

A message is a multipart ZeroMQ message: frame 0 is the msgpack-encoded header (a
tagged union, carrying ``PROTOCOL_VERSION``), frames 1.. are raw little-endian arrays
whose dtypes and lengths the header declares. Nothing is ever pickled; a frame that
does not decode into this schema is rejected by the receiver.
"""

from __future__ import annotations

import msgspec

PROTOCOL_VERSION = 1


class _Msg(msgspec.Struct, kw_only=True, tag_field="kind", forbid_unknown_fields=True):
    proto: int = PROTOCOL_VERSION


class PromptGroup(msgspec.Struct, forbid_unknown_fields=True):
    group_id: int
    prompt_ids: list[int]
    ground_truth: str
    data_source: str


class Hello(_Msg, tag="hello"):
    """Generator -> learner: a worker is up and runs weights of ``version``."""

    worker_id: int
    version: int


class Prompts(_Msg, tag="prompts"):
    """Learner -> generator: sample ``n`` answers for each group with weights >= min_version."""

    groups: list[PromptGroup]
    min_version: int
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    purpose: str = "train"  # "train" | "eval"


class SampleMeta(msgspec.Struct, forbid_unknown_fields=True):
    num_tokens: int
    reward: float
    finish_reason: str


class TrajectoryGroup(_Msg, tag="trajectories"):
    """Generator -> learner: one prompt group's samples. Frames after the header:
    token ids (int32), sampled log-probs (float32) and per-token policy versions
    (int32) of all samples concatenated; ``samples[i].num_tokens`` splits them."""

    group_id: int
    worker_id: int
    data_source: str
    prompt_ids: list[int]
    samples: list[SampleMeta]
    purpose: str = "train"
    gen_seconds: float = 0.0


class TensorMeta(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    dtype: str  # torch dtype name without the "torch." prefix
    shape: list[int]


class WeightUpdate(_Msg, tag="weights"):
    """Learner -> generator: new weights; one raw frame per tensor, in order."""

    version: int
    tensors: list[TensorMeta]


class Shutdown(_Msg, tag="shutdown"):
    reason: str = ""


Message = Hello | Prompts | TrajectoryGroup | WeightUpdate | Shutdown
