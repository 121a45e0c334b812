"""Real ZeroMQ sockets between two processes: a trajectory group goes up and a weight
update goes down (and is echoed back), byte-exact; garbage in between is rejected,
counted and survived. Every wait is bounded: the test fails, it never hangs."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch
import zmq

from asyncrl.wire.codec import SampleArrays, trajectory_arrays, trajectory_frames, weight_frames, weight_tensors
from asyncrl.wire.schema import Hello, SampleMeta, Shutdown, TrajectoryGroup, WeightUpdate
from asyncrl.wire.transport import LearnerEndpoint

TIMEOUT_S = 60.0  # generous: the child imports torch on a busy 2-core machine
LENGTHS = [5, 0, 17, 1, 64]
WORKER_ID = 7


def make_samples(seed: int) -> list[SampleArrays]:
    """Random arrays including the float values that a lossy path would change."""
    rng = np.random.default_rng(seed)
    out = []
    for n in LENGTHS:
        lp = rng.standard_normal(n).astype(np.float32)
        if n >= 4:
            lp[:4] = [-np.inf, -0.0, np.float32(1e-45), np.nan]  # -inf, signed zero, subnormal, NaN
        versions, mask = rng.integers(0, 1000, n, dtype=np.int32), None
        if n >= 8:  # multi-turn: an observation (context only: log-prob 0.0, version -1) after a model turn
            mask = np.ones(n, np.uint8)
            mask[5:8], lp[5:8], versions[5:8] = 0, 0.0, -1
        out.append(SampleArrays(rng.integers(-2**31, 2**31 - 1, n, dtype=np.int32), lp, versions, mask))
    return out


def make_weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("model.embed_tokens.weight", torch.randn(33, 16, generator=g)),
        ("model.layers.0.mlp.up_proj.weight", torch.randn(24, 16, generator=g).bfloat16()),
        ("model.norm.weight", torch.randn(16, generator=g).bfloat16()),
        ("empty", torch.empty(0, 4)),
        ("scalar", torch.tensor(3.25)),
        ("special", torch.tensor([float("-inf"), float("nan"), -0.0, 1e-40])),
    ]


def generator_child(address: str, seed: int) -> None:
    """The generator side, in a spawned process."""
    from asyncrl.wire.transport import GeneratorEndpoint

    ctx = zmq.Context()
    link = GeneratorEndpoint(address, WORKER_ID, ctx=ctx)
    try:
        link.send(Hello(worker_id=WORKER_ID, version=0))
        link.sock.send_multipart([b"\xc1 garbage before the trajectory"])
        arrays = make_samples(seed)
        header = TrajectoryGroup(group_id=11, worker_id=WORKER_ID, data_source="asyncrl/arith", prompt_ids=[3, 4, 5],
                                 samples=[SampleMeta(len(a.token_ids), 0.5, "length") for a in arrays])
        link.send(header, trajectory_frames(arrays))
        while True:  # echo every weight update back, re-encoded from the decoded tensors
            got = link.recv(timeout_s=TIMEOUT_S)
            if got is None:
                raise SystemExit("child: no message from the parent in time")
            msg, frames = got
            if isinstance(msg, Shutdown):
                assert link.rejected == 1, link.rejected  # the parent's garbage was dropped
                return
            assert isinstance(msg, WeightUpdate)
            echo, echo_frames = weight_frames(weight_tensors(msg, frames), msg.version)
            link.send(echo, echo_frames)
    finally:
        link.close()
        ctx.term()


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def recv(learner: LearnerEndpoint, child, what: str):
    """The next valid message; fail at once if the child died, or after TIMEOUT_S."""
    for _ in range(int(TIMEOUT_S / 0.25)):
        got = learner.recv(timeout_s=0.25)
        if got is not None:
            return got
        if not child.is_alive():
            pytest.fail(f"child exited with {child.exitcode} before sending {what}")
    pytest.fail(f"no {what} from the child within {TIMEOUT_S:.0f}s")


def test_trajectory_and_weights_round_trip_between_processes():
    seed = 1234
    ctx = zmq.Context()
    learner = LearnerEndpoint("127.0.0.1", 0, ctx=ctx)
    child = mp.get_context("spawn").Process(target=generator_child, args=(learner.address, seed), daemon=True)
    child.start()
    try:
        peer, hello, _ = recv(learner, child, "a hello")
        assert peer == f"gen-{WORKER_ID}".encode() and hello == Hello(worker_id=WORKER_ID, version=0)

        _, msg, frames = recv(learner, child, "a trajectory")
        assert isinstance(msg, TrajectoryGroup) and msg.group_id == 11 and msg.prompt_ids == [3, 4, 5]
        assert learner.rejected == 1  # the garbage between hello and trajectory
        received = trajectory_arrays(msg, frames)
        expected = make_samples(seed)
        assert [s.num_tokens for s in msg.samples] == LENGTHS
        for e, r in zip(expected, received):
            for field in ("token_ids", "logprobs", "versions"):
                a, b = getattr(e, field), getattr(r, field)
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), field
            want = np.ones(len(e.token_ids), np.uint8) if e.mask is None else e.mask  # None: all model tokens
            assert r.mask.dtype == np.uint8 and r.mask.tobytes() == want.tobytes()
        assert any(e.mask is not None for e in expected) and any(e.mask is None for e in expected)

        learner.sock.send_multipart([peer, b"garbage before the weights"])
        for version, wseed in ((1, 5), (2, 6)):  # two updates: the link keeps working
            weights = make_weights(wseed)
            wmsg, wframes = weight_frames(weights, version)
            learner.send(peer, wmsg, wframes)
            _, echo, echo_frames = recv(learner, child, f"the echo of weights v{version}")
            assert isinstance(echo, WeightUpdate) and echo.version == version
            assert echo.tensors == wmsg.tensors
            back = weight_tensors(echo, echo_frames)
            for (name, sent), (name_b, got_t) in zip(weights, back, strict=True):
                assert name == name_b and sent.dtype == got_t.dtype and sent.shape == got_t.shape
                assert raw_bytes(sent) == raw_bytes(got_t), name
        learner.send(peer, Shutdown(reason="test done"))
        child.join(TIMEOUT_S)
        assert child.exitcode == 0, f"child exited with {child.exitcode}"
    finally:
        if child.is_alive():
            child.terminate()
            child.join(5)
        learner.close()
        ctx.term()
