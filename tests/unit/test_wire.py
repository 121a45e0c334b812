"""Wire codec and endpoints in one process: round trips, and every kind of malformed
message is a WireError that the endpoint counts and survives."""

from __future__ import annotations

import time

import msgspec
import numpy as np
import pytest
import torch
import zmq

from asyncrl.wire.codec import (
    MAX_HEADER_BYTES, SampleArrays, WireError, decode, encode, trajectory_arrays, trajectory_frames, weight_frames,
    weight_tensors,
)
from asyncrl.wire.schema import (
    PROTOCOL_VERSION, Hello, PromptGroup, Prompts, SampleMeta, Shutdown, TensorMeta, TrajectoryGroup, WeightUpdate,
)
from asyncrl.wire.transport import GeneratorEndpoint, LearnerEndpoint

TIMEOUT_S = 10.0


def samples(lengths, seed=0) -> list[SampleArrays]:
    rng = np.random.default_rng(seed)
    return [SampleArrays(rng.integers(-2**31, 2**31 - 1, n, dtype=np.int32),
                         rng.standard_normal(n).astype(np.float32),
                         rng.integers(0, 100, n, dtype=np.int32)) for n in lengths]


def valid_samples(lengths, seed=0) -> list[SampleArrays]:
    """Samples a learner at version 0 with a 1000-token vocabulary accepts (log-probs <= 0)."""
    rng = np.random.default_rng(seed)
    return [SampleArrays(rng.integers(0, 1000, n, dtype=np.int32), -np.abs(rng.standard_normal(n)).astype(np.float32),
                         np.zeros(n, dtype=np.int32)) for n in lengths]


def expect(hub, gids, n=2, purpose="train") -> None:
    """Record ``gids`` as requested from generator 5 with ``n`` samples each (what
    ``RolloutHub.request`` / ``evaluate`` record when they send the prompts)."""
    msg = Prompts(groups=[], min_version=0, n=n, temperature=1.0, top_p=1.0, max_tokens=8, purpose=purpose)
    (hub.outstanding if purpose == "train" else hub.outstanding_eval).update(gids)
    hub.assigned.update((gid, (b"gen-5", msg)) for gid in gids)


def traj_header(lengths) -> TrajectoryGroup:
    return TrajectoryGroup(group_id=3, worker_id=1, data_source="asyncrl/arith", prompt_ids=[4, 5, 6],
                           samples=[SampleMeta(num_tokens=n, reward=1.0, finish_reason="stop") for n in lengths])


# ------------------------------------------------------------------ codec


@pytest.mark.parametrize("msg", [
    Hello(worker_id=2, version=5),
    Prompts(groups=[PromptGroup(1, [3, 4], "12", "asyncrl/arith")], min_version=1, n=4, temperature=0.7, top_p=0.9,
            max_tokens=8, purpose="eval"),
    traj_header([2, 0, 3]),
    WeightUpdate(version=9, tensors=[TensorMeta("w", "bfloat16", [2, 3])]),
    Shutdown(reason="done"),
], ids=lambda m: type(m).__name__)
def test_header_round_trip(msg):
    frames = encode(msg, [b"abc"])
    got, rest = decode(frames)
    assert got == msg and type(got) is type(msg) and got.proto == PROTOCOL_VERSION
    assert [bytes(f) for f in rest] == [b"abc"]


def test_trajectory_arrays_round_trip_and_split():
    lengths = [4, 0, 7, 1]
    arrays = samples(lengths)
    got = trajectory_arrays(traj_header(lengths), trajectory_frames(arrays))
    assert [len(s.token_ids) for s in got] == lengths
    for a, b in zip(arrays, got):
        assert a.token_ids.tobytes() == b.token_ids.tobytes()
        assert a.logprobs.tobytes() == b.logprobs.tobytes()
        assert a.versions.tobytes() == b.versions.tobytes()


def test_weights_round_trip_every_shape_and_dtype():
    g = torch.Generator().manual_seed(0)
    named = [("f32", torch.randn(3, 5, generator=g)), ("bf16", torch.randn(4, 2, generator=g).bfloat16()),
             ("empty", torch.empty(0, 3)), ("scalar", torch.tensor(-1.25)),
             ("strided", torch.randn(4, 6, generator=g)[:, ::2]), ("i64", torch.arange(5))]
    msg, frames = weight_frames(named, version=4)
    assert msg.version == 4
    out = weight_tensors(*decode(encode(msg, frames)))
    assert [n for n, _ in out] == [n for n, _ in named]
    for (_, a), (_, b) in zip(named, out):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.contiguous().reshape(-1).view(torch.uint8).tolist() == b.reshape(-1).view(torch.uint8).tolist()


