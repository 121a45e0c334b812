"""``cluster.backend: ray`` restarts a generator whose actor died. On a private local Ray
(loopback, run directory under the test's tmp_path), SIGKILL the Ray worker process that
hosts generator 0's actor mid-generation: found as the parent of the generator's own
process (``logs/generator0.pid``) and checked to be a Ray worker, never by name. Launch
starts a new actor in the same bundle, the learner re-sends the newest weights and the
groups that were in flight (same ids), and the run finishes: every group id trained
exactly once, no gaps, and the killed actor's generator process died with it (no
orphan left talking to the learner). Bookkeeping details: tests/unit/test_ray_restarts.py."""

from __future__ import annotations

import os
import re
import signal

import pytest

from test_launch import TRAINS, launch  # noqa: F401 - the fixture
from testkit import assert_every_group_trained_once, proc_status, wait_for_step_one

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]  # one Ray launch: about a minute on 2 shared cores

STEPS, PROMPTS = 4, 4


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def test_ray_restarts_a_generator_whose_actor_was_killed(launch, tiny_model_dir):
    run = launch(tiny_model_dir, [*TRAINS, "cluster.backend=ray", f"learner.steps={STEPS}",
                                  f"learner.prompts_per_step={PROMPTS}", "task.eval_size=4",
                                  "generator.restart_backoff_s=0.5", "debug.generator_batch_delay_s=1.0"])
    pid_file = run.run_dir / "logs" / "generator0.pid"
    # after step 1 the learner asks for step 2's groups; the generator waits 1s, then generates
    wait_for_step_one(run, pid_file, timeout_s=300)
    pid = int(pid_file.read_text())
    actor = int(proc_status(pid)["PPid"])
    assert actor not in (1, os.getpid(), run.proc.pid) and "ray" in _cmdline(actor), (
        f"generator0 (pid {pid}) is not the child of a Ray worker: parent {actor} runs {_cmdline(actor)!r}")
    os.kill(actor, signal.SIGKILL)

    code = run.wait(300)
    out = run.output()
    assert code == 0, out[-4000:]
    assert "generator0 died (its actor died); restarting it in 0.5s (restart 1 of at most 3)" in out, out[-4000:]
    assert "generator0 restarted (new actor" in out, out[-4000:]
    learner_log = (run.run_dir / "logs" / "learner0.log").read_text()
    assert re.search(r"re-issued its [1-9]\d* outstanding group", learner_log), learner_log[-3000:]  # mid-generation
    assert int(pid_file.read_text()) != pid  # the new generator process wrote its own
    state = proc_status(pid)["State"] if proc_status(pid) else "gone"
    assert state[:1] in ("Z", "g"), f"generator {pid} outlived its actor: {state}"  # zombie or reaped

    assert_every_group_trained_once(run, STEPS, PROMPTS)
