"""Wire fuzzing: tens of thousands of seeded random and mutated messages, first straight
through the codec, then through real sockets into a live LearnerEndpoint and a live
GeneratorEndpoint. Every invalid message must be rejected and counted (exactly), every
valid one accepted unchanged, and nothing may raise anything but WireError."""

from __future__ import annotations

import logging
import time
from collections import Counter

import msgspec
import numpy as np
import pytest
import torch
import zmq

from asyncrl.wire.codec import (
    Limits, WireError, decode, decode_checked, encode, trajectory_arrays, weight_frames, weight_tensors,
)
from asyncrl.wire.fuzz import Case, bit_flips, cases, fuzz_limits
from asyncrl.wire.schema import DOWNSTREAM, UPSTREAM, Hello, Shutdown, TensorMeta, TrajectoryGroup, WeightUpdate
from asyncrl.wire.transport import GeneratorEndpoint, LearnerEndpoint, RateLimitedLog

log = logging.getLogger(__name__)
TIMEOUT_S = 10.0
SIDES = {"learner": UPSTREAM, "generator": DOWNSTREAM}
N_CODEC, N_FLIPS, N_SOCKET = 15_000, 10_000, 12_000  # per side; benchmarks/wire_fuzz.py runs more


# ------------------------------------------------------------------ codec, no sockets


@pytest.mark.parametrize("side", SIDES)
def test_codec_rejects_every_invalid_case_and_accepts_every_valid_one(side):
    kinds, n = SIDES[side], N_CODEC
    limits = fuzz_limits(kinds)
    labels, reasons = Counter(), Counter()
    for c in cases(seed=1, kinds=kinds, limits=limits, n=n):
        labels[c.label.split("/")[0]] += 1
        if c.valid:
            msg, _ = decode_checked(c.frames, limits)
            assert msg == c.msg
            continue
        with pytest.raises(WireError) as e:
            decode_checked(c.frames, limits)
        reasons[e.value.reason] += 1
    log.info("codec fuzz (%s): %d cases, %d valid; rejected by reason %s; mutations %s",
             side, n, labels["valid"], dict(reasons), dict(labels))
    assert sum(reasons.values()) == n - labels["valid"] and labels["valid"] > n // 20
    assert len(labels) >= 15  # every mutation family was drawn


@pytest.mark.parametrize("side", SIDES)
def test_codec_bit_flips_raise_only_wire_errors(side):
    """Random corruption of valid messages: either a WireError or a message whose arrays
    the learner / engine can consume without another failure mode."""
    kinds = SIDES[side]
    limits = Limits(kinds=kinds)
    outcome = Counter()
    for frames in bit_flips(seed=2, kinds=kinds, n=N_FLIPS):
        try:
            msg, rest = decode_checked(frames, limits)
        except WireError as e:
            outcome[e.reason] += 1
            continue
        outcome["accepted"] += 1
        if isinstance(msg, TrajectoryGroup):
            arrays = trajectory_arrays(msg, rest)
            assert [len(a.token_ids) for a in arrays] == [s.num_tokens for s in msg.samples]
            for a in arrays:  # a model token has a version, an environment token none and no log-prob
                model = a.mask == 1
                assert set(np.unique(a.mask)) <= {0, 1} and (not len(a.mask) or model[0])
                assert (a.versions[model] >= 0).all() and (a.versions[~model] == -1).all()
                assert (a.logprobs[~model] == 0).all()
        elif isinstance(msg, WeightUpdate):
            for (name, t), meta in zip(weight_tensors(msg, rest), msg.tensors, strict=True):
                assert name == meta.name and list(t.shape) == meta.shape
    log.info("bit-flip fuzz (%s): %s", side, dict(outcome))
    assert outcome["accepted"] > 0 and sum(outcome.values()) == N_FLIPS


@pytest.mark.parametrize("dtype", ["Tensor", "__class__", "FloatTensor", "float", "complex64", "torch.float32", "",
                                   "qint8", "device"])
def test_dtype_whitelist_rejects_torch_attribute_names(dtype):
    msg = WeightUpdate(version=1, tensors=[TensorMeta("w", dtype, [1])])  # built in-process: no schema check
    with pytest.raises(WireError, match="unknown dtype"):
        weight_tensors(msg, [b"\0\0\0\0"])
    with pytest.raises(WireError):  # and from the wire it never gets past the schema
        decode_checked(encode(msg, [b"\0\0\0\0"]))


def test_numel_overflow_and_absurd_shapes_are_rejected():
    # int64 product of [2**31, 2**33] wraps to 0, which an empty frame would "match"
    for shape in ([2**31, 2**33], [2**40, 2**40, 0], [1] * 9):
        msg = WeightUpdate(version=1, tensors=[TensorMeta("w", "float32", shape)])
        with pytest.raises(WireError):
            weight_tensors(msg, [b""])
        with pytest.raises(WireError):
            decode_checked(encode(msg, [b""]))


def test_invalid_utf8_is_a_wire_error():
    """msgspec raises UnicodeDecodeError (not DecodeError) for a bad str: it must not escape."""
    head = msgspec.msgpack.encode({"kind": "shutdown", "reason": "abcd"}).replace(b"abcd", b"\xff\xfe\xfd\xfc")
    with pytest.raises(WireError, match="undecodable"):
        decode([head])


