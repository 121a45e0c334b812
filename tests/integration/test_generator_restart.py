"""SIGKILL a generator mid-generation (its pid from ``logs/generator0.pid``, never by
name): launch restarts it, the learner re-sends it the newest weights and the prompt
groups it had in flight (same group ids), and the run finishes. Every group id the
learner trained on appears exactly once, with no gaps, and the restart is in the
metrics (``reliability/generator_restarts``)."""

from __future__ import annotations

import os
import re
import signal

from test_launch import TRAINS, launch  # noqa: F401 - the fixture
from testkit import assert_every_group_trained_once, wait_for_step_one

STEPS, PROMPTS = 4, 4


def test_generator_killed_mid_generation_is_restarted(launch, tiny_model_dir):
    run = launch(tiny_model_dir, [*TRAINS, f"learner.steps={STEPS}", f"learner.prompts_per_step={PROMPTS}",
                                  "task.eval_size=4", "generator.restart_backoff_s=0.5",
                                  "debug.generator_batch_delay_s=1.0"])
    pid_file = run.run_dir / "logs" / "generator0.pid"
    # after step 1 the learner asks for step 2's groups; the generator waits 1s, then generates
    wait_for_step_one(run, pid_file, timeout_s=240)
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGKILL)
    code = run.wait(240)
    out = run.output()
    assert code == 0, out[-3000:]
    assert "generator0 died" in out and "generator0 restarted" in out, out[-3000:]
    assert re.search(r"re-issued its [1-9]\d* outstanding group", out), out[-3000:]  # it was mid-generation
    assert int(pid_file.read_text()) != pid  # the restarted process wrote its own

    assert_every_group_trained_once(run, STEPS, PROMPTS)
