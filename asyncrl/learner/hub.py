"""Rank 0's link to the generator workers: hand out prompt groups, collect trajectory
groups, publish weights. Admission control and the staleness bound live here
(``top_up`` and ``next_batch``).

Generator restarts: the hub remembers which worker was sent which group. When a worker
it already knows says Hello again (launch restarted its process), it is sent the newest
weights and then its still-outstanding prompts again, with the same group ids; the
outstanding-set check makes sure each group is trained on at most once."""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import numpy as np
import torch
import zmq

from asyncrl.config import Config
from asyncrl.data import PromptSource
from asyncrl.eval.sampling import Sampling, hub_metrics, prompt_ids, samples_per_problem
from asyncrl.eval.sampling import plan as eval_plan
from asyncrl.tasks import Problem
from asyncrl.learner.state import HubState
from asyncrl.wire.codec import SampleArrays, decode_checked, encode, trajectory_arrays, trajectory_frames
from asyncrl.wire.schema import Hello, PromptGroup, Prompts, Shutdown, TrajectoryGroup
from asyncrl.wire.transport import LearnerEndpoint
from asyncrl.wire.weights import WeightSender, ZmqWeights

log = logging.getLogger(__name__)


@dataclass
class Group:
    """A received prompt group with its decoded sample arrays."""

    msg: TrajectoryGroup
    samples: list[SampleArrays]

    @property
    def oldest_version(self) -> int:
        """The oldest policy version that sampled one of its tokens (model tokens only:
        an environment token's version is -1, it was not sampled)."""
        return min(int(s.versions[s.model_mask()].min()) for s in self.samples if s.model_mask().any())

    @property
    def model_tokens(self) -> int:
        """Tokens the model sampled, over all samples (environment tokens are not)."""
        return sum(int(s.model_mask().sum()) for s in self.samples)

    @property
    def env_tokens(self) -> int:
        """Environment (observation) tokens over all samples: context, never trained on."""
        return sum(len(s.token_ids) for s in self.samples) - self.model_tokens


