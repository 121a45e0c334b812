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


# every algorithm, with settings under which each one's selections and weights act on
# a tiny random batch (the packed-vs-padded and shared-prompt equivalence tests)
LAYOUT_ALGOS = {
    "grpo": {"type": "grpo"},
    "dr_grpo": {"type": "dr_grpo"},
    "gspo": {"type": "gspo"},
    "clip_higher": {"type": "clip_higher"},
    "entropy_bonus": {"type": "entropy_bonus", "coef": 0.1},
    "eighty_twenty": {"type": "eighty_twenty"},
    "kl_cov": {"type": "kl_cov", "ratio": 0.1},
    "clip_cov": {"type": "clip_cov", "ratio": 0.1, "cov_lb": 0.0, "cov_ub": 5.0},
    "lpreg": {"type": "lpreg", "rho": 0.3, "kappa": 0.2},
}


def dense_logprobs(hidden, weight, targets, *, temperature=1.0, with_entropy=False):
    """The policy's token_logprobs as dense log-softmax in the inputs' dtype (float64
    in the layout tests: the chunked kernels compute in float32 by design)."""
    import torch

    logp = torch.log_softmax(hidden @ weight.T / temperature, -1)
    lp = logp.gather(-1, targets[:, None])[:, 0]
    return lp, (-(logp.exp() * logp).sum(-1) if with_entropy else None)


def dense_proxy(hidden, weight, targets, *, kappa, temperature=1.0):
    """The policy's token_proxy_logprobs, dense, in the inputs' dtype."""
    from asyncrl.algos.lpreg import minp_proxy_logprobs

    return minp_proxy_logprobs(hidden @ weight.T, targets, kappa, temperature)


def assert_layouts_equal_padded(policy, ids, tgt, rewards, algo_name, layouts, *, micro_batch_size=3, rtol=0.0,
                                atol=1e-10, temperature=0.8):
    """One mini-batch of ``ids``/``tgt`` through ``run_minibatch`` with the decoder's
    input padded, then in each of ``layouts`` (keyword arguments of the policy's
    forward, e.g. ``{"pack_capacity": 0}``): the same loss, gradient and token
    selections. pi_old is perturbed so that ratios, clips and selections act."""
    import msgspec
    import torch

    from asyncrl.algos import build_algorithm
    from asyncrl.algos.config import AlgoConfig
    from asyncrl.algos.minibatch import MiniBatch, run_minibatch
    from asyncrl.algos.selection import local_all_gather
    from asyncrl.kernels import IGNORE_INDEX

    mask = tgt != IGNORE_INDEX
    algo = build_algorithm(msgspec.convert(LAYOUT_ALGOS[algo_name], AlgoConfig))
    kappa = 0.2 if algo.needs_proxy else None
    with torch.no_grad():
        old, _, proxy = policy(ids, tgt, temperature=temperature, kappa=kappa)
        old = old - 0.05 * torch.linspace(-1, 1, old.numel(), dtype=old.dtype).reshape(old.shape) * mask
    adv = ((rewards - 0.5) * 2)[:, None].expand(mask.shape) * mask
    batch = MiniBatch(old, adv, mask, proxy_logprobs=proxy, seed=3)

    def run(layout):
        policy.zero_grad(set_to_none=True)

        def forward(rows):
            lp, ent, _ = policy(ids[rows], tgt[rows], temperature=temperature, with_entropy=algo.needs_entropy,
                                **layout)
            return lp, ent

        metrics, codes = run_minibatch(algo, batch, forward, micro_batch_size=micro_batch_size,
                                       all_gather=local_all_gather, rank=0, max_len=float(ids.shape[1]))
        return metrics["loss/total"], [p.grad.clone() for p in policy.parameters()], codes

    loss0, grads0, codes0 = run({})
    assert sum(float(g.abs().sum()) for g in grads0) > 0
    for layout in layouts:
        loss, grads, codes = run(layout)
        torch.testing.assert_close(loss, loss0, rtol=rtol, atol=atol, msg=lambda m: f"{layout}: {m}")
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(g, g0, rtol=rtol, atol=atol, msg=lambda m: f"{layout}: {m}")
        if codes0 is not None:
            assert torch.equal(codes, codes0) and (codes0 != 0).any()