def test_wrong_protocol_version_is_rejected():
    with pytest.raises(WireError, match="protocol version"):
        decode(encode(Hello(worker_id=0, version=0, proto=PROTOCOL_VERSION + 1)))


@pytest.mark.parametrize("head", [
    b"\xc1\xff garbage",  # not msgpack
    msgspec.msgpack.encode({"kind": "hello", "worker_id": 0})[:-2],  # truncated
    msgspec.msgpack.encode({"kind": "pickle", "payload": 1}),  # unknown kind
    msgspec.msgpack.encode({"worker_id": 0, "version": 0}),  # no tag
    msgspec.msgpack.encode({"kind": "hello", "worker_id": "zero", "version": 0}),  # wrong type
    msgspec.msgpack.encode({"kind": "hello", "worker_id": 0, "version": 0, "extra": 1}),  # unknown field
    msgspec.msgpack.encode([1, 2, 3]),
], ids=["garbage", "truncated", "unknown_kind", "no_tag", "wrong_type", "unknown_field", "array"])
def test_undecodable_header_is_rejected(head):
    with pytest.raises(WireError):
        decode([head])


def test_empty_and_oversized_messages_are_rejected():
    with pytest.raises(WireError, match="empty"):
        decode([])
    with pytest.raises(WireError, match="exceeds"):
        decode([b"\x00" * (MAX_HEADER_BYTES + 1)])


def test_trajectory_frame_mismatches_are_rejected():
    lengths = [3, 2]
    head, frames = traj_header(lengths), trajectory_frames(samples(lengths))
    with pytest.raises(WireError, match="header declares"):
        trajectory_arrays(head, [frames[0], frames[1][:-4], *frames[2:]])  # one log-prob short
    with pytest.raises(WireError, match="header declares"):
        trajectory_arrays(head, [frames[0] + b"\0\0\0\0", *frames[1:]])
    with pytest.raises(WireError, match="header declares 5 x 1"):
        trajectory_arrays(head, [*frames[:3], frames[3][:-1]])  # one mask byte short
    with pytest.raises(WireError, match="4 array frames"):
        trajectory_arrays(head, frames[:3])  # a protocol-1 message: no mask frame
    with pytest.raises(WireError):  # lengths that sum right but one is negative
        trajectory_arrays(traj_header([7, -2]), frames)


def test_weight_frame_mismatches_are_rejected():
    msg, frames = weight_frames([("a", torch.ones(2, 2)), ("b", torch.ones(3))], version=1)
    with pytest.raises(WireError, match="frames for"):
        weight_tensors(msg, frames[:1])
    with pytest.raises(WireError, match="header declares"):
        weight_tensors(msg, [frames[0], bytes(frames[1])[:-1]])
    bad = WeightUpdate(version=1, tensors=[TensorMeta("a", "not_a_dtype", [2, 2]), msg.tensors[1]])
    with pytest.raises(WireError, match="unknown dtype"):
        weight_tensors(bad, frames)
    bad = WeightUpdate(version=1, tensors=[TensorMeta("a", "Tensor", [4]), msg.tensors[1]])  # a torch attr, no dtype
    with pytest.raises(WireError, match="unknown dtype"):
        weight_tensors(bad, frames)
    bad = WeightUpdate(version=1, tensors=[TensorMeta("a", "float32", [-2, -2]), msg.tensors[1]])
    with pytest.raises(WireError, match="negative"):
        weight_tensors(bad, frames)


# ------------------------------------------------------------------ endpoints


@pytest.fixture
def link():
    ctx = zmq.Context()
    learner = LearnerEndpoint("127.0.0.1", 0, ctx=ctx)
    gen = GeneratorEndpoint(learner.address, worker_id=5, ctx=ctx)
    yield learner, gen
    gen.close()
    learner.close()
    ctx.term()


