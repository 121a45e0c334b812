"""The ``cuda_ipc`` weight transport without a GPU: the notice's handle fields survive
the wire and a malformed notice is rejected; the fields are exactly torch's
(``reduce_tensor`` / ``rebuild_cuda_tensor`` of the installed torch, checked with
stand-ins for the CUDA calls); the learner reuses a shared buffer only once every
generator acknowledged it, uses another while one has not, and fails with a clear
error when all are still being read; a version stamp catches a buffer overwritten
under a reader; and the config refuses cuda_ipc (and nccl on a shared GPU) where it
cannot work. The same classes run on a real GPU in tests/gpu/test_cuda_ipc_weights.py."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.multiprocessing.reductions as reductions
import zmq

import asyncrl.wire.cuda_ipc as cuda_ipc
from asyncrl.cluster.placement import format_plan, generator_gpu, plan_placement
from asyncrl.config import ConfigError, load_config
from asyncrl.generator.worker import Worker
from asyncrl.wire.codec import STAMP, WireError, decode_checked, encode, ipc_layout
from asyncrl.wire.cuda_ipc import CudaIpcWeightReceiver, CudaIpcWeightSender
from asyncrl.wire.schema import MAX_HANDLE, CudaIpcBuffer, TensorMeta, WeightUpdate
from asyncrl.wire.transport import generator_limits

CPU = torch.device("cpu")
GPU_CONFIG = ["cluster.gpus_per_node=1", "cluster.learner_gpus=1", "cluster.generator_gpus=1"]


def buffer(dtype="float32", numel=6, **kw) -> CudaIpcBuffer:
    size = numel * getattr(torch, dtype).itemsize  # exactly the buffer
    fields = dict(dtype=dtype, numel=numel, tensor_offset=0, handle=bytes(range(64)), storage_size_bytes=size,
                  storage_offset_bytes=512, ref_counter_handle=b"/torch_123_456_0", ref_counter_offset=3,
                  event_handle=b"\x00\xff" * 32, event_sync_required=True, gpu_uuid="GPU-0f3c")
    return CudaIpcBuffer(**(fields | kw))


def notice(buffers, tensors=None, **kw) -> WeightUpdate:
    tensors = tensors if tensors is not None else [TensorMeta("a", "float32", [2, 3])]
    return WeightUpdate(version=4, tensors=tensors, transport="cuda_ipc", ipc_buffers=buffers,
                        **({"ack_port": 5555} | kw))


def over_the_wire(msg):
    return decode_checked(encode(msg), generator_limits())[0]


# ------------------------------------------------------------------ the notice


def test_layout_packs_each_dtype_after_the_stamp():
    metas = [TensorMeta("w", "float32", [2, 3]), TensorMeta("b", "bfloat16", [4]), TensorMeta("v", "float32", []),
             TensorMeta("e", "float32", [0, 5]), TensorMeta("i", "int64", [3])]
    places, sizes = ipc_layout(metas)
    assert places == [("float32", 0, 6), ("bfloat16", 0, 4), ("float32", 6, 1), ("float32", 7, 0),
                      ("int64", STAMP, 3)]
    assert sizes == {"float32": 7, "bfloat16": 4, "int64": STAMP + 3}


def test_notice_round_trips_every_handle_field():
    stamp = buffer("int64", STAMP, handle=b"\x00" * 64, tensor_offset=8, storage_size_bytes=128)
    msg = notice([buffer("float32", 6), stamp])
    got = over_the_wire(msg)
    assert got == msg and got.ipc_buffers[1].handle == b"\x00" * 64  # raw bytes, NULs included


@pytest.mark.parametrize("msg, reason", [
    (notice([buffer()]), "int64"),  # no stamp buffer
    (notice([buffer("int64", STAMP)]), "float32"),  # no buffer for the float32 tensor
    (notice([buffer(), buffer("int64", STAMP), buffer("bfloat16", 2)]), "dtypes"),  # a buffer nothing needs
    (notice([buffer(numel=7), buffer("int64", STAMP)]), "tensors need 6"),
    (notice([buffer(storage_size_bytes=20), buffer("int64", STAMP)]), "past its shared storage"),
    (notice([buffer(tensor_offset=1), buffer("int64", STAMP)]), "past its shared storage"),
    (notice([buffer(), buffer("int64", STAMP)], ack_port=0), "ack_port"),
    (WeightUpdate(version=1, tensors=[], transport="nccl", ipc_buffers=[buffer("int64", STAMP)]), "cuda_ipc fields"),
    (WeightUpdate(version=1, tensors=[], transport="disk", ack_port=9), "cuda_ipc fields"),
    (WeightUpdate(version=1, tensors=[], ipc_buffers=[buffer("int64", STAMP)]), "cuda_ipc fields"),  # zmq
])
def test_malformed_cuda_ipc_notices_are_rejected(msg, reason):
    with pytest.raises(WireError, match=reason):
        over_the_wire(msg)


def test_oversized_handles_and_frames_are_rejected():
    import msgspec

    with pytest.raises(WireError, match=r"length <= 65536 - at `\$.ipc_buffers\[0\].handle`"):  # MAX_HANDLE
        over_the_wire(notice([buffer(handle=b"x" * (MAX_HANDLE + 1)), buffer("int64", STAMP)]))
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"dtype": "float32"}, CudaIpcBuffer)  # every field is required
    good = notice([buffer(), buffer("int64", STAMP)])
    with pytest.raises(WireError, match="carries no frames"):
        decode_checked(encode(good, [b"x"]), generator_limits())


# ------------------------------------------------ torch's CUDA IPC reduction


def test_share_cuda_reads_the_fields_of_torchs_reduction(monkeypatch):
    """share_cuda unpacks reduce_tensor's arguments by rebuild_cuda_tensor's parameter
    names (torch's own contract: rebuild(*args)); CUDA itself is stood in for."""
    names = list(inspect.signature(reductions.rebuild_cuda_tensor).parameters)
    assert len(names) == 15  # torch 2.13; a change here means re-reading reductions.py
    values = {"tensor_cls": torch.Tensor, "tensor_size": torch.Size([10]), "tensor_stride": (1,), "tensor_offset": 2,
              "storage_cls": torch.storage.TypedStorage, "dtype": torch.float32, "storage_device": 0,
              "storage_handle": b"H" * 64, "storage_size_bytes": 48, "storage_offset_bytes": 1024,
              "requires_grad": False, "ref_counter_handle": b"/torch_1_2_3", "ref_counter_offset": 7,
              "event_handle": b"E" * 64, "event_sync_required": True}
    flat = torch.zeros(10)
    monkeypatch.setattr(reductions, "reduce_tensor",
                        lambda t: (reductions.rebuild_cuda_tensor, tuple(values[n] for n in names)))
    monkeypatch.setattr(cuda_ipc, "gpu_uuid", lambda device: "GPU-same")
    got = cuda_ipc.share_cuda(flat)
    assert got == CudaIpcBuffer(dtype="float32", numel=10, tensor_offset=2, handle=b"H" * 64, storage_size_bytes=48,
                                storage_offset_bytes=1024, ref_counter_handle=b"/torch_1_2_3", ref_counter_offset=7,
                                event_handle=b"E" * 64, event_sync_required=True, gpu_uuid="GPU-same")

    monkeypatch.setattr(reductions, "reduce_tensor", lambda t: (reductions.rebuild_tensor, (1, 2, 3)))
    with pytest.raises(RuntimeError, match="transport.weights=zmq"):  # not a CUDA reduction: a clear error
        cuda_ipc.share_cuda(flat)


def test_open_cuda_calls_rebuild_with_exactly_its_parameters(monkeypatch):
    seen = {}
    real = inspect.signature(reductions.rebuild_cuda_tensor)

    def fake_rebuild(**kwargs):
        real.bind(**kwargs)  # raises if a name is missing or unknown to this torch
        seen.update(kwargs)
        return torch.zeros(kwargs["tensor_size"])

    monkeypatch.setattr(reductions, "rebuild_cuda_tensor", fake_rebuild)
    monkeypatch.setattr(cuda_ipc, "gpu_uuid", lambda device: "GPU-0f3c")
    b = buffer("bfloat16", 6, tensor_offset=4, storage_size_bytes=64)
    t = cuda_ipc.open_cuda(b, torch.device("cuda", 3))
    assert t.shape == (6,) and set(seen) == set(real.parameters)
    assert seen["storage_device"] == 3  # the reader's own device index, not the sender's
    assert (seen["tensor_size"], seen["tensor_stride"], seen["tensor_offset"]) == ((6,), (1,), 4)
    assert seen["dtype"] is torch.bfloat16 and seen["storage_cls"] is torch.storage.TypedStorage
    assert seen["requires_grad"] is False and seen["tensor_cls"] is torch.Tensor
    for name in ("storage_handle", "storage_size_bytes", "storage_offset_bytes", "ref_counter_handle",
                 "ref_counter_offset", "event_handle", "event_sync_required"):
        assert seen[name] == getattr(b, name.removeprefix("storage_") if name == "storage_handle" else name), name

    monkeypatch.setattr(cuda_ipc, "gpu_uuid", lambda device: "GPU-other")
    with pytest.raises(RuntimeError, match="same GPU"):
        cuda_ipc.open_cuda(b, torch.device("cuda", 0))


# ------------------------------------------------ sender and receiver, on CPU


class FakeIpc:
    """Stands in for CUDA IPC inside one process: a handle names a tensor, and opening
    it gives that same memory (as a mapping of the learner's GPU memory would)."""

    def __init__(self) -> None:
        self.tensors: dict[bytes, torch.Tensor] = {}
        self.opened = 0

    def share(self, flat: torch.Tensor) -> CudaIpcBuffer:
        handle = f"handle-{len(self.tensors)}".encode()
        self.tensors[handle] = flat
        return buffer(str(flat.dtype).removeprefix("torch."), flat.numel(), handle=handle, storage_offset_bytes=0,
                      storage_size_bytes=flat.numel() * flat.element_size(), gpu_uuid="")

    def open(self, buf: CudaIpcBuffer, device: torch.device) -> torch.Tensor:
        self.opened += 1
        return self.tensors[buf.handle]


@pytest.fixture
def ipc():
    ctx = zmq.Context()
    fake = FakeIpc()
    made = []

    def make(num_generators=1, max_slots=1, timeout_s=10.0):
        sender = CudaIpcWeightSender(num_generators, timeout_s, max_slots=max_slots, device=CPU, share=fake.share,
                                     ctx=ctx)
        receivers = [CudaIpcWeightReceiver(w, device=CPU, open_buffer=fake.open, ctx=ctx)
                     for w in range(num_generators)]
        made.extend([sender, *receivers])
        return sender, receivers

    yield fake, make
    for x in made:
        x.close()
    ctx.term()


def weights(version: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(version)
    return [("embed", torch.randn(7, 4, generator=g)), ("norm", torch.randn(4, generator=g).bfloat16()),
            ("scalar", torch.tensor(float(version))), ("empty", torch.zeros(0, 3)),
            ("steps", torch.tensor([version, -version], dtype=torch.int64))]


def publish(sender, version):
    msg, frames = sender.notice(weights(version), version)
    assert frames == []
    return over_the_wire(msg)  # what a generator's endpoint decodes, every check included


def read(receiver, msg) -> list[tuple[str, torch.Tensor]]:
    named = receiver.receive(msg, [])
    assert named is not None
    copied = [(k, t.clone()) for k, t in named]  # what an engine's load_weights does
    receiver.loaded(msg.version)
    return copied


def assert_same(got, want):
    assert [k for k, _ in got] == [k for k, _ in want]
    for (k, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), k


def test_weights_arrive_bit_identical_and_the_buffer_is_reused_after_the_ack(ipc):
    fake, make = ipc
    sender, (receiver,) = make(max_slots=1)
    v1 = publish(sender, 1)
    assert_same(read(receiver, v1), weights(1))
    v2 = publish(sender, 2)  # one slot: it waits for v1's ack, then overwrites in place
    assert [b.handle for b in v2.ipc_buffers] == [b.handle for b in v1.ipc_buffers]
    assert_same(read(receiver, v2), weights(2))
    assert fake.opened == 3  # float32, bfloat16, int64 mapped once, reused for v2
    assert sender.acknowledged(2, timeout_s=10) and not sender.acknowledged(3, timeout_s=0.1)


def test_an_unacknowledged_buffer_is_never_overwritten(ipc):
    fake, make = ipc
    sender, (slow, fast) = make(num_generators=2, max_slots=2, timeout_s=0.5)
    v1 = publish(sender, 1)
    assert_same(read(fast, v1), weights(1))
    held = [(k, t) for k, t in slow.receive(v1, [])]  # mid-read: no ack yet
    v2 = publish(sender, 2)
    assert {b.handle for b in v2.ipc_buffers}.isdisjoint(b.handle for b in v1.ipc_buffers)  # a second slot
    assert_same([(k, t.clone()) for k, t in held], weights(1))  # v1 untouched under the slow reader
    with pytest.raises(TimeoutError, match=r"generator\(s\) \[0\] have not acknowledged weights v1.*timeout_s"):
        sender.notice(weights(3), 3)  # both slots in use, the slow generator never acks
    slow.loaded(1)
    assert_same(read(fast, v2), weights(2))
    v3 = publish(sender, 3)  # v1's slot is free again
    assert [b.handle for b in v3.ipc_buffers] == [b.handle for b in v1.ipc_buffers]
    assert_same(read(slow, v3), weights(3)) and assert_same(read(fast, v3), weights(3))


def test_the_stamp_catches_a_buffer_rewritten_under_a_reader(ipc):
    """A restarted generator is re-sent a notice whose buffer its predecessor had already
    acknowledged: if the learner rewrites that buffer meanwhile, the reader must notice."""
    fake, make = ipc
    sender, (receiver,) = make(max_slots=1)
    v1 = publish(sender, 1)
    read(receiver, v1)
    v2 = publish(sender, 2)  # v1 acknowledged: its slot now holds v2
    assert receiver.receive(v1, []) is None  # a stale notice is skipped (a newer one is queued)
    assert receiver.receive(v2, []) is not None  # reading v2, not acknowledged yet
    sender.acked[0] = 2  # ... but its predecessor had acknowledged v2
    v3 = publish(sender, 3)  # so the slot is rewritten under the reader
    with pytest.raises(RuntimeError, match="overwritten with v3 while this generator read them"):
        receiver.loaded(2)
    assert_same(read(receiver, v3), weights(3))


def test_acks_from_strangers_are_rejected(ipc):
    from asyncrl.wire.schema import Hello, WeightsAck

    fake, make = ipc
    sender, _ = make()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{sender.port}")
    push.send_multipart([b"garbage"])
    push.send_multipart(encode(Hello(worker_id=0, version=9)))  # the wrong kind
    push.send_multipart(encode(WeightsAck(worker_id=7, version=9)))  # no such generator
    push.send_multipart(encode(WeightsAck(worker_id=0, version=5)))
    assert sender.acknowledged(5, timeout_s=10)
    assert sender.acked == [5]  # only the valid acknowledgement counted
    push.close(linger=0)


class Recorder:
    """An engine and a receiver that log the order of their calls."""

    def __init__(self, superseded=False) -> None:
        self.calls, self.superseded, self.version = [], superseded, 0

    def receive(self, msg, frames):
        self.calls.append("receive")
        return None if self.superseded else [("w", torch.zeros(1))]

    def load_weights(self, named, version):
        self.calls.append("load_weights")

    def loaded(self, version):
        self.calls.append(f"loaded v{version}")


@pytest.mark.parametrize("superseded", [False, True])
def test_worker_acknowledges_only_after_the_engine_copied(superseded):
    rec = Recorder(superseded)
    worker = Worker(rec, tok=None, link=None, worker_id=0)
    worker.weights = rec
    worker.handle(WeightUpdate(version=3, tensors=[]), [])
    assert rec.calls == (["receive"] if superseded else ["receive", "load_weights", "loaded v3"])


# ------------------------------------------------------------------ config


def test_cuda_ipc_on_one_gpu_is_valid_and_planned_on_learner_rank_0s_gpu():
    cfg = load_config("quickstart", ["transport.weights=cuda_ipc", *GPU_CONFIG, "generator.num_workers=2"])
    plan = plan_placement(cfg)
    assert [(p.name, p.node, p.gpus) for p in plan] == [("learner0", 0, 1), ("generator0", 0, 0),
                                                       ("generator1", 0, 0)]
    assert "generator workers 0, 1 (on learner rank 0's GPU (cuda_ipc)" in format_plan(cfg, plan)
    assert generator_gpu(cfg, 0) == generator_gpu(cfg, 1) == 0


@pytest.mark.parametrize("overrides, message", [
    ([], r"cluster.learner_gpus=1 and cluster.generator_gpus=1.*on CPU use transport.weights=zmq"),  # a CPU run
    (["cluster.gpus_per_node=1", "cluster.learner_gpus=1"], "cluster.generator_gpus=1"),
    (["cluster.gpus_per_node=2", "cluster.learner_gpus=1", "cluster.generator_gpus=2"], "cluster.generator_gpus=1"),
    ([*GPU_CONFIG, "cluster.backend=ray"], "cluster.backend=local"),
    ([*GPU_CONFIG, "cluster.nodes=2"], "cluster.nodes=1"),
    ([*GPU_CONFIG, "generator.engine=vllm"], "generator.engine=hf"),
])
def test_cuda_ipc_where_it_cannot_work_fails_at_start_up(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("quickstart", ["transport.weights=cuda_ipc", *overrides])


def test_nccl_on_a_gpu_shared_with_the_learner_suggests_cuda_ipc():
    with pytest.raises(ConfigError, match="NCCL refuses two ranks on one GPU.*transport.weights=cuda_ipc"):
        load_config("quickstart", ["transport.weights=nccl", "generator.engine=vllm", *GPU_CONFIG])
    # on Ray every role gets GPUs of its own: accepted
    load_config("quickstart", ["transport.weights=nccl", "generator.engine=vllm", "cluster.backend=ray",
                               "cluster.gpus_per_node=2", "cluster.learner_gpus=1", "cluster.generator_gpus=1"])


def test_generator_gpu_follows_the_backend():
    cpu = load_config("quickstart")
    assert generator_gpu(cpu, 0) is None
    local = load_config("quickstart", ["cluster.gpus_per_node=4", "cluster.learner_gpus=1",
                                       "cluster.generator_gpus=1", "learner.world_size=2", "generator.num_workers=2",
                                       "learner.prompts_per_step=4"])
    assert [generator_gpu(local, w) for w in (0, 1)] == [2, 3]  # after the learner ranks' GPUs 0 and 1
    ray = load_config("quickstart", ["cluster.backend=ray", "cluster.gpus_per_node=4", "cluster.learner_gpus=1",
                                     "cluster.generator_gpus=1"])
    assert generator_gpu(ray, 1) == 0  # Ray's CUDA_VISIBLE_DEVICES: the bundle's GPU is device 0


def test_a_restarted_generator_frees_the_buffers_while_the_learner_waits(ipc):
    """A generator died before acknowledging: every slot stays held by its stale ack. The
    learner's wait keeps the hub serving (``idle``); when the hub answers the restarted
    generator's Hello with the newest notice, its acknowledgement frees the slots."""
    fake, make = ipc
    sender, (dead, alive) = make(num_generators=2, max_slots=2, timeout_s=20)
    v1 = publish(sender, 1)
    read(alive, v1)  # generator 0 dies holding v1, never acknowledging
    v2 = publish(sender, 2)
    read(alive, v2)
    calls = []

    def idle():  # the hub's _receive: on the 3rd call the restarted generator's Hello arrives
        calls.append(1)
        if len(calls) == 3:
            read(dead, v2)  # the hub re-sent the newest notice; the new process loads and acks it

    msg, _ = sender.notice(weights(3), 3, idle=idle)
    assert len(calls) >= 3 and msg.version == 3
    v3 = over_the_wire(msg)
    assert_same(read(alive, v3), weights(3))
