"""``python -m asyncrl.launch`` end to end: a run completes and leaves metrics, the
resolved config and a loadable checkpoint that differs from the initial weights; Lp-Reg
screens and regularises tokens and logs its counters; a failing role fails the launch
fast; Ctrl-C drains, saves a checkpoint and exits 0. Every wait is bounded.

The runs that check training start from the warm-started quickstart base
(``testkit.WARM_BASE``), which solves some problems: rewards vary within groups, so
GRPO trains with non-zero advantages (asserted: its gradient is exactly zero
otherwise) and Lp-Reg has negative-advantage tokens to screen. A random model earns
reward 0 on the arithmetic task, so runs on the tiny random model that must still
change the weights use ``entropy_bonus`` (``TRAINS``: GRPO plus an entropy term,
which has a gradient whatever the rewards)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from asyncrl.config import from_yaml_file, load_config

from asyncrl.models import resolve_model_path
from testkit import REPO, WARM_BASE, WARM_RUN, assert_policy_gradient_ran, subprocess_env

TINY = [
    "learner.steps=3", "learner.prompts_per_step=4", "generator.samples_per_prompt=4", "task.eval_size=16",
    "generator.max_tokens=16", "learner.world_size=1", "learner.lr=1e-2", "learner.threads=1",
    "generator.threads=1", "run.console=false", "transport.timeout_s=60",
]
TRAINS = ["algo.type=entropy_bonus", "algo.coef=0.01"]


class Launch:
    """A launch subprocess whose output goes to a file; stopped for sure on exit."""

    def __init__(self, run_dir: Path, model: Path | str, overrides=()) -> None:
        self.run_dir = run_dir
        self.overrides = [f"model.path={model}", f"run.dir={run_dir}", *TINY, *overrides]
        self.out_path = run_dir.parent / f"{run_dir.name}.launch.log"
        self.out = self.out_path.open("a")
        self.proc = subprocess.Popen([sys.executable, "-m", "asyncrl.launch", "quickstart", *self.overrides],
                                     cwd=REPO, env=subprocess_env(), stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"launch did not exit within {timeout_s:.0f}s; output:\n{self.output()[-3000:]}")

    def output(self) -> str:
        self.out.flush()
        return self.out_path.read_text(errors="replace")

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def stop(self) -> None:
        """Ctrl-C twice (launch kills its roles on the second), then kill launch itself."""
        for sig in (signal.SIGINT, signal.SIGINT):
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()


@pytest.fixture
def launch(tmp_path):
    started: list[Launch] = []

    def start(model, overrides=(), name="run") -> Launch:
        started.append(Launch(tmp_path / name, model, overrides))
        return started[-1]

    yield start
    for run in started:
        run.stop()


def hf_checkpoints(run_dir: Path) -> list[Path]:
    """The exported Hugging Face checkpoints (other entries, e.g. training state, aside)."""
    return sorted(p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))


def load_checkpoint(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def max_weight_change(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def test_run_completes(launch):
    run = launch(WARM_BASE, WARM_RUN)  # the quickstart's own algorithm: GRPO
    code = run.wait(240)
    assert code == 0, run.output()[-3000:]

    rows = run.metrics()
    assert rows and all("step" in r for r in rows)
    assert rows[0]["step"] == 0 and "eval/accuracy" in rows[0]
    assert rows[-1]["step"] == 3 and "eval/accuracy" in rows[-1] and rows[-1]["policy/version"] == 3
    train = [r for r in rows if "train/reward_mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        for key in ("train/reward_mean", "train/entropy", "train/response_length", "train/grad_norm", "loss/total",
                    "loss/pg", "async/lag_max", "perf/gen_tokens_per_s", "policy/version"):
            assert key in r, key
        assert 0.0 <= r["train/reward_mean"] <= 1.0 and r["async/lag_max"] == 0  # on-policy by default
        assert 1.0 <= r["train/response_length"] <= 48
    assert_policy_gradient_ran(train)
    # the hf engine in float32 samples from the learner's own distribution: the learner's
    # log-probs of the sampled tokens match the engine's (KV cache vs full forward only)
    for r in train:
        assert r["mismatch/kl"] < 1e-8 and r["mismatch/logprob_diff_max"] < 1e-4, r
    for r in (rows[0], rows[-1]):
        assert 0.0 <= r["eval/accuracy"] <= 1.0

    cfg = from_yaml_file(run.run_dir / "config.yaml")
    expected = load_config("quickstart", run.overrides)
    assert cfg.transport.port > 0  # resolved
    assert cfg.learner == expected.learner and cfg.model == expected.model and cfg.algo == expected.algo

    ckpts = hf_checkpoints(run.run_dir)
    assert [c.name for c in ckpts] == ["step_3"]
    model, tok = load_checkpoint(ckpts[0])
    initial, initial_tok = load_checkpoint(resolve_model_path(WARM_BASE))
    # Adam moves a parameter by about lr (1e-4) a step
    assert max_weight_change(model, initial) > 5e-5, "the checkpoint equals the initial model: no training"
    assert tok("417+385=")["input_ids"] == initial_tok("417+385=")["input_ids"]
    with torch.no_grad():  # and it runs
        assert model(input_ids=torch.tensor([tok("1+2=")["input_ids"]])).logits.isfinite().all()
    assert (run.run_dir / "logs" / "learner0.log").exists() and (run.run_dir / "logs" / "generator0.log").exists()


def test_lpreg_run_screens_and_regularises_tokens(launch):
    run = launch(WARM_BASE, [*WARM_RUN, "algo.type=lpreg", "algo.rho=0.5", "learner.steps=2", "task.eval_size=8"])
    code = run.wait(240)
    assert code == 0, run.output()[-3000:]
    train = [r for r in run.metrics() if "train/reward_mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        for key in ("lpreg/regularised", "lpreg/screened", "lpreg/kl_mean", "loss/total"):
            assert key in r, key
        assert r["lpreg/screened"] >= r["lpreg/regularised"] >= 0
        assert (r["lpreg/kl_mean"] > 0) == (r["lpreg/regularised"] > 0)
    # negative-advantage tokens exist (rewards vary), so half of them are screened and
    # those the min-p proxy keeps, with lp < lp_proxy, get the KL term
    assert sum(r["lpreg/screened"] for r in train) > 0, train
    assert sum(r["lpreg/regularised"] for r in train) > 0, train
    assert (run.run_dir / "checkpoints" / "step_2" / "config.json").exists()


def test_failing_role_fails_the_launch(launch, tmp_path):
    run = launch(tmp_path / "no_such_model")
    t0 = time.monotonic()
    code = run.wait(90)
    out = run.output()
    assert code not in (0, None), out[-3000:]
    assert time.monotonic() - t0 < 90
    assert "exited with code" in out  # launch names the failed role ...
    assert "config.json" in out  # ... and shows its error
    assert not (run.run_dir / "checkpoints").exists()


def test_ctrl_c_drains_checkpoints_and_exits_0(launch, tiny_model_dir):
    run = launch(tiny_model_dir, [*TRAINS, "learner.steps=500", "task.eval_size=4"])
    deadline = time.monotonic() + 180
    while not any(r["step"] >= 1 and "train/reward_mean" in r for r in run.metrics()):
        if run.proc.poll() is not None:
            pytest.fail(f"launch exited with {run.proc.returncode} before step 1:\n{run.output()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no training step within 180s:\n{run.output()[-3000:]}")
        time.sleep(0.2)
    run.proc.send_signal(signal.SIGINT)
    code = run.wait(90)
    assert code == 0, run.output()[-3000:]
    ckpts = hf_checkpoints(run.run_dir)
    assert len(ckpts) == 1, ckpts
    steps = int(ckpts[0].name.removeprefix("step_"))
    last = max(r["step"] for r in run.metrics())
    assert 1 <= last <= steps < 500
    model, _ = load_checkpoint(ckpts[0])
    initial, _ = load_checkpoint(tiny_model_dir)
    assert max_weight_change(model, initial) > 1e-3
