"""What the hub admits and what it asks for (issue 13, bugs 4-6 and the eval preset).

- A group whose log-probs are NaN, infinite or > 0 is rejected (counted, logged, its
  credit freed so admission control asks for another problem), like other malformed groups.
- A group with another number of samples than the request's ``n`` is rejected (it used
  to be admitted and make ``build_batch`` raise).
- In-training evaluation asks for exactly what ``python -m asyncrl.eval`` samples with
  (``eval.top_p``, ``eval.max_tokens``, per-source temperatures, ``eval.preset``), not
  the generator's training settings; a rejected eval group is left out of the scores
  instead of hanging the evaluation.

The generator side is a scripted endpoint: every message goes through the real codec."""

from __future__ import annotations

import logging
from collections import deque

import numpy as np
import pytest

from asyncrl.config import load_config
from asyncrl.eval.sampling import run_eval
from asyncrl.learner.hub import RolloutHub
from asyncrl.generator.engine import Completion
from asyncrl.rewards import RewardPool
from asyncrl.tasks import Problem
from asyncrl.wire.codec import SampleArrays, decode_checked, encode, trajectory_frames
from asyncrl.wire.schema import Prompts, SampleMeta, TrajectoryGroup

PEER = b"gen-0"
OVERRIDES = ["generator.samples_per_prompt=3", "generator.top_p=1.0", "generator.max_tokens=8",
             "generator.temperature=1.0", "transport.timeout_s=5", "learner.prompts_per_step=2"]


class Source:
    def problem(self, index: int) -> Problem:
        return Problem(prompt=f"{index}+1=", ground_truth=str(index + 1), data_source="asyncrl/arith",
                       prompt_ids=(3, 4, 5 + index % 7))


class ScriptedGenerator:
    """The learner's endpoint with a generator behind it: records every request and
    answers it (``answer(group, n)`` -> log-probs per sample, or None to stay silent)."""

    def __init__(self, answer=None) -> None:
        self.requests: list[Prompts] = []
        self.inbox: deque = deque()
        self.answer = answer

    def send(self, peer, msg, frames=()) -> None:
        if not isinstance(msg, Prompts):
            return
        self.requests.append(msg)
        for g in msg.groups:
            lps = self.answer(g, msg.n) if self.answer else [[-0.5] * 4] * msg.n
            if lps is not None:
                self.push(g.group_id, lps, msg.purpose)

    def push(self, group_id: int, logprobs: list[list[float]], purpose: str = "train") -> None:
        """A group with one sample per entry of ``logprobs``, over the wire codec."""
        arrays = [SampleArrays(np.full(len(lp), 7, np.int32), np.asarray(lp, np.float32),
                               np.zeros(len(lp), np.int32)) for lp in logprobs]
        header = TrajectoryGroup(group_id=group_id, worker_id=0, data_source="asyncrl/arith", prompt_ids=[3, 4],
                                 samples=[SampleMeta(len(lp), 1.0, "stop") for lp in logprobs], purpose=purpose)
        self.inbox.append((PEER, *decode_checked(encode(header, trajectory_frames(arrays)))))

    def recv(self, timeout_s: float):
        return self.inbox.popleft() if self.inbox else None


def hub_for(overrides=(), eval_problems=(), answer=None) -> tuple[RolloutHub, ScriptedGenerator]:
    ep = ScriptedGenerator(answer)
    hub = RolloutHub(load_config("quickstart", [*OVERRIDES, *overrides]), ep, Source(), list(eval_problems),
                     tokenizer=None, vocab_size=1000)
    hub.workers = [PEER]
    return hub, ep


def received(hub: RolloutHub) -> None:
    while hub._receive(timeout_s=0):
        pass


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 0.25])
def test_groups_with_nonfinite_or_positive_logprobs_are_rejected(bad, caplog):
    hub, ep = hub_for(answer=lambda g, n: None)  # answers are pushed by hand below
    hub.request(2, min_version=0)
    ep.push(0, [[-0.1, -2.0], [-0.3, bad, -1.0], [0.0]])
    ep.push(1, [[-0.1, -2.0], [-0.3, 0.0], [-5.0]])  # 0 is a log-prob (probability 1)
    with caplog.at_level(logging.WARNING, logger="asyncrl.learner.hub"):
        received(hub)
    assert [g.msg.group_id for g in hub.buffer] == [1]
    assert hub.rejected_groups == 1 and "rejected trajectory group 0" in caplog.text and "log-prob" in caplog.text
    assert hub.in_flight == 0 and 0 not in hub.assigned  # its credit is free: top_up asks for a fresh problem
    hub.top_up(version=0, taken=0)
    assert [g.group_id for g in ep.requests[-1].groups] == [2]


