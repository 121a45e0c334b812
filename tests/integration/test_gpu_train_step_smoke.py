"""benchmarks/gpu_train_step.py (step 3 of benchmarks/gpu_check.sh) run on the CPU as a
smoke test of the script: a lent GPU's 15 minutes must not be spent finding that the
script no longer matches the learner's API (it did once: old_policy_pass's micro-batch
argument changed and the GPU check would have failed at step 3)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testkit import REPO, subprocess_env


@pytest.mark.slow
def test_gpu_train_step_runs_on_cpu_with_packing_off_and_on(tmp_path):
    out = tmp_path / "step.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_train_step.py"), "--layers", "1", "--seqs", "4",
                    "--length", "48", "--prompt", "8", "--micro", "2", "--vary", "--groups", "2", "--json",
                    str(out)],
                   check=True, env=subprocess_env(), cwd=REPO, timeout=600, capture_output=True)
    results = json.loads(out.read_text())["results"]
    assert [(r["algo"], r["packing"], r["share_prompts"]) for r in results] == [
        (algo, packing, share) for algo in ("grpo", "lpreg") for packing, share in ((False, False), (True, False),
                                                                                    (True, True))]
    assert all(r["finite"] for r in results)
    padded, packed, shared = results[0], results[1], results[2]
    assert padded["padding_frac"] > 0.1 and packed["padding_frac"] == 0.0 == shared["padding_frac"]
    assert packed["shared_frac"] == 0.0 < shared["shared_frac"]
    for r in (packed, shared):  # bf16: the same batch, another layout
        assert r["loss"] == pytest.approx(padded["loss"], rel=1e-2)
