"""benchmarks/learner_ab.py run small as a smoke test of the script (it builds the
learner's policy, FSDP2 and the replayed quickstart batches through their own APIs,
which change): one replayed batch, two rounds, every setup timed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testkit import REPO, subprocess_env


@pytest.mark.slow
def test_learner_ab_times_every_setup(tmp_path):
    out = tmp_path / "ab.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks/learner_ab.py"), "--threads", "1", "--rounds", "2",
                    "--batches", "1", "--out", str(out), "learner.micro_batch_size=128"],
                   check=True, env=subprocess_env(), cwd=REPO, timeout=600, capture_output=True)
    got = json.loads(out.read_text())
    assert set(got["median_step_s"]) == {"before", "plain", "after"}
    assert all(len(times) == 1 and times[0] > 0 for times in got["steps_s"].values())  # round 1 is warm-up
    assert got["overrides"] == ["learner.micro_batch_size=128"]