def test_endpoints_count_rejections_and_keep_serving(link):
    learner, gen = link
    assert learner.recv(timeout_s=0.05) is None  # nothing sent: a bounded wait, no hang
    gen.sock.send_multipart([b"\x00not msgpack"])
    gen.send(Hello(worker_id=5, version=0, proto=PROTOCOL_VERSION + 7))
    gen.sock.send_multipart([msgspec.msgpack.encode({"kind": "exec", "code": "rm -rf /"}), b"payload"])
    gen.send(Hello(worker_id=5, version=3))
    got = learner.recv(timeout_s=TIMEOUT_S)
    assert got is not None, "the valid message after the garbage was not received"
    peer, msg, frames = got
    assert peer == b"gen-5" and msg == Hello(worker_id=5, version=3) and frames == []
    assert learner.rejected == 3

    # and the other direction
    learner.sock.send_multipart([peer, b"junk"])
    learner.send(peer, Shutdown(reason="bye"))
    got = gen.recv(timeout_s=TIMEOUT_S)
    assert got is not None and got[0] == Shutdown(reason="bye")
    assert gen.rejected == 1


def test_only_garbage_times_out_with_none(link):
    learner, gen = link
    gen.sock.send_multipart([b"junk"])
    assert learner.recv(timeout_s=0.5) is None
    assert learner.rejected == 1


def test_hub_drops_a_malformed_trajectory_and_keeps_collecting(link):
    from asyncrl.config import Config
    from asyncrl.learner.hub import RolloutHub

    learner, gen = link
    hub = RolloutHub(Config(), learner, source=None, eval_problems=[], tokenizer=None)
    expect(hub, [3])
    hub.version = 100
    lengths = [2, 3]
    frames = trajectory_frames(valid_samples(lengths))
    gen.send(traj_header(lengths), [frames[0], frames[1][:-4], *frames[2:]])  # a log-prob short
    gen.send(traj_header(lengths), frames)
    assert hub._wait_for(hub.buffer, 1)
    group = hub.buffer.popleft()
    assert [len(s.token_ids) for s in group.samples] == lengths
    assert learner.rejected == 1 and hub.rejected_groups == 0



def test_hub_rejects_unrequested_duplicate_and_out_of_range_groups(link):
    """Content checks: only outstanding group ids, token ids inside the vocabulary and
    versions no newer than the learner's are accepted; each group id at most once. A
    requested group answered with bad content is not waited for again (admission
    control replaces it), so it cannot hold a credit for the rest of the run."""
    from asyncrl.config import Config
    from asyncrl.learner.hub import RolloutHub

    learner, gen = link
    hub = RolloutHub(Config(), learner, source=None, eval_problems=[], tokenizer=None, vocab_size=1000)
    expect(hub, [0, 1, 2, 3])
    lengths = [2, 3]
    good = trajectory_frames(valid_samples(lengths))

    def header(gid):
        h = traj_header(lengths)
        return type(h)(**{**{f: getattr(h, f) for f in h.__struct_fields__}, "group_id": gid})

    gen.send(header(7), good)  # never requested
    big = valid_samples(lengths)
    big[0].token_ids[0] = 5000
    gen.send(header(2), trajectory_frames(big))  # token outside the vocabulary
    future = valid_samples(lengths)
    future[1].versions[:] = 3
    gen.send(header(3), trajectory_frames(future))  # newer than the learner's version 0
    gen.send(header(0), good)
    gen.send(header(0), good)  # duplicate
    gen.send(header(2), good)  # a bad answer's id is no longer outstanding
    gen.send(header(1), good)
    assert hub._wait_for(hub.buffer, 2)
    assert [g.msg.group_id for g in hub.buffer] == [0, 1]
    deadline = time.monotonic() + 5
    while hub.rejected_groups < 5 and time.monotonic() < deadline:
        hub._receive(timeout_s=0.2)
    assert hub.rejected_groups == 5 and hub.in_flight == 0


def test_hub_sees_generators_idle_once_their_groups_arrived(link):
    """What core lending (learner.borrow_threads) reads before every micro-batch: busy
    while a requested group is out, idle once it has arrived, without blocking."""
    from asyncrl.config import Config
    from asyncrl.learner.hub import RolloutHub

    learner, gen = link
    hub = RolloutHub(Config(), learner, source=None, eval_problems=[], tokenizer=None, vocab_size=1000)
    assert not hub.generators_busy()
    expect(hub, [3])
    expect(hub, [-1], purpose="eval")
    t0 = time.monotonic()
    assert hub.generators_busy()
    assert time.monotonic() - t0 < 0.5  # a poll, not a wait
    lengths = [2, 3]
    gen.send(traj_header(lengths), trajectory_frames(valid_samples(lengths)))
    deadline = time.monotonic() + TIMEOUT_S
    while hub.outstanding and time.monotonic() < deadline:
        hub.generators_busy()
    assert list(hub.buffer)[0].msg.group_id == 3
    assert hub.generators_busy()  # the eval group is still out
    hub.outstanding_eval.clear()
    assert not hub.generators_busy()
