"""``transport.weights: disk`` across a resume and an overwrite (issue 13, bug 1).

A learner killed at step 8 leaves versions 6-8 in the weights folder; resumed from its
step-5 checkpoint it republishes version 5. Pruning by file name kept 6-8 and deleted
the v5 file the notice names, so the generator skipped it ("superseded"), never got
weights, and the learner died of ``TimeoutError: no trajectories``. A new sender now
clears what an earlier learner left, and pruning keeps the newest versions up to the
one just written."""

from __future__ import annotations

import os
import signal

import torch

from asyncrl.wire.weights import MARKER, DiskWeightReceiver, DiskWeightSender, weights_file

from test_launch import TRAINS, launch  # noqa: F401 - the fixture
from testkit import wait_for_run

TIMEOUT_S = 15  # transport.timeout_s: how long the buggy resume hangs before it dies


def tensors(version: int) -> list[tuple[str, torch.Tensor]]:
    return [("a", torch.full((4,), float(version)))]


def test_a_new_sender_ignores_newer_versions_an_earlier_learner_left(tmp_path):
    old = DiskWeightSender(tmp_path)
    for v in range(1, 10):
        old.notice(tensors(v), v)
    assert sorted(p.name for p in tmp_path.glob("weights_v*")) == [weights_file(tmp_path, v).name for v in (7, 8, 9)]
    (tmp_path / ".weights_v00000010.safetensors.4242.tmp").write_bytes(b"torn")  # killed mid-write

    receiver = DiskWeightReceiver(tmp_path)
    for start in (5, 1):  # run.resume=auto from a step-5 checkpoint; run.overwrite (a fresh run)
        sender = DiskWeightSender(tmp_path)
        assert receiver.load_latest() is None  # the earlier learner's v9 is not offered to anyone
        notice, frames = sender.notice(tensors(start), start)
        got = receiver.receive(notice, frames)
        assert got is not None, f"v{start} was pruned as soon as it was written"
        assert torch.equal(dict(got)["a"], tensors(start)[0][1])
        assert receiver.load_latest()[0] == start
        for v in range(start + 1, start + 5):  # training goes on: the newest 3 up to v stay
            sender.notice(tensors(v), v)
        assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER] + [
            weights_file(tmp_path, v).name for v in range(start + 2, start + 5)]


def wait_for(pred, timeout_s: float, run, what: str) -> None:
    wait_for_run(pred, timeout_s, run, what, poll_s=0.05)


def test_sigkill_then_resume_with_disk_weights(launch, tiny_model_dir, tmp_path):
    weights = tmp_path / "weights"
    args = [*TRAINS, "learner.steps=10", "learner.checkpoint_every=5", "task.eval_size=4", "generator.max_tokens=8",
            "transport.weights=disk", f"transport.weights_dir={weights}", f"transport.timeout_s={TIMEOUT_S}",
            "debug.learner_step_delay_s=0.4"]  # slow steps: the kill lands before the step-10 checkpoint
    victim = launch(tiny_model_dir, args, name="run")
    # v8 written and v5 pruned after it (a kill between the two would leave v5 behind)
    wait_for(lambda: weights_file(weights, 8).exists() and not weights_file(weights, 5).exists(), 120, victim,
             "weights v8 (and v5 pruned)")
    os.kill(int((victim.run_dir / "logs" / "learner0.pid").read_text()), signal.SIGKILL)
    assert victim.wait(60) != 0
    state = victim.run_dir / "checkpoints" / "state"
    assert sorted(p.name for p in state.iterdir() if (p / "COMPLETE").exists()) == ["step_5"], "killed too late"
    assert not weights_file(weights, 5).exists()  # the situation of the bug: only newer versions on disk

    seen = len(victim.output())
    resumed = launch(tiny_model_dir, [*args, "run.resume=auto"], name="run")  # same run dir: appends to its log
    code = resumed.wait(TIMEOUT_S + 60)
    out = resumed.output()[seen:]
    assert code == 0, out[-3000:]
    assert "superseded" not in out
    steps = {r["step"] for r in resumed.metrics() if "loss/total" in r}
    assert set(range(6, 11)) <= steps, steps
