"""The ``nccl`` weight transport on real GPUs: ``BroadcastGroup`` builds a
ProcessGroupNCCL of its own from a TCPStore (beside no default group) and learner rank
0's broadcast reaches the generators bit for bit (bf16 and fp32, several versions),
bucketed: the sender casts floating tensors to the engine's dtype and broadcasts one
packed buffer per dtype per bucket (``transport.bucket_mb``), the receiver allocates
one bucket at a time (``asyncrl.wire.weights.send_bucket`` / ``receive_bucket``).

One rank per GPU (NCCL refuses two ranks on one device, "Duplicate GPU detected"): on
one GPU the tests build the group and run the learner's sender through NCCL with rank
0 alone (group construction, the tensors' move to the GPU, bf16 and 0-d broadcasts);
the learner -> generator test needs 2 GPUs. A learner and an engine sharing one GPU use
``transport.weights=cuda_ipc`` instead (tests/gpu/test_cuda_ipc_weights.py). The same
sender/receiver code runs over gloo on CPU in tests/integration/test_weight_transports.py."""

from __future__ import annotations


import pytest
import torch

from asyncrl.wire.weights import BroadcastGroup, BroadcastWeightReceiver, BroadcastWeightSender
from testkit import free_port, run_spawned

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def weights(version: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(version)
    return [("embed", torch.randn(1000, 64, generator=g).bfloat16()), ("norm", torch.randn(64, generator=g)),
            ("scalar", torch.tensor(float(version)))]


def test_nccl_group_on_one_gpu_is_a_real_nccl_group():
    """A one-rank broadcast moves no data (rank 0 is the source and the only member), so
    this cannot test delivery: that is test_nccl_broadcast_learner_to_generator (2 GPUs)
    and, over gloo, tests/integration/test_weight_transports.py. What one GPU can check:
    the group is a ProcessGroupNCCL on the current device, a broadcast of a CUDA tensor
    completes there, and a CPU tensor is refused, which a gloo group would accept."""
    torch.cuda.set_device(0)
    group = BroadcastGroup("127.0.0.1", free_port(), rank=0, world_size=1, backend="nccl", timeout_s=60)
    assert isinstance(group.pg, torch.distributed.ProcessGroupNCCL) and group.device == torch.device("cuda", 0)
    t = torch.arange(10, device="cuda", dtype=torch.float32)
    group.broadcast(t)
    torch.cuda.synchronize()
    assert torch.equal(t.cpu(), torch.arange(10.0))
    with pytest.raises((RuntimeError, ValueError), match="CUDA"):  # NCCL: "Tensors must be CUDA and dense"
        group.broadcast(torch.arange(10.0))
    group.close()


def test_nccl_sender_alone_on_one_gpu():
    """Learner rank 0's side of a publish (notice, then the broadcast) on a NCCL group of
    one: what one GPU can check of the learner -> generator path."""
    torch.cuda.set_device(0)
    sender = BroadcastWeightSender("127.0.0.1", free_port(), num_generators=0, backend="nccl", timeout_s=60)
    for v in (1, 2):
        named = weights(v)  # CPU tensors, as the learner's full state dict is
        msg, frames = sender.notice(named, v)
        assert (msg.version, msg.transport, frames) == (v, "nccl", [])
        assert [(m.name, m.dtype, list(m.shape)) for m in msg.tensors] == [
            (k, str(t.dtype).removeprefix("torch."), list(t.shape)) for k, t in named]
        sender.after_notice(named)
    torch.cuda.synchronize()
    assert sender.group is not None and sender.group.device.type == "cuda"
    sender.close()


BUCKET = 64 << 10  # the 1000 x 64 bf16 embedding (125 KiB) is a bucket of its own; norm + scalar share one


def _rank(rank: int, port: int, out: str) -> None:
    torch.cuda.set_device(rank)
    if rank == 0:
        sender = BroadcastWeightSender("127.0.0.1", port, num_generators=1, backend="nccl", timeout_s=120,
                                       bucket_bytes=BUCKET, dtype=torch.bfloat16)
        for v in (1, 2):
            named = [(k, t.cuda()) for k, t in weights(v)]
            sender.notice(named, v)
            sender.after_notice(named)
        torch.cuda.synchronize()
    else:
        receiver = BroadcastWeightReceiver("127.0.0.1", port, worker_id=0, num_generators=1, backend="nccl",
                                           timeout_s=120)
        got = []
        for v in (1, 2):
            # what the ZeroMQ notice says
            notice = BroadcastWeightSender("127.0.0.1", 0, 1, bucket_bytes=BUCKET, dtype=torch.bfloat16).notice(
                weights(v), v)[0]
            assert notice.buckets == [1, 2]
            got.append([(k, t.cpu()) for k, t in receiver.receive(notice, [])])
        torch.save(got, out)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="learner -> generator broadcast needs 2 GPUs (one rank each)")
def test_nccl_broadcast_learner_to_generator(tmp_path):
    out = str(tmp_path / "got.pt")
    run_spawned(_rank, (free_port(), out), 2, 180, "NCCL broadcast")
    for v, named in zip((1, 2), torch.load(out)):
        for (k, t), (k2, want) in zip(named, weights(v), strict=True):
            want = want.bfloat16()  # the engine's dtype: cast on the learner, before the broadcast
            assert k == k2 and t.dtype == want.dtype and torch.equal(t, want), k
