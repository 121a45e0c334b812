"""The ``cuda_ipc`` weight transport: learner rank 0 and its engines on one GPU.

NCCL refuses two ranks of one communicator on the same device ("Duplicate GPU
detected"), so a learner and an engine that share a GPU cannot use ``nccl``. Here
learner rank 0 keeps one flat buffer per dtype in its GPU memory (a *slot*), shares
each buffer once as a CUDA IPC handle and, per version, copies the new weights into a
slot. The ``WeightUpdate`` notice carries the handle fields (msgpack: nothing is
pickled) and the layout follows from the notice's tensor list (``codec.ipc_layout``).
A generator maps the notice's buffers (again whenever the learner switches slots), its
engine copies from them into its parameters on the GPU and it acknowledges the version
over a socket of its own, on loopback: the transport needs one node anyway. (The
learner's side still gathers the full state dict through host memory, FSDP2's
cpu_offload; filling the slot from the device-resident parameters is left for later.)

Ordering: the learner synchronises its device after filling a slot and before the
notice goes out, so the copy is complete when a generator reads; a generator
synchronises after its engine copied and before it acknowledges. A slot is overwritten
only when every generator has acknowledged its version or a newer one (notices reach
a generator in order, so it has read that slot for the last time). A generator that is
slow to acknowledge makes the learner use another slot (at most ``max_slots``, each a
full copy of the weights); a restarted generator is re-sent the newest notice by the
hub, and its acknowledgement frees every older slot. The learner waits
(``transport.timeout_s``) only when every slot is still being read.

The acknowledgements come from processes, not from a generator's identity: a
restarted generator is re-sent a notice whose slot its predecessor had already
acknowledged. So every slot also carries a version stamp (``codec.STAMP``), set to -1
before the slot is rewritten and to the version after: a generator that finds another
version there before reading skips the notice (a newer one is queued behind it), and
one that finds it changed after its engine copied exits with an error rather than
sample from torn weights (launch restarts it with the newest weights).

torch's CUDA IPC reference counting is built for one consumer per share; here each
buffer is shared once and read by every generator, and the learner keeps its slots
for its whole life (freed only at the end), so that counting never decides a free.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import zmq

from asyncrl.wire.codec import _TORCH_DTYPES, STAMP, Limits, WireError, decode_checked, encode, ipc_layout
from asyncrl.wire.schema import ACKS, CudaIpcBuffer, TensorMeta, WeightsAck, WeightUpdate

log = logging.getLogger(__name__)

Named = list[tuple[str, torch.Tensor]]
ACK_LIMITS = Limits(max_message_bytes=1024, max_header_bytes=1024, max_frames=1, kinds=ACKS)


# ------------------------------------------------------------- handle fields


def gpu_uuid(device: torch.device) -> str:
    """The physical GPU's identity: device indices differ between processes whose
    CUDA_VISIBLE_DEVICES differ, the UUID does not."""
    return str(torch.cuda.get_device_properties(device).uuid)


def share_cuda(flat: torch.Tensor) -> CudaIpcBuffer:
    """The IPC handle fields of a flat CUDA buffer, taken from torch's own reduction
    (what torch.multiprocessing sends for a CUDA tensor), named after the parameters of
    ``rebuild_cuda_tensor`` so a change of their order in a torch release cannot
    silently shuffle them."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

    rebuild, args = reduce_tensor(flat)
    names = list(inspect.signature(rebuild_cuda_tensor).parameters)
    if rebuild is not rebuild_cuda_tensor or len(args) != len(names):
        raise RuntimeError(f"torch {torch.__version__} reduces a CUDA tensor to {getattr(rebuild, '__name__', rebuild)}"
                           f" with {len(args)} arguments; transport.weights=cuda_ipc expects rebuild_cuda_tensor's "
                           f"{len(names)}: use transport.weights=zmq with this torch")
    f = dict(zip(names, args))
    return CudaIpcBuffer(
        dtype=str(flat.dtype).removeprefix("torch."), numel=flat.numel(), tensor_offset=int(f["tensor_offset"]),
        handle=bytes(f["storage_handle"]), storage_size_bytes=int(f["storage_size_bytes"]),
        storage_offset_bytes=int(f["storage_offset_bytes"]), ref_counter_handle=bytes(f["ref_counter_handle"]),
        ref_counter_offset=int(f["ref_counter_offset"]), event_handle=bytes(f["event_handle"] or b""),
        event_sync_required=bool(f["event_sync_required"]), gpu_uuid=gpu_uuid(flat.device))


