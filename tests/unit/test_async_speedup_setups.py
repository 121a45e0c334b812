"""benchmarks/async_speedup.py compares one generator of N threads with the learner's N
(plus lent threads): its runs must keep that layout whatever the quickstart ships. When
the quickstart moved to two generators, the benchmark silently ran two generators of
two threads each on two cores and read only the first one's timeline."""

from __future__ import annotations

import importlib.util

import pytest

from asyncrl.config import load_config
from testkit import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("async_speedup", REPO / "benchmarks/async_speedup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cores", [2, 4])
def test_every_setup_runs_one_generator_within_the_cores(bench, cores):
    for name, k, threads, borrow in bench.setups([0, 1, 2], cores, split_baseline=True):
        cfg = load_config("quickstart", bench.overrides(k, 0, 5, threads, borrow, ["learner.off_policy=none"]))
        g, lc = cfg.generator, cfg.learner
        assert g.num_workers == 1, name
        assert g.threads == lc.threads == threads and lc.max_staleness == k, name
        # never more threads than cores: the roles take turns (k=0) or run side by side, the
        # learner borrowing the generator's threads only while it idles (k>0)
        assert g.num_workers * g.threads + (lc.threads if k else 0) <= cores, name
        assert lc.threads + lc.borrow_threads <= cores, name
        assert lc.off_policy == "none"