class RolloutHub:
    def __init__(self, cfg: Config, endpoint: LearnerEndpoint, source: PromptSource, eval_problems: list[Problem],
                 tokenizer, stop: Callable[[], bool] = lambda: False, vocab_size: int = 2**31 - 1) -> None:
        self.cfg, self.ep, self.source, self.tok, self.stop = cfg, endpoint, source, tokenizer, stop
        self.eval_problems = eval_problems
        self.vocab_size = vocab_size
        self.weight_sender: WeightSender = ZmqWeights()  # transport.weights (learner main sets it)
        self.workers: list[bytes] = []
        self.next_worker = 0
        self.train_index = 0  # data position: the next training problem
        self.outstanding: set[int] = set()  # training group ids requested, not yet received
        self.outstanding_eval: set[int] = set()
        self.rejected_groups = 0
        self.version = 0  # the newest weights published
        self.buffer: deque[Group] = deque()  # received training groups, oldest first
        self.eval_buffer: deque[Group] = deque()
        self.dropped_total = 0
        self.gen_busy_s: dict[int, float] = {}  # worker id -> cumulative generation seconds
        self.last_gen_busy = 0.0
        self.tokens_received = 0  # response tokens of training groups, for generator throughput
        self.last_tokens_received = 0
        self.assigned: dict[int, tuple[bytes, Prompts]] = {}  # outstanding group id -> (worker, message it was in)
        self.weights: tuple | None = None  # the newest WeightUpdate and its frames, for restarted workers
        self.restarts = 0  # generators that said Hello again (restarted processes)

    def wait_for_workers(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.workers) < self.cfg.generator.num_workers:
            got = self.ep.recv(timeout_s=max(0.0, deadline - time.monotonic()))
            if got is None:
                raise TimeoutError(
                    f"only {len(self.workers)}/{self.cfg.generator.num_workers} generators said hello "
                    f"within {timeout_s:.0f}s; see the generator logs in {self.cfg.run.dir}/logs"
                )
            peer, msg, _ = got
            if isinstance(msg, Hello):
                self._hello(peer, msg)

    def _hello(self, peer: bytes, msg: Hello) -> None:
        if peer not in self.workers:
            self.workers.append(peer)
            log.info("generator %d connected (version %d)", msg.worker_id, msg.version)
            return
        # a restarted worker: newest weights first, then the prompts it had in flight
        self.restarts += 1
        if self.weights is not None:
            self._send_to(peer, *self.weights)
        resend: dict[int, Prompts] = {}
        for gid, (w, prompts) in self.assigned.items():
            if w == peer:
                resend.setdefault(id(prompts), prompts)
        pending = self.outstanding | self.outstanding_eval
        groups = 0
        for prompts in resend.values():
            part = [g for g in prompts.groups if g.group_id in pending]
            groups += len(part)
            self._send_to(peer, msgspec.structs.replace(prompts, groups=part))
        log.warning("generator %d restarted (%d restart(s) so far): re-issued its %d outstanding group(s)",
                    msg.worker_id, self.restarts, groups)

    def _send_to(self, peer: bytes, msg, frames=()) -> None:
        """Send, tolerating a worker that is gone: when launch restarts it, its Hello makes
        us send it what it missed."""
        try:
            self.ep.send(peer, msg, frames)
        except zmq.ZMQError as e:
            log.warning("could not send %s to %r (%s); it is re-sent if the worker restarts",
                        type(msg).__name__, peer, e)

    def _groups(self, problems) -> list[PromptGroup]:
        return [
            PromptGroup(group_id=gid, prompt_ids=prompt_ids(p, self.tok), ground_truth=p.ground_truth,
                        data_source=p.data_source)
            for gid, p in problems
        ]

    def train_sampling(self) -> Sampling:
        """How training prompts are sampled (``generator.*``; evaluation: ``eval_plan``)."""
        g = self.cfg.generator
        return Sampling(n=g.samples_per_prompt, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens)

    def request(self, num_groups: int, min_version: int) -> None:
        """Send the next ``num_groups`` training prompts, spread over the workers."""
        problems = []
        for _ in range(num_groups):
            problems.append((self.train_index, self.source.problem(self.train_index)))
            self.train_index += 1
        self._send(self._groups(problems), min_version, self.train_sampling(), "train")
        self.outstanding.update(gid for gid, _ in problems)

    def _send(self, groups: list[PromptGroup], min_version: int, s: Sampling, purpose: str) -> None:
        W = len(self.workers)
        for w in range(W):  # contiguous chunks keep each worker's batch large
            part = groups[w * len(groups) // W : (w + 1) * len(groups) // W]
            if part:
                msg = Prompts(groups=part, min_version=min_version, n=s.n, temperature=s.temperature,
                              top_p=s.top_p, max_tokens=s.max_tokens, purpose=purpose)
                peer = self.workers[(self.next_worker + w) % W]
                self.assigned.update((pg.group_id, (peer, msg)) for pg in part)
                self._send_to(peer, msg)
        self.next_worker = (self.next_worker + 1) % W

    def _receive(self, timeout_s: float) -> bool:
        """File one arriving group into its buffer; False if nothing came in time.

        The endpoint has checked the message's form; here its content is checked against
        what was asked: a group id that is not outstanding (unknown or a duplicate), a
        token id outside the vocabulary or a version newer than the learner's is
        rejected, counted and logged, never trained on."""
        got = self.ep.recv(timeout_s=timeout_s)
        if got is None:
            return False
        peer, msg, frames = got
        if isinstance(msg, Hello):
            self._hello(peer, msg)
            return True
        if not isinstance(msg, TrajectoryGroup):
            log.warning("unexpected %s message from a generator; dropped", type(msg).__name__)
            return True
        group = Group(msg, trajectory_arrays(msg, frames))
        problem = self._check(group)
        if problem:
            self.rejected_groups += 1
            log.warning("rejected trajectory group %d from worker %d: %s (%d so far)", msg.group_id, msg.worker_id,
                        problem, self.rejected_groups)
            pending = self.outstanding if msg.purpose == "train" else self.outstanding_eval
            if msg.group_id in pending:  # a bad answer to a real request: not waited for again; top_up asks
                pending.remove(msg.group_id)  # for a fresh training problem, evaluate leaves this one out
                self.assigned.pop(msg.group_id, None)
            return True
        self.assigned.pop(msg.group_id, None)
        if msg.purpose == "train":
            self.outstanding.remove(msg.group_id)
            self.buffer.append(group)
            self.gen_busy_s[msg.worker_id] = msg.busy_total_s
            self.tokens_received += group.model_tokens  # generated: environment tokens were not
        else:
            self.outstanding_eval.remove(msg.group_id)
            self.eval_buffer.append(group)
        return True

    def _check(self, group: Group) -> str:
        """Why the group cannot be trained on or scored ("" if it can). Every outstanding
        group id has the request it was sent in (``assigned``), hence its ``n``."""
        msg = group.msg
        pending = self.outstanding if msg.purpose == "train" else self.outstanding_eval
        if msg.group_id not in pending or msg.group_id not in self.assigned:
            return "group id not outstanding (unknown or duplicate)"
        n = self.assigned[msg.group_id][1].n
        if len(group.samples) != n:  # build_batch would fail on it, or a group baseline be wrong
            return f"{len(group.samples)} samples where {n} were requested"
        for s in group.samples:
            if len(s.token_ids) and int(s.token_ids.max()) >= self.vocab_size:
                return f"token id {int(s.token_ids.max())} outside the vocabulary ({self.vocab_size})"
            if len(s.versions) and int(s.versions.max()) > self.version:
                return f"policy version {int(s.versions.max())} is newer than the learner's {self.version}"
            # a log-prob is <= 0 and finite; NaN or +inf would reach the loss and -inf an
            # importance weight (the wire carries any float32 bit pattern). The codec has
            # checked the environment tokens' (0.0, version -1) and the mask itself.
            lp = s.logprobs[s.model_mask()]
            bad = lp[~(np.isfinite(lp) & (lp <= 0))]
            if len(bad):
                return f"log-prob {float(bad[0])} is not a finite value <= 0"
        return ""

    @property
    def in_flight(self) -> int:
        """Training groups requested and not yet received."""
        return len(self.outstanding)

    def generators_busy(self) -> bool:
        """Whether any generator has work (training or eval groups not yet back), after
        filing whatever has arrived; never blocks."""
        while self._receive(timeout_s=0):
            pass
        return bool(self.outstanding or self.outstanding_eval)

    def _wait_for(self, buffer: deque, count: int) -> bool:
        """Block until ``buffer`` holds ``count`` groups; False if a stop was requested."""
        return self._wait_until(lambda: len(buffer) >= count, lambda: f"{len(buffer)}/{count} groups received")

    def _wait_until(self, done: Callable[[], bool], progress: Callable[[], str]) -> bool:
        """Receive until ``done()``; False if a stop was requested."""
        timeout = self.cfg.transport.timeout_s
        last = time.monotonic()
        while not done():
            if self.stop():
                return False
            if self._receive(timeout_s=1.0):  # short polls keep Ctrl-C responsive
                last = time.monotonic()
            elif time.monotonic() - last > timeout:
                raise TimeoutError(
                    f"no trajectories for {timeout:.0f}s ({progress()}); "
                    "a generator may be stuck or dead: see its log in the run directory"
                )
        return True

    def top_up(self, version: int, taken: int = 0) -> None:
        """Admission control: keep in_flight + buffered (+ ``taken`` for the batch being
        formed) <= (max_staleness + 1) * batch groups, so nothing is generated only to be
        thrown away for staleness."""
        cap = (self.cfg.learner.max_staleness + 1) * self.cfg.learner.prompts_per_step
        credits = cap - self.in_flight - len(self.buffer) - taken
        if credits > 0:
            self.request(credits, min_version=version)

    def next_batch(self, version: int) -> tuple[list[Group], dict[str, float]] | None:
        """The oldest ``prompts_per_step`` groups that are fresh enough to train on at
        ``version``, in group-id order; staler ones are dropped, counted and replaced.
        None on stop. (Arrival order depends on which generator answers first; id order
        makes an on-policy run with several generators train the same batch, in the same
        micro-batches, every time.)"""
        k, P = self.cfg.learner.max_staleness, self.cfg.learner.prompts_per_step
        t0, dropped = time.monotonic(), 0
        batch: list[Group] = []
        while len(batch) < P:
            self.top_up(version, taken=len(batch))
            if not self._wait_for(self.buffer, 1):
                self.buffer.extendleft(reversed(batch))  # not trained: a checkpoint keeps them
                return None
            group = self.buffer.popleft()
            if group.oldest_version < version - k:
                dropped += 1
                continue
            batch.append(group)
        self.dropped_total += dropped
        batch.sort(key=lambda g: g.msg.group_id)
        samples = sum(len(g.samples) for g in batch)
        return batch, {"async/dropped_groups": dropped, "async/dropped_total": self.dropped_total,
                       "async/learner_wait_s": time.monotonic() - t0,
                       # multi-turn: observation tokens per sample (context; train/response_length
                       # counts the model's tokens only)
                       "train/env_tokens": sum(g.env_tokens for g in batch) / max(samples, 1)}

    def evaluate(self, version: int) -> dict[str, float]:
        """Held-out mean@k / pass@k per data_source, each source sampled at its eval
        temperature (``asyncrl.eval.sampling``: AIME / AIME25 at 0.6), ``eval.k`` samples each,
        with the sampling parameters ``python -m asyncrl.eval`` uses (``eval.top_p``,
        ``eval.max_tokens``, ``eval.preset``)."""
        n, k = len(self.eval_problems), samples_per_problem(self.cfg)
        for sampling, idx in eval_plan(self.eval_problems, self.cfg).items():
            problems = [(-1 - i, self.eval_problems[i]) for i in idx]  # negative ids: never trained on
            self.outstanding_eval.update(gid for gid, _ in problems)
            self._send(self._groups(problems), version, sampling, "eval")
        # every answer in, or rejected (_receive): a rejected problem is left out of the scores
        if not self._wait_until(lambda: not self.outstanding_eval,
                                lambda: f"{len(self.eval_buffer)}/{n} eval groups received"):
            return {}
        groups = [self.eval_buffer.popleft() for _ in range(len(self.eval_buffer))]
        problems = [self.eval_problems[-1 - g.msg.group_id] for g in groups]
        # response length = tokens the model sampled, as train/response_length counts them
        lengths = [[int(s.model_mask().sum()) for s in g.samples] for g in groups]
        from asyncrl.learner.exploration import eval_spark_metrics  # imports this module's Group

        return hub_metrics(problems, [(j, [s.reward for s in g.msg.samples], lengths[j])
                                      for j, g in enumerate(groups)], k) | {"eval/rejected_groups": n - len(groups)} | (
            eval_spark_metrics(groups, self.tok))

    def publish(self, named: list[tuple[str, torch.Tensor]], version: int) -> None:
        self.version = version
        self.weights = self.weight_sender.notice(named, version, idle=lambda: self._receive(timeout_s=0))
        for w in self.workers:
            self._send_to(w, *self.weights)
        self.weight_sender.after_notice(named)  # nccl: the broadcast the notice announced

    def record_trained(self, step: int, groups: list[Group]) -> None:
        """Append the step's group ids to <run.dir>/trained_groups.jsonl (an audit trail:
        no group is trained twice, none is skipped, also across restarts and resumes)."""
        with open(f"{self.cfg.run.dir}/trained_groups.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "group_ids": [g.msg.group_id for g in groups]}) + "\n")

    def snapshot(self) -> HubState:
        """The hub's part of a resumable checkpoint (taken between steps)."""
        return HubState(version=self.version, train_index=self.train_index, outstanding=sorted(self.outstanding),
                        next_worker=self.next_worker, dropped_total=self.dropped_total,
                        buffer=[[bytes(f) for f in encode(g.msg, trajectory_frames(g.samples))] for g in self.buffer])

    def restore(self, st: HubState) -> None:
        """Continue from a snapshot, once the workers are connected: the buffered groups are
        back, and the groups that were in flight are requested again with their ids."""
        self.version, self.train_index, self.dropped_total = st.version, st.train_index, st.dropped_total
        self.next_worker = st.next_worker % len(self.workers)
        for frames in st.buffer:
            msg, arrays = decode_checked(frames)
            self.buffer.append(Group(msg, trajectory_arrays(msg, arrays)))
        if st.outstanding:  # a group id is the position of its problem in the training stream
            self._send(self._groups([(gid, self.source.problem(gid)) for gid in st.outstanding]), st.version,
                       self.train_sampling(), "train")
            self.outstanding.update(st.outstanding)

    def shutdown(self, reason: str) -> None:
        for w in self.workers:
            try:
                self.ep.send(w, Shutdown(reason=reason))
            except Exception:  # a worker that is already gone needs no goodbye
                log.debug("could not send shutdown to %r", w)