def open_cuda(buf: CudaIpcBuffer, device: torch.device) -> torch.Tensor:
    """Map a shared buffer into this process: a flat tensor on ``device`` (the learner's
    GPU as this process numbers it) that reads the learner's memory."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if buf.gpu_uuid and buf.gpu_uuid != gpu_uuid(device):
        raise RuntimeError(f"transport.weights=cuda_ipc: this generator runs on GPU {gpu_uuid(device)} but learner "
                           f"rank 0's weights are on GPU {buf.gpu_uuid}; cuda_ipc needs both on the same GPU "
                           "(cluster.backend=local puts the generators on learner rank 0's GPU)")
    return rebuild_cuda_tensor(
        tensor_cls=torch.Tensor, tensor_size=(buf.numel,), tensor_stride=(1,), tensor_offset=buf.tensor_offset,
        storage_cls=torch.storage.TypedStorage,  # what reduce_tensor gives for any plain tensor
        dtype=_TORCH_DTYPES[buf.dtype], storage_device=device.index, storage_handle=buf.handle,
        storage_size_bytes=buf.storage_size_bytes, storage_offset_bytes=buf.storage_offset_bytes,
        requires_grad=False, ref_counter_handle=buf.ref_counter_handle, ref_counter_offset=buf.ref_counter_offset,
        event_handle=buf.event_handle, event_sync_required=buf.event_sync_required)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------- sender


@dataclass
class Slot:
    """One copy of the weights in shared GPU memory: a flat buffer per dtype."""

    flats: dict[str, torch.Tensor]
    shared: list[CudaIpcBuffer]
    version: int = -1  # the version it holds; -1 = none yet
    sizes: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.sizes = {d: t.numel() for d, t in self.flats.items()}

    @property
    def stamp(self) -> torch.Tensor:
        return self.flats["int64"][:STAMP]


class CudaIpcWeightSender:
    """Learner rank 0. ``share`` turns a flat buffer into its handle fields (tests on CPU
    pass a fake); ``device`` defaults to the current CUDA device."""

    def __init__(self, num_generators: int, timeout_s: float = 600.0, *, max_slots: int = 3,
                 device: torch.device | None = None, share: Callable[[torch.Tensor], CudaIpcBuffer] = share_cuda,
                 ctx: zmq.Context | None = None) -> None:
        if device is None:
            if not torch.cuda.is_available():
                raise RuntimeError("transport.weights=cuda_ipc shares GPU memory, but learner rank 0 sees no CUDA "
                                   "device; on CPU use transport.weights=zmq")
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.share, self.timeout_s, self.max_slots = device, share, timeout_s, max_slots
        self.acked = [-1] * num_generators  # per worker: the newest version it acknowledged
        self.slots: list[Slot] = []
        self.sock = (ctx or zmq.Context.instance()).socket(zmq.PULL)
        self.sock.setsockopt(zmq.MAXMSGSIZE, ACK_LIMITS.max_message_bytes)
        self.sock.setsockopt(zmq.LINGER, 0)
        # loopback: cuda_ipc needs learner and generators on one node, and nothing else may ack
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")

    def notice(self, named: Named, version: int, idle: Callable[[], None] = lambda: None) -> tuple[WeightUpdate, list]:
        metas = [TensorMeta(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in named]
        places, sizes = ipc_layout(metas)
        slot = self._free_slot(sizes, version, idle)
        with torch.no_grad():
            slot.stamp.fill_(-1)  # stream order: marked before any byte changes
            for (_, t), (dtype, start, numel) in zip(named, places):
                if numel:
                    slot.flats[dtype][start : start + numel].copy_(t.detach().reshape(-1))
            slot.stamp.fill_(version)
        _sync(self.device)  # complete before any generator may read it
        slot.version = version
        return WeightUpdate(version=version, tensors=metas, transport="cuda_ipc", ipc_buffers=slot.shared,
                            ack_port=self.port), []

    def after_notice(self, named: Named) -> None:
        pass

    def _released(self, slot: Slot) -> bool:
        return all(v >= slot.version for v in self.acked)

    def _free_slot(self, sizes: dict[str, int], version: int, idle: Callable[[], None]) -> Slot:
        """A slot no generator still reads (reused, or a new one while under max_slots);
        waits for acknowledgements when every slot is in use, calling ``idle`` meanwhile:
        a dead generator's last acknowledgement is stale, and only its restarted process,
        once the hub answered its Hello with the newest notice, acknowledges again."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            idle()
            self._drain_acks(timeout_s=0)
            # a free slot of other sizes (the weights changed shape) is dropped: its memory is needed
            self.slots = [s for s in self.slots if s.sizes == sizes or not self._released(s)]
            free = [s for s in self.slots if self._released(s)]
            if free:
                return min(free, key=lambda s: s.version)
            if len(self.slots) < self.max_slots:
                return self._new_slot(sizes)
            left = deadline - time.monotonic()
            if left <= 0:
                oldest = min(s.version for s in self.slots)
                late = [w for w, v in enumerate(self.acked) if v < oldest]
                raise TimeoutError(
                    f"cuda_ipc: generator(s) {late} have not acknowledged weights v{oldest} within "
                    f"{self.timeout_s:.0f}s (transport.timeout_s) and all {self.max_slots} shared weight buffers are "
                    f"still being read, so weights v{version} cannot be published; a generator may be stuck or dead: "
                    "see its log in the run directory")
            self._drain_acks(timeout_s=min(left, 0.1))  # short: idle() runs between waits

    def _new_slot(self, sizes: dict[str, int]) -> Slot:
        flats = {d: torch.empty(n, dtype=_TORCH_DTYPES[d], device=self.device) for d, n in sizes.items()}
        slot = Slot(flats, [self.share(t) for t in flats.values()])
        self.slots.append(slot)
        if len(self.slots) > 1:
            log.info("cuda_ipc: %d shared weight buffers (a generator has not yet acknowledged the previous "
                     "version)", len(self.slots))
        return slot

    def acknowledged(self, version: int, timeout_s: float) -> bool:
        """Whether every generator has acknowledged ``version`` (waiting up to ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        self._drain_acks(timeout_s=0)
        while min(self.acked) < version and (left := deadline - time.monotonic()) > 0:
            self._drain_acks(timeout_s=min(left, 1.0))
        return min(self.acked) >= version

    def _drain_acks(self, timeout_s: float) -> None:
        """File every acknowledgement that has arrived (waiting up to ``timeout_s`` for the first)."""
        wait_ms = int(timeout_s * 1000)
        while self.sock.poll(wait_ms, zmq.POLLIN):
            wait_ms = 0
            frames = self.sock.recv_multipart(copy=False)
            try:
                msg, _ = decode_checked([f.buffer for f in frames], ACK_LIMITS)
            except WireError as e:
                log.warning("cuda_ipc: rejected acknowledgement: %.200s", e)
                continue
            if msg.worker_id >= len(self.acked):
                log.warning("cuda_ipc: acknowledgement from unknown generator %d", msg.worker_id)
                continue
            self.acked[msg.worker_id] = max(self.acked[msg.worker_id], msg.version)

    def close(self) -> None:
        self.slots = []
        self.sock.close(linger=0)


# ------------------------------------------------------------------ receiver


class CudaIpcWeightReceiver:
    """A generator: maps the learner's buffers (kept mapped while the learner keeps
    sending the same ones), hands the engine views of them, and acknowledges a version
    once the engine has copied it (``loaded``)."""

    def __init__(self, worker_id: int, *, device: torch.device | None = None,
                 open_buffer: Callable[[CudaIpcBuffer, torch.device], torch.Tensor] = open_cuda,
                 ctx: zmq.Context | None = None) -> None:
        if device is None:
            if not torch.cuda.is_available():
                raise RuntimeError("transport.weights=cuda_ipc reads learner rank 0's GPU memory, but this generator "
                                   "sees no CUDA device; set cluster.generator_gpus=1 (or transport.weights=zmq)")
            device = torch.device("cuda", torch.cuda.current_device())
        self.worker_id, self.device, self.open_buffer = worker_id, device, open_buffer
        self.ctx = ctx or zmq.Context.instance()
        self.mapped: dict[tuple, torch.Tensor] = {}  # a buffer's identity -> its flat tensor here
        self.stamp: torch.Tensor | None = None  # the current slot's version stamp (mapped)
        self.sock: zmq.Socket | None = None
        self.port = self.sock_port = 0

    @staticmethod
    def _key(b: CudaIpcBuffer) -> tuple:
        return b.handle, b.storage_offset_bytes, b.tensor_offset, b.dtype, b.numel

    def receive(self, msg: WeightUpdate, frames: list) -> Named | None:
        keys = [self._key(b) for b in msg.ipc_buffers]
        flats = {}
        for key, b in zip(keys, msg.ipc_buffers):
            flats[b.dtype] = self.mapped[key] if key in self.mapped else self.open_buffer(b, self.device)
        # buffers the learner no longer names are unmapped (the learner replaced that slot)
        self.mapped = dict(zip(keys, (flats[b.dtype] for b in msg.ipc_buffers)))
        self.stamp = flats["int64"][:STAMP]
        self.port = msg.ack_port
        if (held := int(self.stamp.item())) != msg.version:  # .item() waits for the read
            log.info("cuda_ipc: weights v%d were superseded (the buffer holds v%d); waiting for the next notice",
                     msg.version, held)
            return None
        places, _ = ipc_layout(msg.tensors)
        out = []
        for meta, (dtype, start, numel) in zip(msg.tensors, places):
            if numel:
                t = flats[dtype][start : start + numel].view(meta.shape)
            else:
                t = torch.empty(meta.shape, dtype=_TORCH_DTYPES[dtype], device=self.device)
            out.append((meta.name, t))
        return out

    def loaded(self, version: int) -> None:
        """The engine has copied ``version``: once that copy is complete on the GPU (and
        the buffer still holds that version), tell the learner it may overwrite it."""
        _sync(self.device)
        if (held := int(self.stamp.item())) != version:
            raise RuntimeError(f"cuda_ipc: weights v{version} were overwritten with v{held} while this generator "
                               "read them (a restarted generator read a buffer its predecessor had released); "
                               "exiting so that launch restarts it with the newest weights")
        if self.sock is None or self.sock_port != self.port:
            if self.sock is not None:
                self.sock.close(linger=0)
            self.sock = self.ctx.socket(zmq.PUSH)
            self.sock.setsockopt(zmq.LINGER, 1000)  # an ack queued at shutdown still goes out
            self.sock.connect(self._endpoint())
            self.sock_port = self.port
        try:
            self.sock.send_multipart(encode(WeightsAck(worker_id=self.worker_id, version=version)), zmq.NOBLOCK)
        except zmq.Again:  # the learner is gone (or not reading): nothing waits for this ack
            log.warning("cuda_ipc: could not acknowledge weights v%d (learner not reachable)", version)

    def _endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.mapped, self.stamp = {}, None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