def test_a_group_with_the_wrong_number_of_samples_is_rejected():
    hub, ep = hub_for(answer=lambda g, n: None)
    hub.request(3, min_version=0)
    assert {m.n for m in ep.requests} == {3}
    ep.push(0, [[-0.5]] * 2)  # too few
    ep.push(1, [[-0.5]] * 4)  # too many
    ep.push(2, [[-0.5]] * 3)
    received(hub)
    assert [g.msg.group_id for g in hub.buffer] == [2]
    assert hub.rejected_groups == 2 and hub.in_flight == 0


EVAL_PROBLEMS = [Problem(prompt="", ground_truth="1", data_source=src, prompt_ids=(3, 4, i))
                 for i, src in enumerate(["aime24", "math-ai/aime25", "AMC23", "HuggingFaceH4/MATH-500", "minerva"])]


class RecordingEngine:
    """``run_eval``'s engine: records per data_source (samples, temperature, top_p,
    max_tokens); samples = the problem's episodes in the call (a row each) times ``n``."""

    def __init__(self) -> None:
        self.asked: dict[str, tuple] = {}

    def generate(self, prompts, params, between_steps=None):
        for ids in prompts:
            p = EVAL_PROBLEMS[ids[-1]]
            samples = params.n * sum(list(other) == list(ids) for other in prompts)
            self.asked[p.data_source] = (samples, params.temperature, params.top_p, params.max_tokens)
        return [[Completion([7], [-0.1], [0], "stop")] * params.n for _ in prompts]


def asked_by_hub(hub: RolloutHub, ep: ScriptedGenerator) -> dict[str, tuple]:
    out = {}
    for m in ep.requests:
        for g in m.groups:
            out[EVAL_PROBLEMS[-1 - g.group_id].data_source] = (m.n, m.temperature, m.top_p, m.max_tokens)
    return out


@pytest.mark.parametrize("overrides, want", [
    (["eval.top_p=0.5", "eval.max_tokens=99", "eval.k=2", "eval.temperature=0.8"],
     {"aime24": (2, 0.6, 0.5, 99), "math-ai/aime25": (2, 0.6, 0.5, 99), "AMC23": (2, 0.8, 0.5, 99),
      "HuggingFaceH4/MATH-500": (2, 0.8, 0.5, 99), "minerva": (2, 0.8, 0.5, 99)}),
    (["eval.preset=lpreg_paper", "eval.max_tokens=99"],  # the paper: AIME / AMC at 0.6, the rest greedy, 1 each
     {"aime24": (1, 0.6, 1.0, 99), "math-ai/aime25": (1, 0.6, 1.0, 99), "AMC23": (1, 0.6, 1.0, 99),
      "HuggingFaceH4/MATH-500": (1, 0.0, 1.0, 99), "minerva": (1, 0.0, 1.0, 99)}),
], ids=["eval-settings", "lpreg_paper"])
def test_in_training_eval_samples_as_python_m_asyncrl_eval(overrides, want):
    hub, ep = hub_for(overrides, EVAL_PROBLEMS)
    metrics = hub.evaluate(version=0)
    assert asked_by_hub(hub, ep) == want
    engine = RecordingEngine()
    run_eval(engine, type("Tok", (), {"eos_token_id": 0, "decode": lambda self, ids, **kw: "x"})(), EVAL_PROBLEMS,
             hub.cfg, RewardPool(0))
    assert engine.asked == want  # one sampling path for both
    k = want["aime24"][0]
    assert metrics[f"eval/mean@{k}"] == 1.0 and metrics["eval/rejected_groups"] == 0


def test_a_rejected_eval_group_is_left_out_instead_of_hanging_the_evaluation():
    bad = {-1 - 3}  # MATH-500 answers with a NaN log-prob
    hub, ep = hub_for(["eval.k=2"], EVAL_PROBLEMS,
                      answer=lambda g, n: [[float("nan")]] * n if g.group_id in bad else [[-0.2]] * n)
    metrics = hub.evaluate(version=0)
    assert metrics["eval/rejected_groups"] == 1 and hub.rejected_groups == 1
    assert "eval/HuggingFaceH4/MATH-500/mean@2" not in metrics and metrics["eval/minerva/mean@2"] == 1.0
    assert not hub.outstanding_eval and not hub.eval_buffer
