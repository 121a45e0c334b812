"""A short real run with ``generator.engine=vllm``: launch, learner and a vLLM
generator exchange trajectories and weights and finish cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_with_vllm_engine(vllm_model_dir, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "asyncrl.launch", "quickstart", "generator.engine=vllm", f"model.path={vllm_model_dir}",
           "learner.steps=3", "learner.prompts_per_step=4", "generator.samples_per_prompt=4", "generator.max_tokens=16",
           "task.eval_size=8", f"run.dir={run}", "run.console=false", "generator.vllm.kv_cache_gb=0.0625"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("policy/version", 0) for r in rows) == 3
    assert any("eval/accuracy" in r for r in rows)
    assert any("train/accuracy" in r for r in rows)
