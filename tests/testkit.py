"""Helpers shared by the tests (import as ``from testkit import ...``: a module name
of its own, since every ``conftest.py`` is importable only as the ambiguous
``conftest``, and spawned test processes import these helpers too)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_spawned(fn, args: tuple, nprocs: int, timeout_s: float, what: str) -> None:
    """``fn(rank, *args)`` in ``nprocs`` spawned processes (torch.multiprocessing): a
    child's exception re-raises here with its traceback, a run past ``timeout_s`` fails
    the test naming ``what`` and the ranks still running, and none is left behind."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                alive = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
                pytest.fail(f"{what}: ranks {alive} still running after {timeout_s:.0f}s")
    finally:
        for p in ctx.processes:  # only the processes started above
            if p.is_alive():
                p.terminate()


def proc_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict ({} once the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def wait_for_step_one(run, pid_file: Path, timeout_s: float) -> None:
    """Block until the launched run (tests/integration/test_launch.py's ``launch``) has
    trained step 1 and its generator wrote its pid; fail with its output otherwise."""
    import time

    import pytest

    deadline = time.monotonic() + timeout_s
    while not (pid_file.exists() and any(r.get("step") == 1 and "loss/total" in r for r in run.metrics())):
        if run.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no step 1 (launch code {run.proc.returncode}):\n{run.output()[-3000:]}")
        time.sleep(0.1)


def assert_every_group_trained_once(run, steps: int, prompts: int) -> None:
    """The run's audit trail (trained_groups.jsonl): every step trained, the group ids
    exactly 0..steps*prompts-1 (no duplicates, no gaps), and a generator restart counted."""
    import json

    rows = [json.loads(line) for line in (run.run_dir / "trained_groups.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    trained = [g for r in rows for g in r["group_ids"]]
    assert sorted(trained) == list(range(steps * prompts)), trained
    train = [r for r in run.metrics() if "loss/total" in r]
    assert train[-1]["reliability/generator_restarts"] >= 1


def subprocess_env() -> dict[str, str]:
    """Environment for child Pythons: this checkout first on the path, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def make_tiny_model(out: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny Qwen3 (tied embeddings) + the char tokenizer, in HF format."""
    import torch
    from transformers import Qwen3ForCausalLM

    from asyncrl.models import save_hf, tiny_qwen3_config
    from asyncrl.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = tiny_qwen3_config(len(tok), tok.eos_token_id, tok.pad_token_id)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)
    for k, v in (small | overrides).items():
        setattr(cfg, k, v)
    if getattr(cfg, "layer_types", None):  # one entry per layer
        cfg.layer_types = [cfg.layer_types[0]] * cfg.num_hidden_layers
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    save_hf(model, tok, out)
    return out


WARM_BASE = "builtin:quickstart-base"
"""The warm-started quickstart model (asyncrl/assets/quickstart-base): it solves some
of the arithmetic problems (about 14% at temperature 1), so rewards differ within a
group and the advantages are not all zero. End-to-end runs that must exercise the
policy gradient start from it (a random model earns reward 0: every advantage 0)."""

WARM_RUN = ["generator.max_tokens=48", "generator.samples_per_prompt=8", "learner.lr=1e-4"]
"""Overrides that let the warm base answer (its solutions are ~38 tokens), with groups
large enough that a step without any reward signal is rare, at the quickstart's own
learning rate (one Adam step at 3e-4 already breaks the base: reward 0 from step 2)."""


def assert_policy_gradient_ran(train_rows: list[dict]) -> None:
    """A GRPO run trained with real advantages: with every advantage 0 the GRPO
    gradient is exactly 0 (``train/grad_norm`` 0.0), so a positive norm on some step
    proves a group with differing rewards was trained on; rewards must vary too."""
    assert train_rows, "no training rows in metrics.jsonl"
    rewards = [r["train/reward_mean"] for r in train_rows]
    norms = [r["train/grad_norm"] for r in train_rows]
    assert any(0.0 < x < 1.0 for x in rewards), f"rewards never vary: {rewards}"
    assert max(norms) > 0.0, f"every GRPO gradient is zero (all advantages 0): {norms}"


def wait_for_run(pred, timeout_s: float, run, what: str, poll_s: float = 0.05) -> None:
    """Poll ``pred()`` while the launched ``run`` (``run.proc``, ``run.output()``) is alive:
    fails the test with the run's output if it exits first or ``timeout_s`` passes."""
    import time

    import pytest

    deadline = time.monotonic() + timeout_s
    while not pred():
        if run.proc.poll() is not None:
            pytest.fail(f"launch exited with {run.proc.returncode} before {what}:\n{run.output()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout_s:.0f}s:\n{run.output()[-3000:]}")
        time.sleep(poll_s)


def one_gloo_rank():
    """A world of one gloo rank in this process (a generator for a module fixture)."""
    import torch
    import torch.distributed as dist

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    torch.set_num_threads(threads)


def warmstart_twice(out: Path, task: str, eval_size: int) -> tuple[bytes, bytes]:
    """The weights of two short ``python -m asyncrl.warmstart --task TASK`` runs (2 steps
    of 4 traces, one thread) into ``out/a`` and ``out/b``, restoring the thread count."""
    import torch

    from asyncrl.warmstart import main as warmstart

    threads = torch.get_num_threads()
    try:
        for name in ("a", "b"):
            warmstart(["--task", task, "--out", str(out / name), "--steps", "2", "--batch", "4",
                       "--eval-size", str(eval_size), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    return tuple((out / n / "model.safetensors").read_bytes() for n in ("a", "b"))
