"""reasoning-gym's countdown end to end through ``python -m asyncrl.launch countdown``
(the shipped config and base, two tiny steps): the generator scores with countdown's own
scorer in its reward pool, GRPO trains on real advantages, the last line printed names
the report command, and that command writes the figures and the summary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testkit import REPO, assert_policy_gradient_ran, subprocess_env

pytest.importorskip("reasoning_gym")
pytest.importorskip("matplotlib")

TINY = ["learner.steps=2", "learner.prompts_per_step=8", "learner.eval_every=0", "task.eval_size=16",
        "learner.threads=1", "generator.threads=1", "run.console=false", "transport.timeout_s=120",
        "data.reward_processes=1"]


def test_countdown_launch_and_report(tmp_path):
    run_dir = tmp_path / "countdown"
    cmd = [sys.executable, "-m", "asyncrl.launch", "countdown", f"run.dir={run_dir}", *TINY]
    try:
        r = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=500)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"launch did not finish within 500s:\n{(e.stdout or b'')[-3000:]}")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    last = [line for line in out.splitlines() if line.strip()][-1]
    assert f"figures and summary: python -m asyncrl.report {run_dir}" in last, last

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "train/reward_mean" in m]
    assert_policy_gradient_ran(train)
    assert "eval/reasoning_gym/countdown/mean@1" in metrics[0] and "eval/reasoning_gym/countdown/mean@1" in metrics[-1]
    # every reward is one of countdown's own scores (1.0, 0.05, 0.01) at partial_reward 1
    assert all(0.0 < m["train/reward_mean"] <= 1.0 for m in train)

    r = subprocess.run([sys.executable, "-m", "asyncrl.report", str(run_dir)], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    report = run_dir / "report"
    assert {"reward.png", "entropy.png", "throughput.png"} <= {p.name for p in report.glob("*.png")}
    assert "| countdown | 2 |" in (report / "report.md").read_text()
