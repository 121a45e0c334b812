"""Kill the learner with SIGKILL mid-run and resume with ``run.resume=auto``: the run
continues as if it had never stopped.

The victim run checkpoints every 2 steps and sleeps between writing the step-4
checkpoint's shards and its completeness marker; the learner is killed in that window,
so the run dies after one complete checkpoint (step 2) and during the next one. launch
then stops the generators, exits non-zero and prints the resume command; the resumed
launch must ignore the unfinished step-4 directory, continue from step 2 and end with
the same per-step losses, trained group ids and final weights as an uninterrupted run
with the same seed.

Determinism: CPU, one thread per role, on-policy (max_staleness 0); every generator
batch is seeded from (seed, first group id, policy version) and the checkpoint holds
model, optimiser, RNG, data position and buffered groups, so the comparison is exact:
tolerance 0 on losses and weights (asserted with ATOL = 0.0). The runs start from the
warm-started base with GRPO, so they train with real (non-zero) advantages: the
restored optimiser state and data position are exercised, not a zero gradient."""

from __future__ import annotations

import json
import os
import signal

from safetensors.torch import load_file

from test_launch import TRAINS, launch  # noqa: F401 - the fixture
from testkit import WARM_BASE, WARM_RUN, assert_policy_gradient_ran, wait_for_run

ATOL = 0.0
# one generator: with two (the quickstart's layout) the same groups arrive, but the order
# in which they fill a batch varies, so the token-mean sums in another order (~1e-9)
STEPS = ["learner.steps=6", "learner.checkpoint_every=2", "learner.keep_checkpoints=2", "task.eval_size=4",
         "run.seed=3", "generator.num_workers=1"]


def last_per_step(rows: list[dict], key: str) -> dict[int, object]:
    """A resumed run appends: the last row of each step is the one that counts."""
    return {r["step"]: r[key] for r in rows if key in r}


def trained_groups(run_dir) -> dict[int, list[int]]:
    rows = [json.loads(line) for line in (run_dir / "trained_groups.jsonl").read_text().splitlines()]
    return last_per_step(rows, "group_ids")


def final_weights(run_dir):
    return load_file(run_dir / "checkpoints" / "step_6" / "model.safetensors")


def wait_for(pred, timeout_s: float, run, what: str) -> None:
    wait_for_run(pred, timeout_s, run, what, poll_s=0.1)


def test_sigkill_learner_then_resume_matches_uninterrupted(launch):
    ref = launch(WARM_BASE, [*WARM_RUN, *STEPS], name="reference")
    assert ref.wait(300) == 0, ref.output()[-3000:]
    assert_policy_gradient_ran([r for r in ref.metrics() if "loss/total" in r and r["step"] > 2])  # after step 2

    victim = launch(WARM_BASE, [*WARM_RUN, *STEPS, "debug.checkpoint_marker_delay_s=30"], name="victim")
    state = victim.run_dir / "checkpoints" / "state"
    wait_for(lambda: (state / "step_4.tmp" / "hub.msgpack").exists(), 300, victim, "step-4 checkpoint shards")
    assert (state / "step_2" / "COMPLETE").exists()
    pid = int((victim.run_dir / "logs" / "learner0.pid").read_text())
    os.kill(pid, signal.SIGKILL)  # in the window between the shards and the marker
    code = victim.wait(60)
    out = victim.output()
    assert code != 0 and "run.resume=auto" in out, out[-3000:]
    assert not (state / "step_4").exists() and not (state / "step_4.tmp" / "COMPLETE").exists()

    resumed = launch(WARM_BASE, [*WARM_RUN, *STEPS, "run.resume=auto"], name="victim")
    assert resumed.wait(300) == 0, resumed.output()[-3000:]
    assert "resumed from" in resumed.output() and "step_2" in resumed.output()

    ref_loss, got_loss = last_per_step(ref.metrics(), "loss/total"), last_per_step(resumed.metrics(), "loss/total")
    assert sorted(got_loss) == [1, 2, 3, 4, 5, 6]
    diffs = {s: abs(got_loss[s] - ref_loss[s]) for s in ref_loss}
    assert max(diffs.values()) <= ATOL, diffs
    assert trained_groups(resumed.run_dir) == trained_groups(ref.run_dir)
    wa, wb = final_weights(ref.run_dir), final_weights(resumed.run_dir)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= ATOL, worst
    assert [p.name for p in sorted(state.iterdir())] == ["step_4", "step_6"]  # keep_checkpoints=2, .tmp cleaned


def test_consecutive_nan_steps_stop_the_run(launch, tiny_model_dir):
    """debug.nan_loss_steps poisons steps 2 and 3: each is skipped and logged; the second
    in a row (learner.max_bad_steps=2) stops the run with a message and the resume hint."""
    run = launch(tiny_model_dir, [*TRAINS, "learner.steps=4", "learner.max_bad_steps=2", "task.eval_size=4",
                                  "debug.nan_loss_steps=[2,3]"])
    code = run.wait(240)
    out = run.output()
    assert code != 0, out[-3000:]
    assert "2 consecutive steps with a non-finite loss or gradient norm (last: step 3)" in out, out[-3000:]
    assert "run.resume=auto" in out
    skipped = last_per_step(run.metrics(), "train/skipped_steps")
    assert skipped[1] == 0 and skipped[2] == 1 and 3 not in skipped  # step 3 raised before logging
    assert not (run.run_dir / "checkpoints" / "step_3").exists()
