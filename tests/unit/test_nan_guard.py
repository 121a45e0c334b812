"""The non-finite step guard: a rollout batch whose loss or gradient norm is NaN/Inf
is trained through the real ``train_on_batch`` (1 gloo rank, in process) but the
optimiser step is skipped (weights and Adam state untouched, gradients cleared) and
counted; ``learner.max_bad_steps`` such batches in a row stop the run with a message,
and a good batch in between resets the count. Also: a resumable checkpoint written by
``Checkpointer.save`` loads back the exact weights, optimiser and RNG state."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from testkit import one_gloo_rank  # noqa: E402
from test_fsdp_equivalence import make_batch  # noqa: E402


group = pytest.fixture(scope="module")(one_gloo_rank)


def build(model_dir):
    from torch.distributed.device_mesh import init_device_mesh

    from asyncrl.config import Config
    from asyncrl.learner.fsdp import apply_fsdp
    from asyncrl.learner.policy import Policy
    from asyncrl.models import load_model, load_tokenizer

    model_dir = str(model_dir)
    cfg = msgspec.convert({"model": {"path": model_dir},
                           "generator": {"samples_per_prompt": 4, "max_tokens": 10},
                           "learner": {"prompts_per_step": 4, "lr": 1e-3},
                           "algo": {"type": "entropy_bonus", "coef": 0.01}}, Config)
    torch.manual_seed(0)
    policy = Policy(load_model(model_dir, "float32"))
    apply_fsdp(policy, init_device_mesh("cpu", (1,)))
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learner.lr)
    tok = load_tokenizer(model_dir)
    return cfg, policy, opt, make_batch(tok.pad_token_id, tok.eos_token_id, len(tok), cfg.algo.scale_advantages)


def weights(policy):
    from asyncrl.learner.checkpoint import full_state_dict

    return {k: v.clone() for k, v in full_state_dict(policy).items()}


def step(cfg, policy, opt, batch, poison=False):
    from asyncrl.algos import build_algorithm
    from asyncrl.algos.collective import dist_all_gather
    from asyncrl.learner.train import train_on_batch

    return train_on_batch(policy, opt, build_algorithm(cfg.algo), batch, cfg, dist_all_gather(), poison=poison)


def test_poisoned_step_is_skipped(group, tiny_model_dir):
    cfg, policy, opt, batch = build(tiny_model_dir)
    before = weights(policy)
    stats = step(cfg, policy, opt, batch, poison=True)  # NaN gradients
    assert stats["train/skipped_steps"] == 1
    assert not torch.isfinite(torch.tensor(stats["train/grad_norm"]))
    after = weights(policy)
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"
    assert not opt.state, "a skipped step touched Adam's moments"
    assert all(p.grad is None for p in policy.parameters()), "gradients of the bad step were kept"

    nan_batch = batch.rows(slice(None))  # a poisoned batch: NaN advantages -> NaN loss
    nan_batch.advantages = torch.full_like(batch.advantages, float("nan"))
    stats = step(cfg, policy, opt, nan_batch)
    assert stats["train/skipped_steps"] == 1 and all(torch.equal(before[k], v) for k, v in weights(policy).items())

    stats = step(cfg, policy, opt, batch)  # a good step still trains, from clean gradients
    assert stats["train/skipped_steps"] == 0 and torch.isfinite(torch.tensor(stats["loss/total"]))
    after = weights(policy)
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-5
    assert all(torch.isfinite(v).all() for v in after.values())


def test_guard_stops_after_max_bad_steps():
    from asyncrl.learner.train import NonFiniteGuard

    guard = NonFiniteGuard(max_bad=3)
    bad, good = {"train/skipped_steps": 1, "loss/total": float("nan")}, {"train/skipped_steps": 0}
    guard.check(1, bad)
    guard.check(2, bad)
    guard.check(3, good)  # resets the count
    guard.check(4, bad)
    guard.check(5, bad)
    with pytest.raises(FloatingPointError, match="3 consecutive steps.*step 6.*run.resume=auto"):
        guard.check(6, bad)


def test_checkpoint_round_trip(group, tiny_model_dir, tmp_path):
    from asyncrl.learner.state import Checkpointer, HubState, latest_checkpoint

    cfg, policy, opt, batch = build(tiny_model_dir)
    step(cfg, policy, opt, batch)
    hub = HubState(version=1, train_index=8, outstanding=[6, 7], next_worker=0, dropped_total=0, buffer=[])
    ck = Checkpointer(tmp_path, keep=2)
    path = ck.save(1, policy, opt, hub)
    assert latest_checkpoint(ck.root) == path and not list(ck.root.glob("*.tmp"))
    saved_w, saved_rng = weights(policy), torch.get_rng_state()
    saved_opt = {k: v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone()
                 for k, v in opt.state[next(iter(policy.parameters()))].items()}
    step(cfg, policy, opt, batch)  # move away from the saved state
    torch.rand(3)

    cfg2, policy2, opt2, _ = build(tiny_model_dir)
    version, hub2 = Checkpointer(tmp_path, keep=2).resume(policy2, opt2)
    assert version == 1 and hub2 == hub
    assert all(torch.equal(saved_w[k], v) for k, v in weights(policy2).items())
    st = opt2.state[next(iter(policy2.parameters()))]
    for k, v in saved_opt.items():
        got = st[k].full_tensor() if hasattr(st[k], "full_tensor") else st[k]
        assert torch.equal(got, v), k
    assert torch.equal(torch.get_rng_state(), saved_rng)
