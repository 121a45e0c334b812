"""A published version's bytes never change after it is labelled (issue 13, bug 3).

On one CPU rank the FSDP2 full state dict is the parameters themselves (the gather and
the CPU offload are no-ops), the ``zmq`` weight frames are views of those tensors and
ZeroMQ sends without copying; the hub also keeps the newest frames to re-send to a
restarted generator. So ``full_state_dict`` must return a snapshot: after publishing
version 1 and taking an optimiser step, the frames sent and the frames stored for v1
still hold v1's bytes."""

from __future__ import annotations

import torch
import pytest

from asyncrl.config import load_config
from asyncrl.learner.checkpoint import full_state_dict
from asyncrl.learner.hub import RolloutHub
from asyncrl.learner.main import build_policy, publishable

from testkit import one_gloo_rank


one_rank = pytest.fixture(scope="module")(one_gloo_rank)


class RecordingEndpoint:
    """Stands in for the learner's ZeroMQ endpoint: keeps what was sent, uncopied
    (as zmq.send(copy=False) does)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, object, list]] = []

    def send(self, peer, msg, frames=()) -> None:
        self.sent.append((peer, msg, list(frames)))


def as_bytes(frames) -> list[bytes]:
    return [bytes(memoryview(f)) for f in frames]


def test_published_frames_survive_the_next_optimiser_step(one_rank, tiny_model_dir):
    cfg = load_config("quickstart", [f"model.path={tiny_model_dir}", "learner.world_size=1"])
    policy, opt = build_policy(cfg, torch.device("cpu"))
    ep = RecordingEndpoint()
    hub = RolloutHub(cfg, ep, source=None, eval_problems=[], tokenizer=None)
    hub.workers = [b"gen-0"]

    state = full_state_dict(policy)
    v1 = {k: v.clone() for k, v in state.items()}
    hub.publish(publishable(state, policy), 1)
    (_, notice, sent), = ep.sent
    stored = hub.weights[1]  # what a restarted generator is sent
    before = as_bytes(sent)
    assert as_bytes(stored) == before

    for p in policy.parameters():  # any step that moves every weight
        p.grad = torch.ones_like(p)
    opt.step()
    moved = full_state_dict(policy)
    assert all(not torch.equal(moved[k], v1[k]) for k in v1), "the optimiser step left a weight unchanged"

    # what any transport may keep to serve later (a bucketed server casts when asked)
    assert all(torch.equal(state[k], v1[k]) for k in v1), "the published state dict changed after opt.step()"
    assert as_bytes(sent) == before, "frames in flight for v1 changed after opt.step()"
    assert as_bytes(hub.weights[1]) == before, "frames stored for re-sending v1 changed after opt.step()"
    assert notice.version == 1
