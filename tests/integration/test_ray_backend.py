"""``cluster.backend: ray`` on a private local Ray (loopback, 2 CPUs' worth of real
cores): 2 learner ranks (gloo) + 2 generator actors complete a short run, and the
trained weights equal those of the ``local`` backend with the same seed and data; a
failing role fails the launch with its error.

Why the two backends can agree exactly: a generator seeds every engine batch from
(run.seed, the batch's first group id, the weights' version)
(``asyncrl.generator.worker.batch_seed``), and the hub splits each request into
contiguous chunks that do not depend on which worker answers first, so the same
prompts get the same answers on either backend, whatever the scheduling. The learner
then sees the same rollout groups, possibly in another arrival order, which only
reorders float32 sums: tolerance 1e-5 as in the FSDP2 equivalence test (lr 1e-3).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testkit import REPO, subprocess_env

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]  # each launch takes 40-80 s on 2 shared cores

ATOL = 1e-5
RUN = [
    "learner.steps=2", "learner.prompts_per_step=4", "generator.samples_per_prompt=4", "task.eval_size=8",
    "generator.max_tokens=16", "learner.world_size=2", "generator.num_workers=2", "learner.lr=1e-3",
    "learner.threads=1", "generator.threads=1", "run.console=false", "transport.timeout_s=120",
    "algo.type=entropy_bonus", "algo.coef=0.01", "run.seed=3",
]


def launch(run_dir: Path, model, backend: str, extra=(), timeout_s: float = 400) -> tuple[int, str]:
    log = run_dir.with_suffix(".log")
    cmd = [sys.executable, "-m", "asyncrl.launch", "quickstart", f"model.path={model}", f"run.dir={run_dir}",
           f"cluster.backend={backend}", *RUN, *extra]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()  # launch's own process only; its Ray session dies with its driver
            proc.wait()
            pytest.fail(f"{backend} launch did not finish within {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")
    return code, log.read_text(errors="replace")


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / "step_2" / "model.safetensors"))


def test_ray_run_matches_local_run(tmp_path, tiny_model_dir):
    code, out = launch(tmp_path / "ray", tiny_model_dir, "ray")
    assert code == 0, out[-4000:]
    assert "generators connect to tcp://127.0.0.1:" in out  # a private local Ray stays on loopback
    assert not (Path.home() / ".ray" / "auth_token").exists()
    code, out = launch(tmp_path / "local", tiny_model_dir, "local")
    assert code == 0, out[-4000:]

    from safetensors.torch import load_file

    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    ray_w, local_w = weights(tmp_path / "ray"), weights(tmp_path / "local")
    assert ray_w.keys() == local_w.keys()
    moved = max((local_w[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 20 * ATOL, f"training moved the weights only {moved}"
    for k in ray_w:
        torch.testing.assert_close(ray_w[k], local_w[k], atol=ATOL, rtol=0, msg=lambda m: f"{k}: {m}")


def test_failing_role_fails_the_ray_launch(tmp_path):
    code, out = launch(tmp_path / "bad", tmp_path / "no_such_model", "ray", timeout_s=240)
    assert code == 1, out[-3000:]
    assert "failed; stopping the run" in out and "exited with code" in out  # names the role and shows its error
    assert "config.json" in out
