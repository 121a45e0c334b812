"""FSDP2 on 2 gloo ranks trains exactly like 1 rank: the real learner path
(Policy -> apply_fsdp -> train_on_batch -> full_state_dict) on the same rollout
batch gives the same loss and the same updated weights, for GRPO and Lp-Reg (with
tokens screened and some of them filtered by the min-p proxy), and the micro-batch
size does not matter either.

Tolerance: float32 throughout; weights and metrics agree to 1e-5 absolute (and
1e-5 relative for metrics). AdamW with lr 1e-3 moves every weight by about 1e-3 per
optimiser step, far above that; a larger lr would also scale up float32 summation-order
noise on gradients near Adam's eps (1e-2 gives ~1e-5 differences after two steps). Both world sizes run in spawned processes (a process
group is process-global state), one run of several cases per world size.
"""

from __future__ import annotations

from datetime import timedelta

import msgspec
import numpy as np
import pytest
import torch

from testkit import free_port, make_tiny_model, run_spawned

ATOL = 1e-5
SAMPLES_PER_PROMPT = 4
PROMPTS = 4
LPREG = {"type": "lpreg", "rho": 0.5, "kappa": 0.02, "clip_low": 0.2, "clip_high": 0.28}
PACKED = {"packing": True, "max_tokens_per_micro_batch": 30}  # several micro-batches, each one packed row
PACKED_ROWS = {**PACKED, "pack_row_tokens": 16}  # rows of 16 tokens (samples are 4-15), filled first-fit
CASES = {  # name: (algo block, ppo_mini_batches, micro_batch_size[, more learner settings])
    "grpo": ({"type": "grpo"}, 1, 256),
    "grpo_sgd": ({"type": "grpo"}, 1, 256),  # SGD: the update is lr * gradient, so a gradient-scale bug shows
    "lpreg_sgd": (LPREG, 2, 2),
    "grpo_2mb": ({"type": "grpo"}, 2, 256),
    "grpo_2mb_micro1": ({"type": "grpo"}, 2, 1),
    "lpreg_2mb": (LPREG, 2, 256),
    "lpreg_2mb_micro1": (LPREG, 2, 1),
    "grpo_2mb_packed": ({"type": "grpo"}, 2, 256, PACKED),
    "lpreg_2mb_packed": (LPREG, 2, 256, PACKED),
    "lpreg_2mb_packed_rows": (LPREG, 2, 256, PACKED_ROWS),
}
SAME_WEIGHTS = [("grpo_2mb", "grpo_2mb_micro1"), ("lpreg_2mb", "lpreg_2mb_micro1"),
                ("grpo_2mb", "grpo_2mb_packed"), ("lpreg_2mb", "lpreg_2mb_packed"),
                ("lpreg_2mb", "lpreg_2mb_packed_rows")]


def make_batch(pad_id: int, eos_id: int, vocab: int, scale_advantages: bool):
    """A rollout batch through the real build_batch: PROMPTS groups of SAMPLES_PER_PROMPT
    samples of different lengths, rewards that vary within each group."""
    from asyncrl.learner.batch import build_batch
    from asyncrl.learner.hub import Group
    from asyncrl.wire.codec import SampleArrays
    from asyncrl.wire.schema import SampleMeta, TrajectoryGroup

    rng = np.random.default_rng(0)
    groups = []
    for g in range(PROMPTS):
        prompt = rng.integers(2, vocab, int(rng.integers(3, 8))).tolist()
        arrays, metas = [], []
        for s in range(SAMPLES_PER_PROMPT):
            n = int(rng.integers(2, 10))
            ids = rng.integers(2, vocab, n).astype(np.int32)
            if s % 2:
                ids[-1] = eos_id
            arrays.append(SampleArrays(ids, rng.uniform(-4, -0.5, n).astype(np.float32), np.zeros(n, np.int32)))
            metas.append(SampleMeta(num_tokens=n, reward=float((g + s) % 3 == 0), finish_reason="stop"))
        msg = TrajectoryGroup(group_id=g, worker_id=0, data_source="asyncrl/arith", prompt_ids=prompt, samples=metas)
        groups.append(Group(msg, arrays))
    return build_batch(groups, pad_id, scale_advantages)


