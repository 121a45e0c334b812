"""Core lending: the learner runs with borrowed threads exactly while no generator is
busy, gives them back on release, and reports the share of time it held them."""

from __future__ import annotations

import time

import pytest
import torch

from asyncrl.config import ConfigError, load_config
from asyncrl.learner.cores import CoreLender


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_follow_generator_activity(restore_threads):
    torch.set_num_threads(1)
    busy = [True]
    lend = CoreLender(own=1, extra=2, generators_busy=lambda: busy[0])
    lend()
    assert torch.get_num_threads() == 1
    busy[0] = False
    lend()
    assert torch.get_num_threads() == 3
    lend()  # still idle: keeps the borrowed threads
    assert torch.get_num_threads() == 3
    busy[0] = True
    lend()
    assert torch.get_num_threads() == 1


def test_release_returns_cores_and_reports_borrowed_share(restore_threads):
    torch.set_num_threads(1)
    busy = [True]
    lend = CoreLender(own=1, extra=1, generators_busy=lambda: busy[0])
    t0 = time.monotonic()
    lend()  # busy: own threads
    time.sleep(0.05)
    busy[0] = False
    lend()  # idle from here on: borrowed
    time.sleep(0.15)
    stats = lend.release(train_s=time.monotonic() - t0)
    assert torch.get_num_threads() == 1
    assert 0.6 < stats["perf/borrowed_frac"] < 0.85  # 0.15 s of ~0.2 s
    # the next step starts from zero
    assert lend.release(train_s=1.0)["perf/borrowed_frac"] == 0.0


@pytest.mark.parametrize("overrides, key", [
    (["learner.borrow_threads=1", "learner.world_size=2"], "learner.world_size"),
    (["learner.borrow_threads=1", "cluster.backend=ray"], "cluster.backend=local"),
    (["learner.borrow_threads=-1"], "learner.borrow_threads"),
])
def test_borrowing_needs_one_local_learner_rank(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config("quickstart", overrides)
    assert key in str(e.value) and "borrow_threads" in str(e.value)


def test_lending_turns_itself_off_where_torch_keeps_its_pool(restore_threads, monkeypatch, caplog):
    torch.set_num_threads(1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # a build whose pool is fixed once used
    lend = CoreLender(own=1, extra=1, generators_busy=lambda: False)
    lend()
    assert "lending is off" in caplog.text
    assert lend.release(train_s=1.0)["perf/borrowed_frac"] == 0.0  # never reported as borrowed
