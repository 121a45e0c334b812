"""A short real run with ``generator.engine=vllm``: launch, learner and a vLLM
generator exchange trajectories and weights and finish cleanly.
It starts from the warm-started base, so rewards vary and GRPO trains with non-zero
advantages (asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testkit import WARM_BASE, WARM_RUN, assert_policy_gradient_ran

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]


MODES = {
    "inproc": [],
    "mp": ["generator.vllm.multiprocessing=true"],
    "tp2": ["generator.vllm.multiprocessing=true", "generator.vllm.tensor_parallel_size=2", "generator.threads=1"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_quickstart_with_vllm_engine(tmp_path, mode):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "asyncrl.launch", "quickstart", "generator.engine=vllm", f"model.path={WARM_BASE}",
           "learner.steps=3", "learner.prompts_per_step=4", *WARM_RUN, "task.eval_size=8", f"run.dir={run}",
           "run.console=false", "generator.vllm.kv_cache_gb=0.0625",
           "transport.bucket_mb=0.01",  # ~10 KiB buckets: every update in many of them
           "generator.num_workers=1", "generator.threads=2",  # one engine: the quickstart's own layout has two
           *MODES[mode]]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("policy/version", 0) for r in rows) == 3
    assert any("eval/accuracy" in r for r in rows)
    assert any("train/accuracy" in r for r in rows)
    assert_policy_gradient_ran([r for r in rows if "train/reward_mean" in r])
    diffs = [r["mismatch/logprob_diff_max"] for r in rows if "mismatch/logprob_diff_max" in r]
    assert len(diffs) == 3 and max(diffs) < 1e-4, diffs
    log = (run / "logs" / "generator0.log").read_text()
    assert ("in its own process" if mode != "inproc" else "in process") in log
    assert f"tensor parallel {2 if mode == 'tp2' else 1}" in log
