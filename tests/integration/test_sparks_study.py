"""benchmarks/sparks.py end to end, as small as it goes: one algorithm, one seed, two
steps of ``asyncrl.launch spark`` from the shipped base, then its table, JSON and figure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testkit import REPO, subprocess_env


@pytest.mark.slow
def test_sparks_study_smoke(tmp_path):
    out = tmp_path / "sparks"
    cmd = [sys.executable, "benchmarks/sparks.py", "--algos", "lpreg", "--seeds", "0", "--steps", "2",
           "--eval-every", "1", "--eval-size", "8", "--jobs", "1", "--out", str(out),
           "--runs-dir", str(tmp_path / "runs"), "eval.k=4", "learner.prompts_per_step=4"]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "[1/1]           lpreg seed 0" in done.stdout  # progress line per run

    data = json.loads(out.with_suffix(".json").read_text())
    assert data["k"] == 4 and list(data["results"]) == ["lpreg"]
    (run,) = data["results"]["lpreg"]
    assert [s for s, _ in run["curves"]["pass@1"]] == [0, 1, 2]  # before training, each step
    assert [s for s, _ in run["curves"]["entropy"]] == [1, 2]
    assert len(run["curves"]["spark"]) == 2 and all(0 <= y <= 1 for _, y in run["curves"]["spark"])
    for name in ("pass@1", "pass@4", "hard_pass@4"):
        assert 0 <= run[name]["final"] <= 1
    assert run["pass@1"]["final"] <= run["pass@4"]["final"]  # pass@j grows with j

    md = out.with_suffix(".md").read_text()
    assert md.startswith("| algorithm | pass@1 | pass@4 | hard pass@1 | hard pass@4 |")
    assert "| base (step 0) |" in md and "| lpreg |" in md and "n/a" not in md.split("\n\n")[0]
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert len(run["curves"]["noise"]) == 2 and all(y >= 0 for _, y in run["curves"]["noise"])

    # --report-only: the same runs tabulated again, nothing launched
    again = tmp_path / "again"
    cmd = [sys.executable, "benchmarks/sparks.py", "--algos", "lpreg", "--seeds", "0", "--report-only", "--out",
           str(again), "--runs-dir", str(tmp_path / "runs"), "eval.k=4"]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert again.with_suffix(".md").read_text().split("\n\n")[0] == md.split("\n\n")[0]
    assert json.loads(again.with_suffix(".json").read_text())["results"] == data["results"]
    missing = subprocess.run([*cmd[:-2], str(tmp_path / "nothing"), "eval.k=4"], cwd=REPO, env=subprocess_env(),
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no " in missing.stderr and "metrics.jsonl" in missing.stderr
