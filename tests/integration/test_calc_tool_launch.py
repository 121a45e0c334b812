"""The tool-use demo end to end through ``python -m asyncrl.launch calc_tool`` (the shipped
config and base, two tiny steps, on-policy and with max_staleness 1): multi-turn episodes
with calculator calls run in the generator, GRPO trains on real advantages, and the
learner counts the task's tool-call sparks in the sampled answers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testkit import REPO, assert_policy_gradient_ran, subprocess_env

TINY = ["learner.steps=2", "learner.prompts_per_step=8", "learner.eval_every=0", "task.eval_size=16",
        "learner.threads=1", "generator.threads=1", "run.console=false", "transport.timeout_s=120"]


@pytest.mark.parametrize("staleness", [0, 1])
def test_calc_tool_launch(tmp_path, staleness):
    run_dir = tmp_path / "calc"
    cmd = [sys.executable, "-m", "asyncrl.launch", "calc_tool", f"run.dir={run_dir}", *TINY,
           f"learner.max_staleness={staleness}"]
    try:
        r = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=500)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"launch did not finish within 500s:\n{(e.stdout or b'')[-3000:]}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "train/reward_mean" in m]
    assert len(train) == 2
    assert_policy_gradient_ran(train)
    # the base calls the calculator in some answers and not in others
    assert any(0.0 < m["explore/spark/tool_call/frac"] < 1.0 for m in train), train
    assert "eval/accuracy" in metrics[0]
    # the held-out answers' tool-call rates, counted by the hub's evaluation (eval/spark/*)
    assert 0.0 < metrics[0]["eval/spark/tool_call/frac"] < 1.0, metrics[0]
    assert metrics[0]["eval/spark/product_call/frac"] <= metrics[0]["eval/spark/tool_call/frac"]
