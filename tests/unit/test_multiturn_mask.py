"""The per-token model mask of multi-turn trajectories (issue 18), from the wire to the batch.

A response interleaves model turns and environment observations (tool output). The
mask travels as a fourth array frame; an environment token is context only: log-prob
0.0, version -1, never a target. Checked here:

- the codec round-trips the mask (``None`` on the sending side = all model tokens, an
  array always on the receiving side) and rejects each inconsistency with a WireError;
- ``build_batch`` puts environment tokens in ``input_ids`` and nowhere else (exact
  tensors);
- the hub measures staleness and throughput on model tokens only (an observation's
  version -1 does not make a group "infinitely stale"), and a live learner endpoint
  rejects and counts groups whose environment tokens claim a version or a log-prob.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import pytest
import torch
import zmq

from asyncrl.config import load_config
from asyncrl.kernels import IGNORE_INDEX
from asyncrl.learner.batch import build_batch, load_batch, save_batch
from asyncrl.learner.hub import Group, RolloutHub
from asyncrl.tasks import Problem
from asyncrl.wire.codec import SampleArrays, WireError, decode_checked, encode, trajectory_arrays, trajectory_frames
from asyncrl.wire.schema import PROTOCOL_VERSION, Hello, Prompts, SampleMeta, TrajectoryGroup
from asyncrl.wire.transport import GeneratorEndpoint, LearnerEndpoint

I = IGNORE_INDEX  # noqa: E741
PROMPT = [3, 4, 5]


def multi_turn() -> SampleArrays:
    """model [10, 11] | tool output [20, 21, 22] | model [12, 13] | tool output [23]."""
    return SampleArrays(np.array([10, 11, 20, 21, 22, 12, 13, 23], np.int32),
                        np.array([-0.1, -0.2, 0, 0, 0, -0.3, -0.4, 0], np.float32),
                        np.array([2, 2, -1, -1, -1, 3, 3, -1], np.int32),
                        np.array([1, 1, 0, 0, 0, 1, 1, 0], np.uint8))


def single_turn() -> SampleArrays:
    return SampleArrays(np.array([30, 31], np.int32), np.array([-1.0, -2.0], np.float32), np.array([1, 1], np.int32))


def header(samples: list[SampleArrays], group_id: int = 0, purpose: str = "train") -> TrajectoryGroup:
    return TrajectoryGroup(group_id=group_id, worker_id=0, data_source="tools", prompt_ids=PROMPT, purpose=purpose,
                           samples=[SampleMeta(len(s.token_ids), float(i == 0), "stop") for i, s in enumerate(samples)])


def wire(samples: list[SampleArrays], group_id: int = 0) -> list:
    return encode(header(samples, group_id), trajectory_frames(samples))


# ------------------------------------------------------------------ codec


def test_a_peer_without_the_mask_frame_is_refused_at_its_hello():
    """Protocol 1 had three trajectory frames: such a peer fails at its first message,
    not on every trajectory it sends."""
    assert PROTOCOL_VERSION > 1
    with pytest.raises(WireError, match="protocol version 1") as e:
        decode_checked(encode(Hello(worker_id=0, version=0, proto=1)))
    assert e.value.reason == "version"


def test_round_trip_with_and_without_a_mask():
    sent = [multi_turn(), single_turn(), SampleArrays(*(np.zeros(0, d) for d in ("i4", "f4", "i4")))]
    msg, frames = decode_checked(wire(sent))
    assert len(frames) == 4 and len(frames[3]) == 10  # one byte per token
    got = trajectory_arrays(msg, frames)
    for a, b in zip(sent, got):
        assert b.mask is not None and b.mask.dtype == np.uint8  # always materialised on receipt
        want = np.ones(len(a.token_ids), np.uint8) if a.mask is None else a.mask
        np.testing.assert_array_equal(b.mask, want)
        for f in ("token_ids", "logprobs", "versions"):
            assert getattr(a, f).tobytes() == getattr(b, f).tobytes()
        np.testing.assert_array_equal(b.model_mask(), want.astype(bool))
    assert single_turn().model_mask().all()


def _frames_with(**change) -> list:
    s = multi_turn()
    for name, (i, value) in change.items():
        getattr(s, name)[i] = value
    return [header([s, single_turn()]), trajectory_frames([s, single_turn()])]


@pytest.mark.parametrize("change, match", [
    ({"mask": (3, 2)}, "mask value 2"),
    ({"mask": (0, 255)}, "mask value 255"),
    ({"versions": (2, 0)}, "environment token with a policy version"),  # an observation claims a version
    ({"versions": (7, 5)}, "environment token with a policy version"),  # the trailing one
    ({"versions": (4, -2)}, "environment token with a policy version"),
    ({"logprobs": (3, -0.7)}, "environment token with a sampled log-prob"),
    ({"logprobs": (7, float("nan"))}, "environment token with a sampled log-prob"),
    ({"versions": (5, -1)}, "negative policy version on a model token"),  # a model token without one
    ({"mask": (5, 0), "logprobs": (5, 0.0), "versions": (5, -1)}, None),  # consistent: a valid observation
], ids=["value2", "value255", "env-version0", "env-version-last", "env-version-2", "env-logprob", "env-nan",
        "model-no-version", "consistent"])
def test_mask_inconsistencies_are_wire_errors(change, match):
    head, frames = _frames_with(**change)
    if match is None:
        assert trajectory_arrays(head, frames)[0].mask[5] == 0
        return
    with pytest.raises(WireError, match=match) as e:
        trajectory_arrays(head, frames)
    assert e.value.reason == "values"
    with pytest.raises(WireError):  # and what a receiver calls
        decode_checked(encode(head, frames))


def test_a_response_must_start_with_a_model_token():
    env_first = SampleArrays(np.array([20, 10], np.int32), np.array([0, -0.5], np.float32),
                             np.array([-1, 0], np.int32), np.array([0, 1], np.uint8))
    for samples in ([env_first], [single_turn(), env_first], [multi_turn(), env_first, single_turn()]):
        with pytest.raises(WireError, match="starts with an environment token"):
            decode_checked(wire(samples))
    only_env = SampleArrays(np.array([20], np.int32), np.zeros(1, np.float32), np.full(1, -1, np.int32),
                            np.zeros(1, np.uint8))
    with pytest.raises(WireError, match="starts with an environment token"):  # no model token at all
        decode_checked(wire([single_turn(), only_env]))


def test_mask_frame_size_and_count():
    head, frames = header([multi_turn()]), trajectory_frames([multi_turn()])
    for bad in ([*frames[:3], frames[3] + b"\x01"], [*frames[:3], frames[3][:-1]],
                [*frames[:3], frames[3] * 4]):  # 4 bytes per token (an int32 mask) is not the layout
        with pytest.raises(WireError, match="header declares 8 x 1"):
            trajectory_arrays(head, bad)
    with pytest.raises(WireError, match="4 array frames"):
        trajectory_arrays(head, frames[:3])


# ------------------------------------------------------------------ build_batch


def group_of(samples: list[SampleArrays], group_id: int = 0) -> Group:
    msg, frames = decode_checked(wire(samples, group_id))
    return Group(msg, trajectory_arrays(msg, frames))


def test_build_batch_keeps_environment_tokens_as_context_only(tmp_path):
    batch = build_batch([group_of([multi_turn(), single_turn()])], pad_id=0, scale_advantages=False)
    # sequence 3 4 5 | 10 11 (20 21 22) 12 13 (23): position t predicts token t + 1
    torch.testing.assert_close(batch.input_ids, torch.tensor([[3, 4, 5, 10, 11, 20, 21, 22, 12, 13],
                                                              [3, 4, 5, 30, 0, 0, 0, 0, 0, 0]]))
    torch.testing.assert_close(batch.targets, torch.tensor([[I, I, 10, 11, I, I, I, 12, 13, I],
                                                            [I, I, 30, 31, I, I, I, I, I, I]]))
    torch.testing.assert_close(batch.behaviour_logprobs, torch.tensor(
        [[0, 0, -0.1, -0.2, 0, 0, 0, -0.3, -0.4, 0], [0, 0, -1.0, -2.0, 0, 0, 0, 0, 0, 0]]), rtol=0, atol=0)
    torch.testing.assert_close(batch.versions, torch.tensor([[-1, -1, 2, 2, -1, -1, -1, 3, 3, -1],
                                                             [-1, -1, 1, 1, -1, -1, -1, -1, -1, -1]]))
    assert batch.mask.sum(-1).tolist() == [4, 2]  # model tokens: what train/response_length counts
    torch.testing.assert_close(batch.advantages, torch.tensor([0.5, -0.5]))
    save_batch(batch, tmp_path / "b.safetensors")  # debug.record_batches keeps working
    back = load_batch(tmp_path / "b.safetensors")
    assert all(torch.equal(getattr(batch, f), getattr(back, f)) for f in ("input_ids", "targets", "versions"))


def test_build_batch_masks_locally_built_samples_too():
    """A SampleArrays built in-process (no wire check) whose observation tokens carry a
    log-prob and a version: the mask decides, the stray values never reach the batch."""
    s = multi_turn()
    s.logprobs[2:5], s.versions[2:5] = -9.0, 7
    batch = build_batch([Group(header([s]), [s])], pad_id=0, scale_advantages=False)
    assert batch.targets[0, 4:7].eq(I).all() and batch.behaviour_logprobs[0, 4:7].eq(0).all()
    assert batch.versions[0, 4:7].eq(-1).all()


# ------------------------------------------------------------------ hub


class Source:
    def problem(self, index: int) -> Problem:
        return Problem(prompt="", ground_truth="1", data_source="tools", prompt_ids=tuple(PROMPT))


class Scripted:
    """A learner endpoint whose generator answers by hand, through the real codec."""

    def __init__(self) -> None:
        self.inbox: deque = deque()

    def send(self, peer, msg, frames=()) -> None:
        pass

    def push(self, samples: list[SampleArrays], group_id: int) -> None:
        self.inbox.append((b"gen-0", *decode_checked(wire(samples, group_id))))

    def recv(self, timeout_s: float):
        return self.inbox.popleft() if self.inbox else None


def with_versions(s: SampleArrays, *model_versions: int) -> SampleArrays:
    v = np.full(len(s.token_ids), -1, np.int32)
    v[s.model_mask()] = model_versions
    return SampleArrays(s.token_ids, s.logprobs, v, s.mask)


def test_staleness_and_throughput_count_model_tokens_only():
    cfg = load_config("quickstart", ["generator.samples_per_prompt=2", "learner.prompts_per_step=1",
                                     "learner.max_staleness=1", "transport.timeout_s=5"])
    ep = Scripted()
    hub = RolloutHub(cfg, ep, Source(), [], tokenizer=None, vocab_size=100)
    hub.workers, hub.version = [b"gen-0"], 5
    hub.request(3, min_version=0)
    fresh = [with_versions(multi_turn(), 4, 4, 5, 5), with_versions(single_turn(), 5, 5)]
    stale = [with_versions(multi_turn(), 3, 4, 4, 4), with_versions(single_turn(), 5, 5)]
    ep.push(fresh, 0)
    ep.push(stale, 1)  # a model token of version 3: too stale at version 5 with max_staleness 1
    ep.push(fresh, 2)
    assert group_of(fresh).oldest_version == 4  # not -1: observations were not sampled by any policy
    assert group_of(fresh).model_tokens == 6 and group_of(fresh).env_tokens == 4
    got = hub.next_batch(version=5)
    assert got is not None
    batch, stats = got
    assert [g.msg.group_id for g in batch] == [0] and stats["async/dropped_groups"] == 0
    assert stats["train/env_tokens"] == 2.0  # 4 observation tokens over 2 samples
    assert hub.rejected_groups == 0
    assert hub.tokens_received == 6  # generated tokens: one group so far, not its 10 response tokens
    got = hub.next_batch(version=5)
    assert [g.msg.group_id for g in got[0]] == [2] and got[1]["async/dropped_groups"] == 1
    assert hub.tokens_received == 18


def test_logprob_check_looks_at_model_tokens():
    """The hub's log-prob check (finite, <= 0) passes observation tokens' 0.0 and still
    rejects a bad model log-prob in a multi-turn sample."""
    cfg = load_config("quickstart", ["generator.samples_per_prompt=2", "transport.timeout_s=5"])
    ep = Scripted()
    hub = RolloutHub(cfg, ep, Source(), [], tokenizer=None, vocab_size=100)
    hub.workers = [b"gen-0"]
    hub.request(2, min_version=0)
    bad = multi_turn()
    bad.logprobs[6] = 0.5
    ep.push([with_versions(multi_turn(), 0, 0, 0, 0), with_versions(single_turn(), 0, 0)], 0)
    ep.push([with_versions(bad, 0, 0, 0, 0), with_versions(single_turn(), 0, 0)], 1)
    while hub._receive(timeout_s=0):
        pass
    assert [g.msg.group_id for g in hub.buffer] == [0] and hub.rejected_groups == 1


def test_live_learner_endpoint_rejects_inconsistent_masks():
    """Real sockets on 127.0.0.1: the hub behind a LearnerEndpoint never sees a group whose
    observation tokens claim a version or a log-prob, or that starts with one; each is
    counted, and the valid multi-turn group after them arrives intact."""
    ctx = zmq.Context()
    learner = LearnerEndpoint("127.0.0.1", 0, ctx=ctx)
    gen = GeneratorEndpoint(learner.address, worker_id=0, ctx=ctx)
    try:
        cfg = load_config("quickstart", ["generator.samples_per_prompt=2", "transport.timeout_s=5"])
        hub = RolloutHub(cfg, learner, Source(), [], tokenizer=None, vocab_size=100)
        hub.version = 9
        msg = Prompts(groups=[], min_version=0, n=2, temperature=1.0, top_p=1.0, max_tokens=8)
        hub.outstanding.add(0)
        hub.assigned[0] = (b"gen-0", msg)
        bad = []
        for name, i, value in (("versions", 3, 4), ("logprobs", 2, -0.25), ("mask", 1, 3), ("mask", 0, 0)):
            s = multi_turn()
            getattr(s, name)[i] = value
            bad.append(s)
        for s in bad:
            gen.send(header([s, single_turn()]), trajectory_frames([s, single_turn()]))
        gen.send(header([multi_turn(), single_turn()]), trajectory_frames([multi_turn(), single_turn()]))
        assert hub._wait_for(hub.buffer, 1)
        group = hub.buffer.popleft()
        np.testing.assert_array_equal(group.samples[0].mask, multi_turn().mask)
        assert group.oldest_version == 1 and learner.rejected == 4 and learner.rejected_by["values"] == 4
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            hub._receive(timeout_s=0.1)
        assert not hub.buffer and hub.rejected_groups == 0  # nothing else came through
    finally:
        gen.close()
        learner.close()
        ctx.term()


def test_checkpointed_buffer_keeps_the_mask():
    """A resumable checkpoint stores buffered groups wire-encoded (HubState.buffer): the
    mask frame comes back, and with it the model-token staleness."""
    cfg = load_config("quickstart", ["generator.samples_per_prompt=2"])
    hub = RolloutHub(cfg, Scripted(), Source(), [], tokenizer=None, vocab_size=100)
    hub.workers = [b"gen-0"]
    hub.buffer.append(group_of([multi_turn(), single_turn()], group_id=4))
    st = hub.snapshot()
    back = RolloutHub(cfg, Scripted(), Source(), [], tokenizer=None, vocab_size=100)
    back.workers = [b"gen-0"]
    back.restore(st)
    (g,) = back.buffer
    np.testing.assert_array_equal(g.samples[0].mask, multi_turn().mask)
    assert g.samples[1].mask.all() and g.oldest_version == 1 and g.env_tokens == 4


def test_a_batch_is_in_group_id_order_whatever_the_arrival_order():
    """Two generators answer in either order: the learner trains the same batch (the same
    micro-batches, so the same float rounding) either way."""
    cfg = load_config("quickstart", ["generator.samples_per_prompt=2", "learner.prompts_per_step=3",
                                     "transport.timeout_s=5"])
    ep = Scripted()
    hub = RolloutHub(cfg, ep, Source(), [], tokenizer=None, vocab_size=100)
    hub.workers, hub.version = [b"gen-0"], 5
    hub.request(3, min_version=0)
    fresh = [with_versions(single_turn(), 5, 5), with_versions(single_turn(), 5, 5)]
    for group_id in (2, 0, 1):
        ep.push(fresh, group_id)
    batch, _ = hub.next_batch(version=5)
    assert [g.msg.group_id for g in batch] == [0, 1, 2]
