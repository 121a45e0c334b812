"""FSDP2 options from the config train exactly like the plain 1-rank learner:
activation checkpointing (recompute per decoder layer) on a 1-D mesh, and the hybrid
(HSDP) 2-D mesh with checkpointing, here 2 gloo ranks as 2 "nodes" of 1 rank
(replicate 2 x shard 1: the gradient all-reduce path). Same rollout batch as
test_fsdp_equivalence, same tolerance (1e-5, float32, lr 1e-3); parameter names stay
Hugging Face names (checkpoints and weight updates depend on that)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
from test_fsdp_equivalence import ATOL, make_batch

from testkit import free_port, make_tiny_model, run_spawned

pytestmark = pytest.mark.slow  # 3 spawned learner worlds: ~2 min on 2 shared cores
MODES = {"plain": (1, "shard", 0, False), "checkpointing": (2, "shard", 0, True), "hybrid": (2, "hybrid", 1, True)}


def worker(rank: int, mode: str, port: int, model_dir: str, out: str) -> None:
    import msgspec
    import torch.distributed as dist

    from asyncrl.algos import build_algorithm
    from asyncrl.algos.collective import dist_all_gather
    from asyncrl.config import Config
    from asyncrl.learner.checkpoint import full_state_dict
    from asyncrl.learner.fsdp import apply_fsdp, build_mesh
    from asyncrl.learner.policy import Policy
    from asyncrl.learner.train import train_on_batch
    from asyncrl.models import load_model, load_tokenizer

    world, mesh_kind, per_node, ac = MODES[mode]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        cfg = msgspec.convert({"model": {"path": model_dir},
                               "generator": {"samples_per_prompt": 4, "temperature": 0.9, "max_tokens": 10},
                               "learner": {"world_size": world, "prompts_per_step": 4, "ppo_mini_batches": 2,
                                           "micro_batch_size": 2, "lr": 1e-3}}, Config)
        tok = load_tokenizer(model_dir)
        torch.manual_seed(0)
        policy = Policy(load_model(model_dir, "float32"))
        mesh = build_mesh("cpu", world, mesh=mesh_kind, ranks_per_node=per_node)
        assert mesh.ndim == (2 if mesh_kind == "hybrid" else 1)
        apply_fsdp(policy, mesh, activation_checkpointing=ac)
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learner.lr, betas=cfg.learner.betas, weight_decay=0.0,
                                fused=True)
        batch = make_batch(tok.pad_token_id, tok.eos_token_id, len(tok), cfg.algo.scale_advantages)
        metrics = train_on_batch(policy, opt, build_algorithm(cfg.algo), batch, cfg, dist_all_gather())
        state = full_state_dict(policy)
        if rank == 0:
            torch.save((state, metrics), out)
    finally:
        dist.destroy_process_group()


def run(mode: str, model_dir, out: str):
    run_spawned(worker, (mode, free_port(), str(model_dir), out), MODES[mode][0], 240, f"{mode} learner processes")
    return torch.load(out)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp_options")
    model_dir = make_tiny_model(d / "model", seed=0, initializer_range=0.3)
    return {mode: run(mode, model_dir, str(d / f"{mode}.pt")) for mode in MODES}


@pytest.mark.parametrize("mode", ["checkpointing", "hybrid"])
def test_option_trains_like_the_plain_learner(results, mode):
    (plain, m_plain), (state, m) = results["plain"], results[mode]
    assert state.keys() == plain.keys() and not any("checkpoint" in k for k in state)
    for k in plain:
        torch.testing.assert_close(state[k], plain[k], atol=ATOL, rtol=0, msg=lambda s: f"{mode}: {k}: {s}")
    assert m["loss/total"] == pytest.approx(m_plain["loss/total"], abs=ATOL)
