"""Reward computation for a generated batch: verifiers in a small process pool with a
per-answer time limit, and DAPO's overlong penalty.

Why processes: math-verify's parser and sympy can take seconds (or forever) on a
pathological answer, hold the GIL meanwhile, and time themselves with ``signal.alarm``,
which only works on a process's main thread. In a pool process every verifier call runs
on that process's main thread, so math-verify's own limits work; a call that still does
not return within ``timeout_s`` (stuck in C code) scores 0 and its pool is replaced.
``processes=0`` scores inline, which the synthetic task uses (its verifier is a string
compare; a pool would only cost memory on a 2-core machine).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Sequence

from asyncrl.tasks import verify

log = logging.getLogger(__name__)

Item = tuple[str, str, str]  # (data_source, response text, ground truth)
STARTUP_GRACE_S = 30.0  # a new pool's first answer also waits for its processes to start


def overlong_penalty(num_tokens: int, max_tokens: int, buffer_len: int, factor: float) -> float:
    """DAPO's soft overlong punishment: 0 up to ``max_tokens - buffer_len`` tokens, then
    falling linearly to ``-factor`` at ``max_tokens`` (added to the verifier's reward)."""
    if buffer_len <= 0:
        return 0.0
    over = num_tokens - (max_tokens - buffer_len)
    return -factor * min(max(over, 0), buffer_len) / buffer_len


class RewardPool:
    def __init__(self, processes: int = 0, timeout_s: float = 10.0, overlong_buffer_len: int = 0,
                 overlong_penalty_factor: float = 1.0, fn=verify) -> None:
        self.processes, self.timeout_s, self.fn = processes, timeout_s, fn  # fn: picklable by name
        self.overlong = (overlong_buffer_len, overlong_penalty_factor)
        self._pool = None
        self.timeouts = 0  # answers that hit the limit (scored 0)

    def _start(self):
        # forkserver: children fork from a small server that has imported only the
        # verifiers, not this process's torch, engine threads or sockets.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["asyncrl.tasks"])
        self._pool = ctx.Pool(self.processes)
        return self._pool

    def score(self, items: Sequence[Item]) -> list[float]:
        """Verifier rewards, in order; an answer over the time limit scores 0."""
        if self.processes == 0:
            return [float(self.fn(*it)) for it in items]
        out: list[float] = []
        fresh = self._pool is None
        pool = self._pool or self._start()
        pending = [pool.apply_async(self.fn, it) for it in items]
        for i, res in enumerate(pending):
            try:
                out.append(float(res.get(timeout=self.timeout_s + (STARTUP_GRACE_S if fresh else 0.0))))
                fresh = False
            except mp.TimeoutError:
                self.timeouts += 1
                log.warning("verifier for %r timed out after %.1fs; scored 0 and restarting the reward pool",
                            items[i][0], self.timeout_s)
                out.append(0.0)
                done = {j: pending[j].get() for j in range(i + 1, len(items)) if pending[j].ready()}
                self.close()
                pool, fresh = self._start(), True
                pending[i + 1 :] = [pool.apply_async(self.fn, items[j]) for j in range(i + 1, len(items))]
                for j, value in done.items():  # keep answers already scored
                    pending[j] = _Ready(value)
        return out

    def rewards(self, items: Sequence[Item], num_tokens: Sequence[int], max_tokens: int, train: bool) -> list[float]:
        """Verifier rewards plus the overlong penalty on training samples (evaluation
        reports the verifier's verdict only)."""
        scores = self.score(items)
        if train and self.overlong[0] > 0:
            scores = [s + overlong_penalty(n, max_tokens, *self.overlong) for s, n in zip(scores, num_tokens)]
        return scores

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


class _Ready:
    def __init__(self, value) -> None:
        self.value = value

    def get(self, timeout=None):
        return self.value


def build_reward_pool(cfg) -> RewardPool:
    """The generator's pool: verifier processes when dataset files or reasoning-gym are
    used (its countdown scorer hands the answer to sympy, where ``9**9**9**9`` never
    returns); the built-in arith task scores inline."""
    d = cfg.data
    processes = d.reward_processes if (d.train_files or d.eval_files or cfg.task.name == "reasoning_gym") else 0
    return RewardPool(processes, d.reward_timeout_s, d.overlong_buffer_len, d.overlong_penalty_factor)