def run_case(model_dir: str, name: str, world: int, fsdp: bool = True):
    """(full state dict after one train_on_batch, metrics) on this rank; ``fsdp=False``:
    the plain module the learner trains on one float32 rank (``parallelize``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from asyncrl.algos import build_algorithm
    from asyncrl.algos.collective import dist_all_gather
    from asyncrl.config import Config
    from asyncrl.learner.checkpoint import full_state_dict
    from asyncrl.learner.fsdp import apply_fsdp, parallelize
    from asyncrl.learner.policy import Policy
    from asyncrl.learner.train import train_on_batch
    from asyncrl.models import load_model, load_tokenizer

    algo_block, mini_batches, micro, *more = CASES[name]
    cfg = msgspec.convert({
        "model": {"path": model_dir},
        "generator": {"samples_per_prompt": SAMPLES_PER_PROMPT, "temperature": 0.9, "max_tokens": 10},
        "learner": {"world_size": world, "prompts_per_step": PROMPTS, "ppo_mini_batches": mini_batches,
                    "micro_batch_size": micro, "lr": 1e-3,
                    "grad_clip": 100.0 if name.endswith("_sgd") else 1.0,  # SGD: no clipping to hide a scale
                    **(more[0] if more else {})},
        "algo": algo_block,
    }, Config)
    tok = load_tokenizer(model_dir)
    torch.manual_seed(0)
    policy = Policy(load_model(model_dir, "float32"))
    if fsdp:
        apply_fsdp(policy, init_device_mesh("cpu", (world,)))
    else:
        assert not isinstance(parallelize(policy, cfg, "cpu", world), FSDPModule)
    if name.endswith("_sgd"):
        opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    else:  # what the learner uses (asyncrl.learner.main.build_policy)
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learner.lr, betas=cfg.learner.betas, weight_decay=0.0,
                                fused=True)
    batch = make_batch(tok.pad_token_id, tok.eos_token_id, len(tok), cfg.algo.scale_advantages)
    metrics = train_on_batch(policy, opt, build_algorithm(cfg.algo), batch, cfg, dist_all_gather())
    return full_state_dict(policy), metrics


def worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        results = {name: run_case(model_dir, name, world) for name in CASES}
        if world == 1:
            results |= {("plain", name): run_case(model_dir, name, world, fsdp=False) for name in CASES}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def run_world(model_dir, world: int, out: str, timeout_s: float = 240.0):
    run_spawned(worker, (world, free_port(), str(model_dir), out), world, timeout_s, f"{world}-rank learner processes")
    return torch.load(out)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # a non-uniform policy: with kappa 0.02 the min-p proxy filters about half the screened tokens
    return make_tiny_model(tmp_path_factory.mktemp("fsdp") / "model", seed=0, initializer_range=0.3)


@pytest.fixture(scope="module")
def results(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp_out")
    return {world: run_world(model_dir, world, str(d / f"w{world}.pt")) for world in (1, 2)}


@pytest.fixture(scope="module")
def initial(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=0, msg=lambda m: f"{what}: {k}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_match_one_rank(results, initial, name):
    state1, metrics1 = results[1][name]
    state2, metrics2 = results[2][name]
    # not vacuous: the step moved the weights well beyond the tolerance
    moved = max((state1[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 20 * ATOL, f"weights moved only {moved}"
    assert abs(metrics1["loss/total"]) > 1e-4 and metrics1["train/grad_norm"] > 0
    assert_same_weights(state1, state2, f"{name}: 1 vs 2 ranks")
    assert metrics1.keys() == metrics2.keys()
    for k in metrics1:
        if k not in ("perf/padding_frac", "perf/shared_frac"):  # the decoder's layout depends on the split
            assert metrics2[k] == pytest.approx(metrics1[k], abs=ATOL, rel=ATOL), k


@pytest.mark.parametrize("name", list(CASES))
def test_one_rank_without_fsdp_matches_fsdp(results, name):
    """One float32 rank trains the plain module: the same update as under FSDP2."""
    state, metrics = results[1][name]
    plain_state, plain_metrics = results[1][("plain", name)]
    assert_same_weights(state, plain_state, f"{name}: FSDP2 vs plain on 1 rank")
    assert metrics.keys() == plain_metrics.keys()
    for k in metrics:
        assert plain_metrics[k] == pytest.approx(metrics[k], abs=ATOL, rel=ATOL), k


def test_packing_removes_the_padding(results):
    """Each rank packs its own micro-batches: one row each, so the decoder computes no
    padding on any rank; padded rows and fixed-width rows (tails) do compute some."""
    for world in (1, 2):
        padded = results[world]["lpreg_2mb"][1]["perf/padding_frac"]
        rows = results[world]["lpreg_2mb_packed_rows"][1]["perf/padding_frac"]
        assert results[world]["lpreg_2mb_packed"][1]["perf/padding_frac"] == 0.0
        assert padded > 0.1 and rows > 0.1, (padded, rows)
        # the packed rows also computed each group's prompt once (learner.share_prompts)
        assert results[world]["lpreg_2mb_packed"][1]["perf/shared_frac"] > 0.1
        assert results[world]["lpreg_2mb"][1]["perf/shared_frac"] == 0.0


def test_lpreg_screens_and_filters_tokens(results):
    for world in (1, 2):
        m = results[world]["lpreg_2mb"][1]
        # screened: the rho fraction of negative-advantage tokens; regularised: those the proxy keeps
        assert m["lpreg/screened"] > m["lpreg/regularised"] > 0, m


@pytest.mark.parametrize("a, b", SAME_WEIGHTS, ids=[a for a, _ in SAME_WEIGHTS])
def test_micro_batch_size_does_not_change_the_update(results, a, b):
    for world in (1, 2):
        assert_same_weights(results[world][a][0], results[world][b][0], f"{a} vs {b} on {world} rank(s)")
        assert results[world][b][1]["loss/total"] == pytest.approx(results[world][a][1]["loss/total"], abs=ATOL)
