"""docs/lpreg.md 5.2: the same mini-batch split into 1, 2 or 4 micro-batches, on 1 or 2
gloo ranks, selects the same tokens and gives the same gradient, for every
algorithm (those with a global selection are the point).

The world-size-1 runs happen in this process; the 2-rank runs in two spawned
processes that write their results to a file.
"""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest
import torch
import torch.distributed as dist

from asyncrl.algos import build_algorithm, compute_advantages
from asyncrl.algos.collective import dist_all_gather
from asyncrl.algos.config import AlgoConfig
from asyncrl.algos.lpreg import minp_proxy_logprobs
from asyncrl.algos.minibatch import MiniBatch, run_minibatch
from asyncrl.algos.selection import local_all_gather
from testkit import free_port, run_spawned

B, T, H, V = 8, 12, 6, 11
TEMPERATURE = 0.8
MAX_LEN = 16.0
CONFIGS = {
    "lpreg": {"type": "lpreg", "rho": 0.2, "rho_pos": 0.1, "clip_low": 0.2, "clip_high": 0.28, "kappa": 0.2},
    "lpreg_seq": {"type": "lpreg", "rho": 0.3, "kappa": 0.2, "agg": "seq-mean-token-mean"},
    "grpo_norm": {"type": "grpo", "agg": "seq-mean-token-sum-norm"},
    "gspo": {"type": "gspo", "clip_low": 0.01, "clip_high": 0.02},
    "entropy_bonus": {"type": "entropy_bonus", "coef": 0.1},
    "eighty_twenty": {"type": "eighty_twenty"},
    "eighty_twenty_all": {"type": "eighty_twenty", "normaliser": "all"},
    "kl_cov": {"type": "kl_cov", "ratio": 0.1},
    "clip_cov": {"type": "clip_cov", "ratio": 0.1, "cov_lb": 0.05, "cov_ub": 5.0},
}
SELECTING = {"lpreg", "lpreg_seq", "eighty_twenty", "eighty_twenty_all", "kl_cov", "clip_cov"}
TOL = {torch.float64: 1e-10, torch.float32: 1e-6}


def make_problem(dtype):
    """(features, targets, W, MiniBatch) for the whole mini-batch, deterministic."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(H, V, generator=g, dtype=torch.float64)
    w_old = w + 0.3 * torch.randn(H, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[5] = 0  # a padding-only row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.randint(0, 2, (2, B // 2), generator=g).to(torch.float64)
    adv = compute_advantages(rewards, scale=True).reshape(B, 1).expand(B, T).clone()
    logits_old = feats @ w_old
    old = torch.log_softmax(logits_old / TEMPERATURE, -1).gather(-1, targets[..., None])[..., 0]
    proxy = minp_proxy_logprobs(logits_old, targets, 0.2, TEMPERATURE)
    cast = lambda t: t.to(dtype)  # noqa: E731
    # a seed for Clip-Cov's random pick: the same tokens for any split
    batch = MiniBatch(old_logprobs=cast(old), advantages=cast(adv), mask=mask, proxy_logprobs=cast(proxy), seed=7)
    return cast(feats), targets, cast(w), batch


def share(batch: MiniBatch, rows: slice) -> MiniBatch:
    return MiniBatch(old_logprobs=batch.old_logprobs[rows], advantages=batch.advantages[rows],
                     mask=batch.mask[rows], proxy_logprobs=batch.proxy_logprobs[rows], seed=batch.seed)


def run(name, dtype, micro, rank, world, all_gather):
    """(grad of W on this rank, codes [B/world, T] or None, summed metrics)."""
    feats, targets, w0, batch = make_problem(dtype)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    feats, targets, batch = feats[rows], targets[rows], share(batch, rows)
    w = w0.clone().requires_grad_(True)
    algo = build_algorithm(msgspec.convert(CONFIGS[name], AlgoConfig))

    def forward(r: slice):
        logp = torch.log_softmax(feats[r] @ w / TEMPERATURE, -1)  # (b, T, V)
        lp = logp.gather(-1, targets[r][..., None])[..., 0]
        ent = -(logp.exp() * logp).sum(-1) if algo.needs_entropy else None
        return lp, ent

    metrics, codes = run_minibatch(algo, batch, forward, micro_batch_size=micro, all_gather=all_gather,
                                   rank=rank, max_len=MAX_LEN)
    return w.grad, codes, metrics


def worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    gather = dist_all_gather()
    results = {}
    for dtype in TOL:
        for name in CONFIGS:
            for micro in (4, 2, 1):  # 1, 2, 4 micro-batches of this rank's 4 rows
                grad, codes, metrics = run(name, dtype, micro, rank, world, gather)
                dist.all_reduce(grad)  # what FSDP does, with a divide factor of 1
                all_codes = None if codes is None else gather(codes.reshape(-1)).reshape(B, T)
                total = gather(metrics["loss/total"].reshape(1)).sum()
                results[(str(dtype), name, micro)] = (grad, all_codes, total)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("inv") / "results.pt")
    run_spawned(worker, (2, free_port(), out), 2, 180, "2-rank gloo workers")
    return torch.load(out)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_micro_batch_and_world_size_invariance(name, dtype, two_rank_results):
    tol = TOL[dtype]
    ref_grad, ref_codes, ref_metrics = run(name, dtype, B, 0, 1, local_all_gather)
    if name in SELECTING:
        assert ref_codes is not None and (ref_codes != 0).any(), "nothing selected: a vacuous test"
    assert ref_grad.abs().max() > 0
    for micro in (4, 2):  # 2 and 4 micro-batches on one rank
        grad, codes, metrics = run(name, dtype, micro, 0, 1, local_all_gather)
        torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol)
        if codes is not None:
            assert torch.equal(codes, ref_codes)
        torch.testing.assert_close(metrics["loss/total"], ref_metrics["loss/total"], rtol=tol, atol=tol)
    for micro in (4, 2, 1):  # 2 ranks, 1/2/4 micro-batches each
        grad, codes, total = two_rank_results[(str(dtype), name, micro)]
        torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol)
        if codes is not None:
            assert torch.equal(codes, ref_codes)
        torch.testing.assert_close(total, ref_metrics["loss/total"], rtol=tol, atol=tol)
