"""Weight sync transports (asyncrl.wire.weights): ``zmq`` and ``disk`` put the same
weights into an engine, bit for bit; a learner killed while writing a version to disk
never gets that version loaded (the previous complete one stays the newest); the
broadcast transport (NCCL in production) delivers exact tensors over its own process
group, here on gloo, beside nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from asyncrl.wire.codec import decode_checked, encode
from asyncrl.wire.transport import generator_limits
from asyncrl.wire.weights import (
    MARKER, BroadcastWeightReceiver, BroadcastWeightSender, DiskWeightReceiver, DiskWeightSender, ZmqWeights,
    weights_file,
)

from testkit import REPO, free_port, run_spawned, subprocess_env


def new_weights(model_dir, seed: int) -> list[tuple[str, torch.Tensor]]:
    from asyncrl.models import load_model

    g = torch.Generator().manual_seed(seed)
    model = load_model(str(model_dir), "float32")
    return [(k, v + torch.randn(v.shape, generator=g)) for k, v in model.state_dict().items()
            if k != "lm_head.weight"]  # tied: sent once, as the embedding


def over_the_wire(msg, frames):
    """Encode and decode the notice as a generator's endpoint would (every check)."""
    return decode_checked(encode(msg, frames), generator_limits())


def engine(model_dir):
    from asyncrl.generator.hf import HFEngine
    from asyncrl.models import load_model

    return HFEngine(load_model(str(model_dir), "float32"), pad_id=0, seed=0)


def test_zmq_and_disk_deliver_identical_weights(tiny_model_dir, tmp_path):
    named = new_weights(tiny_model_dir, seed=1)
    named.append(("model.norm.weight", named[-1][1].to(torch.bfloat16)))  # a bf16 tensor too (replaces the fp32 one)
    named = list(dict(named).items())
    zmq_engine, disk_engine = engine(tiny_model_dir), engine(tiny_model_dir)

    msg, frames = over_the_wire(*ZmqWeights().notice(named, 1))
    zmq_engine.load_weights(ZmqWeights().receive(msg, frames), msg.version)

    notice, frames = DiskWeightSender(tmp_path / "w").notice(named, 1)
    assert notice.transport == "disk" and frames == []
    msg, frames = over_the_wire(notice, frames)
    disk_engine.load_weights(DiskWeightReceiver(tmp_path / "w").receive(msg, frames), msg.version)

    a, b = zmq_engine.model.state_dict(), disk_engine.model.state_dict()
    assert zmq_engine.version == disk_engine.version == 1
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sent = dict(named)
    assert torch.equal(a["model.embed_tokens.weight"], sent["model.embed_tokens.weight"])


def test_disk_keeps_the_newest_versions_and_skips_superseded_ones(tiny_model_dir, tmp_path):
    named = new_weights(tiny_model_dir, seed=2)
    sender, receiver = DiskWeightSender(tmp_path, keep=2), DiskWeightReceiver(tmp_path)
    notices = [sender.notice(named, v)[0] for v in (1, 2, 3)]
    assert not weights_file(tmp_path, 1).exists() and weights_file(tmp_path, 3).exists()
    assert receiver.receive(notices[0], []) is None  # superseded: the worker waits for the next notice
    assert receiver.load_latest()[0] == 3


TORN_WRITER = textwrap.dedent("""
    import sys, time
    import torch
    import asyncrl.wire.weights as w

    named = [("a", torch.full((256, 256), float(v))) for v in (1, 2)]
    sender = w.DiskWeightSender(sys.argv[1])
    sender.notice([named[0]], 1)
    def stuck(fd):  # the data is in the temp file; the rename has not happened
        print("writing v2", flush=True)
        time.sleep(600)
    w.os.fsync = stuck
    sender.notice([named[1]], 2)
""")


def test_a_torn_write_is_never_loaded(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", TORN_WRITER, str(tmp_path)], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        line = b""
        while b"writing v2" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"writer did not reach v2: {line!r} {proc.stdout.read()!r}")
        proc.send_signal(signal.SIGKILL)  # killed mid-write, as a crashed learner would be
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    tmp_files = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert tmp_files, "the writer was not killed mid-write"
    assert not weights_file(tmp_path, 2).exists()
    receiver = DiskWeightReceiver(tmp_path)
    version, named = receiver.load_latest()
    assert version == 1 and torch.equal(dict(named)["a"], torch.full((256, 256), 1.0))
    from asyncrl.wire.schema import TensorMeta, WeightUpdate

    notice = WeightUpdate(version=2, tensors=[TensorMeta("a", "float32", [256, 256])], transport="disk")
    assert receiver.receive(notice, []) is None  # the notice never went out, but even so: nothing torn loads
    assert (tmp_path / MARKER).exists()


def _broadcast_rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    named = [("w", torch.arange(12.0).reshape(3, 4)), ("b", torch.tensor([1.5, -2.0]).to(torch.bfloat16)),
             ("s", torch.tensor(7, dtype=torch.int64))]
    if rank == 0:
        # 48-byte buckets: w alone, then b and s together (bucketed send and receive)
        sender = BroadcastWeightSender("127.0.0.1", port, num_generators=2, backend="gloo", timeout_s=60,
                                       bucket_bytes=48)
        for version in (1, 2):
            scaled = [(k, v * version) for k, v in named]
            sender.notice(scaled, version)  # in a run the hub sends this to every generator over ZeroMQ
            sender.after_notice(scaled)
    else:
        receiver = BroadcastWeightReceiver("127.0.0.1", port, worker_id=rank - 1, num_generators=2, backend="gloo",
                                           timeout_s=60)
        got = []
        for version in (1, 2):
            msg = WeightUpdateFrom(named, version)
            got.append([(k, v.clone()) for k, v in receiver.receive(msg, [])])
        torch.save(got, f"{out}.{rank}")


def WeightUpdateFrom(named, version):  # noqa: N802 - what the generator decodes from the notice
    msg = BroadcastWeightSender("127.0.0.1", 0, 0, bucket_bytes=48).notice(named, version)[0]
    assert msg.buckets == [1, 2]
    return msg


def test_broadcast_group_delivers_exact_tensors_on_gloo(tmp_path):
    out = str(tmp_path / "bcast")
    run_spawned(_broadcast_rank, (free_port(), out), 3, 180, "broadcast processes")
    for rank in (1, 2):
        got = torch.load(f"{out}.{rank}")
        for version, named in zip((1, 2), got):
            assert [k for k, _ in named] == ["w", "b", "s"]
            d = dict(named)
            assert torch.equal(d["w"], torch.arange(12.0).reshape(3, 4) * version)
            assert d["b"].dtype == torch.bfloat16 and torch.equal(d["b"], (torch.tensor([1.5, -2.0]) * version).bfloat16())
            assert d["s"].shape == () and d["s"].item() == 7 * version
