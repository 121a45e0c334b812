"""The quickstart from a veRL-format parquet file: the synthetic task exported to that
layout trains end to end through ``python -m asyncrl.launch``, and the checkpoint it
leaves evaluates with ``python -m asyncrl.eval``. The run starts from the warm-started
base, so the rewards read from the file's ground truths vary and GRPO trains with
non-zero advantages (asserted). Every wait is bounded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testkit import REPO, WARM_BASE, WARM_RUN, assert_policy_gradient_ran, subprocess_env

pytest.importorskip("pyarrow")

TINY = ["learner.steps=2", "learner.prompts_per_step=4", *WARM_RUN, "learner.threads=1", "generator.threads=1",
        "run.console=false", "transport.timeout_s=60",
        "data.reward_processes=1"]


def run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=subprocess_env(), capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{args[:2]} did not finish within {timeout_s:.0f}s:\n{(e.stdout or b'')[-3000:]}")


def test_quickstart_from_parquet(tmp_path):
    train, test = tmp_path / "arith_train.parquet", tmp_path / "arith_test.parquet"
    for out, n, seed in ((train, 64, 0), (test, 6, 99)):
        r = run(["asyncrl.data.export_synthetic", "--out", str(out), "--n", str(n), "--seed", str(seed)], 120)
        assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "run"
    r = run(["asyncrl.launch", "quickstart", f"model.path={WARM_BASE}", f"run.dir={run_dir}", *TINY,
             f"data.train_files=[{train}]", f"data.eval_files=[{test}]", "eval.k=2"], 400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert_policy_gradient_ran([m for m in metrics if "train/reward_mean" in m])
    final = metrics[-1]
    assert "eval/asyncrl/arith/mean@2" in final and "eval/pass@2" in final
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert ckpts, "no checkpoint written"

    out = tmp_path / "eval.json"
    r = run(["asyncrl.eval", str(run_dir / "config.yaml"), "--checkpoint", str(ckpts[-1]), "--out", str(out),
             "generator.threads=1"], 200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| asyncrl/arith | 6 |" in r.stdout
    result = json.loads(out.read_text())
    assert result["summary"]["k"] == 2 and len(result["records"]) == 6
    assert {rec["temperature"] for rec in result["records"]} == {1.0}
