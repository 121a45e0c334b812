"""Core lending on one shared host: the learner borrows the cores of idle generators.

With generator and learner processes on the same CPUs, an asynchronous run whose
learner is the slower role leaves the generator's cores idle for part of every step
(it has produced its k batches ahead and waits for credits). The learner then runs
with ``threads + borrow_threads`` intra-op threads, and drops back to ``threads`` as
soon as a generator has work again, so the two never oversubscribe the cores for
longer than one micro-batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


class CoreLender:
    """Called before each micro-batch; ``generators_busy`` must be cheap (non-blocking)."""

    def __init__(self, own: int, extra: int, generators_busy: Callable[[], bool]) -> None:
        self.own, self.extra, self.generators_busy = own, extra, generators_busy
        self.borrowed_s = 0.0  # wall time spent with borrowed threads, for perf/borrowed_frac
        self._since: float | None = None

    def __call__(self) -> None:
        self._set(self.own if self.generators_busy() else self.own + self.extra)

    def release(self, train_s: float) -> dict[str, float]:
        """Give the cores back (at the end of a step, before generators get new work);
        returns the share of the step's ``train_s`` seconds run with borrowed threads."""
        self._set(self.own)
        frac, self.borrowed_s = self.borrowed_s / max(train_s, 1e-9), 0.0
        return {"perf/borrowed_frac": frac}

    def _set(self, n: int) -> None:
        now = time.monotonic()
        if self._since is not None:
            self.borrowed_s += now - self._since
        self._since = now if n > self.own else None
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
            if torch.get_num_threads() != n:  # some builds fix the pool once parallel work has run
                log.warning("torch kept %d threads when asked for %d: learner.borrow_threads has no effect with this "
                            "build; lending is off", torch.get_num_threads(), n)
                self.extra, self._since = 0, None
