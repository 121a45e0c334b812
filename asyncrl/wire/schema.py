"""Every message that crosses a socket: msgspec Structs plus raw array frames.

A message is a multipart ZeroMQ message: frame 0 is the msgpack-encoded header (a
tagged union, carrying ``PROTOCOL_VERSION``), frames 1.. are raw little-endian arrays
whose dtypes and lengths the header declares. Nothing is ever pickled; a frame that
does not decode into this schema is rejected by the receiver.

The field constraints below are protocol sanity bounds, checked by msgspec while it
decodes (list lengths before anything is allocated): a header that declares an absurd
sample count, token budget, dimension or a non-finite reward is rejected at the door,
so no code behind the socket has to trust a peer's numbers. Resource limits (bytes per
message) are configuration: see ``asyncrl.wire.codec.Limits``.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import msgspec

# 2: TrajectoryGroup gained a fourth array frame (the model mask, multi-turn): a peer
# with another frame layout is refused at its Hello, not message by message
PROTOCOL_VERSION = 2

MAX_SAMPLES = 4096  # answers per prompt (Prompts.n, TrajectoryGroup.samples)
MAX_TOKENS = 1 << 20  # tokens in one prompt or one answer
MAX_GROUPS = 1 << 16  # prompt groups in one Prompts message
MAX_TENSORS = 1 << 16  # tensors in one weight update
MAX_DIMS = 8
MAX_TEXT = 1 << 16  # characters in a free-text field (ground truth, data source, names)
# bytes of an opaque CUDA IPC handle: cudaIpcMemHandle_t and cudaIpcEventHandle_t are 64, but torch's
# handle for an expandable-segments allocation grows with the segments it spans
MAX_HANDLE = 1 << 16

Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Version = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]  # int32 in the per-token version frame
TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Dim = Annotated[int, msgspec.Meta(ge=0, le=2**48)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
Finite = Annotated[float, msgspec.Meta(ge=-1e30, le=1e30)]  # NaN and inf fail both bounds
Purpose = Literal["train", "eval"]
BucketSize = Annotated[int, msgspec.Meta(ge=1, le=MAX_TENSORS)]  # tensors in one bucket of a weight update

# The only dtype names a weight header may carry. An explicit list, not getattr(torch,
# name): a peer must not be able to name arbitrary torch attributes.
WeightDtype = Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]
WEIGHT_DTYPES: tuple[str, ...] = get_args(WeightDtype)


class _Msg(msgspec.Struct, kw_only=True, tag_field="kind", forbid_unknown_fields=True):
    proto: int = PROTOCOL_VERSION


class PromptGroup(msgspec.Struct, forbid_unknown_fields=True):
    group_id: Int64  # negative ids are eval problems
    prompt_ids: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_TOKENS)]
    ground_truth: Text
    data_source: Text


class Hello(_Msg, tag="hello"):
    """Generator -> learner: a worker is up and runs weights of ``version``."""

    worker_id: Count
    version: Version


class Prompts(_Msg, tag="prompts"):
    """Learner -> generator: sample ``n`` answers for each group with weights >= min_version."""

    groups: Annotated[list[PromptGroup], msgspec.Meta(max_length=MAX_GROUPS)]
    min_version: Version
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_SAMPLES)]
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=1e3)]
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)]
    purpose: Purpose = "train"


class SampleMeta(msgspec.Struct, forbid_unknown_fields=True):
    num_tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
    reward: Finite
    finish_reason: Annotated[str, msgspec.Meta(max_length=64)]


class TrajectoryGroup(_Msg, tag="trajectories"):
    """Generator -> learner: one prompt group's samples. Frames after the header:
    token ids (int32), sampled log-probs (float32), per-token policy versions (int32)
    and the model mask (uint8: 1 = sampled by the model, 0 = an environment token,
    context only, with log-prob 0.0 and version -1) of all samples concatenated;
    ``samples[i].num_tokens`` (model and environment tokens) splits them. A non-empty
    sample starts with a model token."""

    group_id: Int64
    worker_id: Count
    data_source: Text
    prompt_ids: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_TOKENS)]
    samples: Annotated[list[SampleMeta], msgspec.Meta(min_length=1, max_length=MAX_SAMPLES)]
    purpose: Purpose = "train"
    gen_seconds: Annotated[float, msgspec.Meta(ge=0.0, le=1e9)] = 0.0
    busy_total_s: Annotated[float, msgspec.Meta(ge=0.0, le=1e12)] = 0.0  # the worker's generation time so far


class TensorMeta(msgspec.Struct, forbid_unknown_fields=True):
    name: Text
    dtype: WeightDtype  # torch dtype name without the "torch." prefix
    shape: Annotated[list[Dim], msgspec.Meta(max_length=MAX_DIMS)]


class CudaIpcBuffer(msgspec.Struct, forbid_unknown_fields=True):
    """One flat buffer in learner rank 0's GPU memory, shared by CUDA IPC: every tensor
    of ``dtype`` in the notice, in notice order, back to back (``asyncrl.wire.cuda_ipc``).
    The fields are those of torch's CUDA storage sharing (``reduce_tensor`` /
    ``rebuild_cuda_tensor`` in torch.multiprocessing.reductions), spelled out so that
    nothing is pickled. The sender's device index is not sent: the generator opens the
    buffer on its own device (its numbering may differ), checked by ``gpu_uuid``."""

    dtype: WeightDtype
    numel: Dim  # elements of the buffer
    tensor_offset: Dim  # the buffer's first element in its storage
    handle: Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_HANDLE)]  # cudaIpcMemHandle of the allocation
    storage_size_bytes: Dim
    storage_offset_bytes: Dim  # where the storage starts in that allocation
    ref_counter_handle: Annotated[bytes, msgspec.Meta(max_length=MAX_HANDLE)]  # torch's shared ref-counter file
    ref_counter_offset: Dim
    event_handle: Annotated[bytes, msgspec.Meta(max_length=MAX_HANDLE)]  # cudaIpcEventHandle recorded at sharing
    event_sync_required: bool
    gpu_uuid: Annotated[str, msgspec.Meta(max_length=128)]  # the physical GPU the buffer lives on


class WeightUpdate(_Msg, tag="weights"):
    """Learner -> generator: new weights; one raw frame per tensor, in order."""

    version: Version
    tensors: Annotated[list[TensorMeta], msgspec.Meta(max_length=MAX_TENSORS)]
    transport: Literal["zmq", "disk", "nccl", "cuda_ipc"] = "zmq"
    """Where the tensors are (asyncrl.wire.weights): zmq = the frames of this message;
    disk / nccl / cuda_ipc = a notice without frames, the tensors come from storage / a
    broadcast / GPU memory shared by learner rank 0 (``ipc_buffers``)."""
    ipc_buffers: Annotated[list[CudaIpcBuffer], msgspec.Meta(max_length=len(WEIGHT_DTYPES))] = []
    """cuda_ipc only: one shared buffer per dtype present in ``tensors``."""
    ack_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    """cuda_ipc only: the loopback port where the generator acknowledges this version once
    its engine has copied the weights out (the learner may then overwrite the buffers)."""
    buckets: Annotated[list[BucketSize], msgspec.Meta(max_length=MAX_TENSORS)] = []
    """Tensors per bucket, in order (the update travels and is loaded a bucket at a time);
    empty = one bucket. zmq with buckets: the message carries no frames, the generator
    pulls bucket after bucket from ``serve_port`` on the learner's host."""
    serve_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    """zmq with buckets: the port of learner rank 0's weight server."""


class WeightsAck(_Msg, tag="weights_ack"):
    """Generator -> learner rank 0 over the cuda_ipc acknowledgement socket (not the
    trajectory link): worker ``worker_id`` has read every notice up to ``version``."""

    worker_id: Count
    version: Version


class WeightsPull(_Msg, tag="weights_pull"):
    """Generator -> learner rank 0's weight server (``transport.weights=zmq`` with
    buckets, its own socket): send bucket ``bucket`` of ``version``. The reply is a
    ``WeightUpdate`` with that bucket's tensors as frames, or one without tensors when
    the version is no longer served (superseded: a newer notice is on its way)."""

    version: Version
    bucket: Count


class Shutdown(_Msg, tag="shutdown"):
    reason: Text = ""


Message = Hello | Prompts | TrajectoryGroup | WeightUpdate | WeightsAck | WeightsPull | Shutdown
UPSTREAM = (Hello, TrajectoryGroup)  # what a learner receives
DOWNSTREAM = (Prompts, WeightUpdate, Shutdown)  # what a generator receives
ACKS = (WeightsAck,)  # what learner rank 0's cuda_ipc acknowledgement socket receives
PULLS = (WeightsPull,)  # what learner rank 0's zmq weight server receives