def test_limits_and_direction():
    hello = encode(Hello(worker_id=1, version=2))
    with pytest.raises(WireError, match="exceeds"):
        decode_checked(hello + [bytes(100)] * 2, Limits(max_message_bytes=150))
    with pytest.raises(WireError, match="frames exceed"):
        decode_checked(hello + [b""] * 4, Limits(max_frames=4))
    with pytest.raises(WireError, match="not accepted"):
        decode_checked(encode(Shutdown()), Limits(kinds=UPSTREAM))
    with pytest.raises(WireError, match="carries no array frames"):
        decode_checked(hello + [b"x"])
    msg, frames = weight_frames([("w", torch.ones(2))], version=3)
    assert decode_checked(encode(msg, frames), Limits(kinds=DOWNSTREAM))[0] == msg


def test_reject_log_is_rate_limited(caplog):
    rl = RateLimitedLog(burst=3, interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="asyncrl.wire.transport"):
        logged = sum(rl.warning("schema", "bad\nforged log line " * 100) for _ in range(10_000))
    assert logged == 3 and len(caplog.records) == 3
    assert all("\n" not in r.getMessage() and len(r.getMessage()) < 400 for r in caplog.records)


# ------------------------------------------------------------------ live endpoints


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def _with_sentinels(all_cases: list[Case], sentinel, size: int = 200) -> list[Case]:
    """Every ``size`` cases end with a valid message: the receiver returns it only after
    it has consumed (and rejected) every invalid message before it on the connection,
    and the sender never runs far enough ahead to block on the high-water mark."""
    out = []
    for i in range(0, len(all_cases), size):
        chunk = all_cases[i : i + size]
        if not chunk[-1].valid:
            m = sentinel(i)
            chunk.append(Case("sentinel", encode(m), True, m))
        out += chunk
    return out


def _run_fuzz(cases_list, send, recv, endpoint, side):
    t0 = time.monotonic()
    invalid = valid = 0
    for i in range(0, len(cases_list), 100):
        chunk = cases_list[i : i + 100]
        for c in chunk:
            send(c.frames)
        for c in chunk:
            invalid += not c.valid
            if c.valid:
                valid += 1
                got = recv()
                assert got is not None, f"valid {type(c.msg).__name__} not received after {invalid} invalid"
                msg, frames = got
                assert msg == c.msg and [bytes(f) for f in frames] == [bytes(f) for f in c.frames[1:]]
                assert endpoint.rejected == invalid  # exactly the invalid ones so far
    log.info("socket fuzz (%s): %d invalid rejected, %d valid accepted in %.1fs; by reason %s",
             side, invalid, valid, time.monotonic() - t0, dict(endpoint.rejected_by))
    assert endpoint.rejected == invalid and sum(endpoint.rejected_by.values()) == invalid
    assert "internal" not in endpoint.rejected_by
    return invalid


def test_live_learner_endpoint_survives_fuzz(ctx):
    limits = fuzz_limits(UPSTREAM)
    learner = LearnerEndpoint("127.0.0.1", 0, ctx=ctx, limits=limits)
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.IDENTITY, b"fuzzer")
    peer.connect(learner.address)
    try:
        all_cases = _with_sentinels(list(cases(seed=3, kinds=UPSTREAM, limits=limits, n=N_SOCKET)),
                                    lambda i: Hello(worker_id=1, version=i))

        def recv():
            got = learner.recv(timeout_s=TIMEOUT_S)
            return None if got is None else got[1:]

        invalid = _run_fuzz(all_cases, peer.send_multipart, recv, learner, "learner")
        assert invalid > N_SOCKET * 0.85
        peer.send_multipart(encode(Hello(worker_id=9, version=9)))  # and it still serves
        assert learner.recv(timeout_s=TIMEOUT_S)[1] == Hello(worker_id=9, version=9)
    finally:
        peer.close(linger=0)
        learner.close()


def test_live_generator_endpoint_survives_fuzz(ctx):
    limits = fuzz_limits(DOWNSTREAM)
    router = LearnerEndpoint("127.0.0.1", 0, ctx=ctx)  # the sending side: raw frames to the generator
    gen = GeneratorEndpoint(router.address, worker_id=4, ctx=ctx, limits=limits)
    try:
        gen.sock.send_multipart(encode(Hello(worker_id=4, version=0)))
        peer = router.recv(timeout_s=TIMEOUT_S)[0]
        all_cases = _with_sentinels(list(cases(seed=4, kinds=DOWNSTREAM, limits=limits, n=N_SOCKET)),
                                    lambda i: Shutdown(reason=f"sentinel {i}"))
        invalid = _run_fuzz(all_cases, lambda frames: router.sock.send_multipart([peer, *frames]),
                            lambda: gen.recv(timeout_s=TIMEOUT_S), gen, "generator")
        assert invalid > N_SOCKET * 0.85
    finally:
        gen.close()
        router.close()


def test_libzmq_drops_a_frame_over_maxmsgsize_before_delivery(ctx):
    """A frame over the limit never reaches Python (libzmq drops it and the connection);
    the endpoint keeps serving once the peer reconnects."""
    learner = LearnerEndpoint("127.0.0.1", 0, ctx=ctx, limits=Limits(max_message_bytes=64 << 10))
    gen = GeneratorEndpoint(learner.address, worker_id=1, ctx=ctx)
    try:
        gen.sock.send_multipart([encode(Hello(worker_id=1, version=0))[0], bytes(1 << 20)])
        assert learner.recv(timeout_s=1.0) is None and learner.rejected == 0
        deadline = time.monotonic() + TIMEOUT_S
        got = None
        while got is None and time.monotonic() < deadline:  # messages queued on the dropped link are lost
            gen.send(Hello(worker_id=1, version=1))
            got = learner.recv(timeout_s=0.5)
        assert got is not None and got[1] == Hello(worker_id=1, version=1)
    finally:
        gen.close()
        learner.close()
