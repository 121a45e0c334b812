"""Rank 0's link to the generator workers: hand out prompt groups, collect trajectory
groups, publish weights. Admission control and the staleness bound live here
(``top_up`` and ``next_batch``)."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from asyncrl.config import Config
from asyncrl.data import PromptSource
from asyncrl.eval.sampling import hub_metrics, prompt_ids
from asyncrl.eval.sampling import plan as eval_plan
from asyncrl.tasks import Problem
from asyncrl.wire.codec import SampleArrays, trajectory_arrays
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
        return min(int(s.versions.min()) for s in self.samples if len(s.versions))


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
            if isinstance(msg, Hello) and peer not in self.workers:
                self.workers.append(peer)
                log.info("generator %d connected (version %d)", msg.worker_id, msg.version)

    def _groups(self, problems) -> list[PromptGroup]:
        return [
            PromptGroup(group_id=gid, prompt_ids=prompt_ids(p, self.tok), ground_truth=p.ground_truth,
                        data_source=p.data_source)
            for gid, p in problems
        ]

    def request(self, num_groups: int, min_version: int) -> None:
        """Send the next ``num_groups`` training prompts, spread over the workers."""
        g = self.cfg.generator
        problems = []
        for _ in range(num_groups):
            problems.append((self.train_index, self.source.problem(self.train_index)))
            self.train_index += 1
        self._send(self._groups(problems), min_version, g.samples_per_prompt, g.temperature, "train")
        self.outstanding.update(gid for gid, _ in problems)

    def _send(self, groups: list[PromptGroup], min_version: int, n: int, temperature: float, purpose: str) -> None:
        g = self.cfg.generator
        W = len(self.workers)
        for w in range(W):  # contiguous chunks keep each worker's batch large
            part = groups[w * len(groups) // W : (w + 1) * len(groups) // W]
            if part:
                msg = Prompts(groups=part, min_version=min_version, n=n, temperature=temperature,
                              top_p=g.top_p, max_tokens=g.max_tokens, purpose=purpose)
                self.ep.send(self.workers[(self.next_worker + w) % W], msg)
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
        _, msg, frames = got
        if not isinstance(msg, TrajectoryGroup):
            log.warning("unexpected %s message from a generator; dropped", type(msg).__name__)
            return True
        group = Group(msg, trajectory_arrays(msg, frames))
        problem = self._check(group)
        if problem:
            self.rejected_groups += 1
            log.warning("rejected trajectory group %d from worker %d: %s (%d so far)", msg.group_id, msg.worker_id,
                        problem, self.rejected_groups)
            return True
        if msg.purpose == "train":
            self.outstanding.remove(msg.group_id)
            self.buffer.append(group)
            self.gen_busy_s[msg.worker_id] = msg.busy_total_s
            self.tokens_received += sum(x.num_tokens for x in msg.samples)
        else:
            self.outstanding_eval.remove(msg.group_id)
            self.eval_buffer.append(group)
        return True

    def _check(self, group: Group) -> str:
        msg = group.msg
        pending = self.outstanding if msg.purpose == "train" else self.outstanding_eval
        if msg.group_id not in pending:
            return "group id not outstanding (unknown or duplicate)"
        for s in group.samples:
            if len(s.token_ids) and int(s.token_ids.max()) >= self.vocab_size:
                return f"token id {int(s.token_ids.max())} outside the vocabulary ({self.vocab_size})"
            if len(s.versions) and int(s.versions.max()) > self.version:
                return f"policy version {int(s.versions.max())} is newer than the learner's {self.version}"
        return ""

    @property
    def in_flight(self) -> int:
        """Training groups requested and not yet received."""
        return len(self.outstanding)

    def _wait_for(self, buffer: deque, count: int) -> bool:
        """Block until ``buffer`` holds ``count`` groups; False if a stop was requested."""
        timeout = self.cfg.transport.timeout_s
        last = time.monotonic()
        while len(buffer) < count:
            if self.stop():
                return False
            if self._receive(timeout_s=1.0):  # short polls keep Ctrl-C responsive
                last = time.monotonic()
            elif time.monotonic() - last > timeout:
                raise TimeoutError(
                    f"no trajectories for {timeout:.0f}s ({len(buffer)}/{count} groups received); "
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
        ``version``; staler ones are dropped, counted and replaced. None on stop."""
        k, P = self.cfg.learner.max_staleness, self.cfg.learner.prompts_per_step
        t0, dropped = time.monotonic(), 0
        batch: list[Group] = []
        while len(batch) < P:
            self.top_up(version, taken=len(batch))
            if not self._wait_for(self.buffer, 1):
                return None
            group = self.buffer.popleft()
            if group.oldest_version < version - k:
                dropped += 1
                continue
            batch.append(group)
        self.dropped_total += dropped
        return batch, {"async/dropped_groups": dropped, "async/dropped_total": self.dropped_total,
                       "async/learner_wait_s": time.monotonic() - t0}

    def evaluate(self, version: int) -> dict[str, float]:
        """Held-out mean@k / pass@k per data_source, each source sampled at its eval
        temperature (``asyncrl.eval.sampling``: AIME / AIME25 at 0.6), ``eval.k`` samples each."""
        n, k = len(self.eval_problems), self.cfg.eval.k
        for temperature, idx in eval_plan(self.eval_problems, self.cfg).items():
            problems = [(-1 - i, self.eval_problems[i]) for i in idx]  # negative ids: never trained on
            self.outstanding_eval.update(gid for gid, _ in problems)
            self._send(self._groups(problems), version, k, temperature, "eval")
        if not self._wait_for(self.eval_buffer, n):
            return {}
        groups = [self.eval_buffer.popleft() for _ in range(n)]
        return hub_metrics(self.eval_problems, [(-1 - g.msg.group_id, [s.reward for s in g.msg.samples],
                                                 [s.num_tokens for s in g.msg.samples]) for g in groups], k)

    def publish(self, named: list[tuple[str, torch.Tensor]], version: int) -> None:
        self.version = version
        msg, frames = self.weight_sender.notice(named, version)
        for w in self.workers:
            self.ep.send(w, msg, frames)
        self.weight_sender.after_notice(named)  # nccl: the broadcast the notice announced

    def shutdown(self, reason: str) -> None:
        for w in self.workers:
            try:
                self.ep.send(w, Shutdown(reason=reason))
            except Exception:  # a worker that is already gone needs no goodbye
                log.debug("could not send shutdown to %r", w)
