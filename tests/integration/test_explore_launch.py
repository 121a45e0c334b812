"""The exploration metrics end to end: a short quickstart launch from the warm base with
in-training evaluations of k = 4 samples per problem (``learner.eval_every``) logs
``explore/*`` every step and the pass@j curve at every evaluation, with sane values."""

from __future__ import annotations

import json
import subprocess
import sys

from testkit import REPO, WARM_BASE, WARM_RUN, subprocess_env

OVERRIDES = [
    "learner.steps=3", "learner.prompts_per_step=4", "task.eval_size=8", "learner.world_size=1",
    "learner.threads=1", "generator.threads=1", "run.console=false", "transport.timeout_s=60",
    "eval.k=4", "learner.eval_every=1",
]


def test_explore_metrics_and_pass_at_j_in_a_launch(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "asyncrl.launch", "quickstart", f"model.path={WARM_BASE}", f"run.dir={run_dir}",
           *WARM_RUN, *OVERRIDES]
    try:
        done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
                              start_new_session=True)
    except subprocess.TimeoutExpired as e:  # launch stops its roles when its session ends
        raise AssertionError(f"launch did not finish in 300 s:\n{(e.stdout or '')[-3000:]}") from None
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]

    train = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        fracs = [r[f"explore/sampled_frac_below_{p}"] for p in ("1pct", "5pct", "10pct")]
        assert all(0.0 <= f <= 1.0 for f in fracs) and fracs == sorted(fracs), r
        assert 0.0 < r["explore/sampled_prob_mean"] <= 1.0 and r["explore/sampled_token_nll"] >= 0.0
        # the same sampling distribution as the learner's pi_old (fresh samples, same numerics): entropy
        # and mean surprisal agree to within sampling noise on ~1000 tokens
        assert abs(r["explore/sampled_token_nll"] - r["train/entropy"]) < 0.5 * r["train/entropy"] + 0.05, r

    evals = [r for r in rows if "eval/pass@4" in r]
    assert sorted({r["step"] for r in evals}) == [0, 1, 2, 3]  # before training, every step, at the end
    for r in evals:
        curve = [r["eval/pass@1"], r["eval/pass@2"], r["eval/pass@4"]]
        assert all(0.0 <= x <= 1.0 for x in curve) and curve == sorted(curve), r
        assert abs(r["eval/pass@1"] - r["eval/mean@4"]) < 1e-12
    assert max(r["eval/pass@4"] for r in evals) > 0  # the warm base solves some problems
