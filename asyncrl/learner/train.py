"""One rollout batch -> ``ppo_mini_batches`` optimiser steps on this rank's share."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from asyncrl.algos.base import Algorithm
from asyncrl.algos.minibatch import MiniBatch, run_minibatch
from asyncrl.algos.offpolicy import behaviour_weights, mismatch_stats
from asyncrl.config import Config
from asyncrl.learner.batch import Batch, rank_rows
from asyncrl.learner.packing import input_positions, row_lengths, split_to_count, token_budget_slices
from asyncrl.learner.policy import Policy
from asyncrl.learner.shared_prompts import shared_positions

log = logging.getLogger(__name__)


def micro_batches(rows: slice, lengths: Tensor, cfg: Config) -> list[slice]:
    """This rank's micro-batches of one mini-batch's ``rows``: at most
    ``learner.micro_batch_size`` rows and ``learner.max_tokens_per_micro_batch`` real
    tokens each, as many on every rank (each forward is a collective under FSDP)."""
    lc = cfg.learner
    out = token_budget_slices(rows, lengths, lc.micro_batch_size, lc.max_tokens_per_micro_batch)
    if lc.max_tokens_per_micro_batch and dist.get_world_size() > 1:
        count = torch.tensor([len(out)])
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        out = split_to_count(out, int(count), lengths)
    return out


def pack_capacity(cfg: Config) -> int | None:
    """The policy's ``pack_capacity``: None = padded rows (learner.packing off)."""
    return cfg.learner.pack_row_tokens if cfg.learner.packing else None


@torch.no_grad()
def old_policy_pass(policy: Policy, batch: Batch, micro: list[list[slice]], cfg: Config, kappa: float | None,
                    before_micro: Callable[[], None] = lambda: None):
    """pi_old quantities for this rank's rows, once per batch before any update:
    log-probs, entropy and, for Lp-Reg, the min-p proxy log-probs."""
    S, L = batch.input_ids.shape
    dev = batch.input_ids.device
    old, ent = torch.zeros((S, L), device=dev), torch.zeros((S, L), device=dev)
    proxy = torch.full((S, L), float("-inf"), device=dev) if kappa is not None else None
    for slices in micro:
        for mb in slices:
            before_micro()
            lp, e, px = policy(batch.input_ids[mb], batch.targets[mb], temperature=cfg.generator.temperature,
                               with_entropy=True, kappa=kappa, pack_capacity=pack_capacity(cfg),
                               share_prompts=cfg.learner.share_prompts)
            old[mb], ent[mb] = lp, e
            if proxy is not None:
                proxy[mb] = px
    return old, ent, proxy


def selection_seed(run_seed: int, step: int, mini_batch: int) -> int:
    """The seed of one mini-batch's random token selection (Clip-Cov): a function of
    the run, the step and the mini-batch only, so a resumed run picks the same tokens."""
    return (run_seed * 1_000_003 + step * 1_009 + mini_batch) % (2**63)


def train_on_batch(
    policy: Policy, opt: torch.optim.Optimizer, algo: Algorithm, batch: Batch, cfg: Config,
    all_gather: Callable[[Tensor], Tensor], poison: bool = False, before_micro: Callable[[], None] = lambda: None,
    step: int = 0,
) -> dict[str, float]:
    """``poison`` (debug.nan_loss_steps) makes the loss NaN, to exercise the guard: an
    optimiser step whose loss (on any rank) or gradient norm is not finite is skipped
    and counted in ``train/skipped_steps``. ``before_micro`` runs before every
    micro-batch's forward (the learner's core lending, ``asyncrl.learner.cores``)."""
    lc, rank, world = cfg.learner, dist.get_rank(), dist.get_world_size()
    batch = batch.to(next(policy.parameters()).device)
    rows = rank_rows(batch.input_ids.shape[0], lc.ppo_mini_batches, world, rank)
    mask = batch.mask
    lengths = row_lengths(batch.targets)
    micro = [micro_batches(r, lengths, cfg) for r in rows]  # absolute row slices, per mini-batch
    adv_tok = batch.advantages[:, None].expand(mask.shape) * mask
    # No separate pi_old pass where nothing needs it: with one optimiser step the training
    # forward runs with pi_old's weights, so its detached log-probs are the old ones, and
    # the importance weight pi_old / pi_behaviour is taken there (for stale samples, and
    # because the engine's numerics are not the learner's); with off_policy=none the
    # ratio is taken against the generator's log-probs. The proxy and token selections
    # always need pi_old's pass, and so do several mini-batches (later ones run after an
    # update, and the mismatch metrics need pi_old for every row).
    one_step = lc.ppo_mini_batches == 1
    skip_old = one_step and not (algo.needs_proxy or algo.needs_selection)
    if skip_old:
        old, proxy, ent = None, None, torch.zeros(mask.shape, device=mask.device)
        pre_update = torch.zeros(mask.shape, device=mask.device)  # the training forward's log-probs
    else:
        kappa = cfg.algo.kappa if algo.needs_proxy else None
        old, ent, proxy = old_policy_pass(policy, batch, micro, cfg, kappa, before_micro)
    is_weights = None if old is None else behaviour_weights(old, batch.behaviour_logprobs, mask, lc.off_policy, lc.is_cap)
    ratio_base = batch.behaviour_logprobs if lc.off_policy == "none" else old

    def backward(loss: Tensor, last: bool) -> None:
        if isinstance(policy, FSDPModule):  # one float32 rank trains a plain module (learner.fsdp.parallelize)
            policy.set_requires_gradient_sync(last)  # reduce-scatter once per optimiser step
        (loss * float("nan") if poison else loss).backward()

    totals: dict[str, Tensor] = {}
    grad_norms, skipped = [], 0
    for i, r in enumerate(rows):

        def forward(sl: slice, base=r.start):
            sl = slice(base + sl.start, base + sl.stop)
            before_micro()
            lp, e, _ = policy(batch.input_ids[sl], batch.targets[sl], temperature=cfg.generator.temperature,
                              with_entropy=algo.needs_entropy or skip_old, pack_capacity=pack_capacity(cfg),
                              share_prompts=lc.share_prompts)
            if skip_old and torch.is_grad_enabled():
                ent[sl], pre_update[sl] = e.detach(), lp.detach()
            return lp, e if algo.needs_entropy else None

        # on the first mini-batch the weights are still pi_old: selection reuses its pass
        current = (old[r], ent[r] if algo.needs_entropy else None) if i == 0 and old is not None else None
        fused_is = ratio_base is None and lc.off_policy != "none"  # pi_old / pi_behaviour in the forward
        mini = MiniBatch(None if ratio_base is None else ratio_base[r], adv_tok[r], mask[r],
                         proxy_logprobs=None if proxy is None else proxy[r],
                         is_weights=None if is_weights is None else is_weights[r],
                         seed=selection_seed(cfg.run.seed, step, i),
                         behaviour_logprobs=batch.behaviour_logprobs[r] if fused_is else None,
                         off_policy=lc.off_policy, is_cap=lc.is_cap)
        metrics, _ = run_minibatch(algo, mini, forward, micro_batch_size=lc.micro_batch_size,
                                   all_gather=all_gather, rank=rank, max_len=float(cfg.generator.max_tokens),
                                   backward=backward, current=current,
                                   slices=[slice(m.start - r.start, m.stop - r.start) for m in micro[i]])
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), lc.grad_clip)
        grad_norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP2
        if finite_step(grad_norms[-1], metrics["loss/total"]):
            opt.step()
        else:  # NaN/Inf would poison the weights and Adam's moments for good: skip this step
            skipped += 1
        opt.zero_grad(set_to_none=True)
        for k, v in metrics.items():
            totals[k] = totals[k] + v.detach().float() if k in totals else v.detach().float()
    # metrics: summed over ranks, averaged over this batch's mini-batches
    idx = torch.cat([torch.arange(r.start, r.stop, device=mask.device) for r in rows])
    valid = mask[idx].float()
    keys = sorted(totals)
    k3_sum, diff_max, _ = mismatch_stats((pre_update if skip_old else old)[idx], batch.behaviour_logprobs[idx],
                                         mask[idx])
    stats = torch.stack([*(totals[k] for k in keys), k3_sum.float(), (ent[idx] * valid).sum(), valid.sum()])
    dist.all_reduce(stats)
    diff_max = diff_max.float().reshape(1)
    dist.all_reduce(diff_max, op=dist.ReduceOp.MAX)
    out = {k: v / len(rows) for k, v in zip(keys, stats[:-3].tolist())}
    out["train/entropy"] = float(stats[-2] / stats[-1])
    # the engine's sampled log-probs against the learner's before this update (pi_old)
    out["mismatch/kl"] = float(stats[-3] / stats[-1])
    out["mismatch/logprob_diff_max"] = float(diff_max)
    out["train/grad_norm"] = float(torch.stack(grad_norms).mean())
    out["train/skipped_steps"] = skipped
    positions = torch.tensor(decoder_positions(batch, lengths, [m for mb in micro for m in mb], cfg,
                                               policy.shares_prompts),
                             dtype=torch.float64)
    dist.all_reduce(positions)  # over all ranks: real tokens, positions computed, of them padding
    real, computed, padding = positions.tolist()
    out["perf/padding_frac"] = padding / computed if computed else 0.0
    out["perf/shared_frac"] = (real - (computed - padding)) / real if real else 0.0  # real tokens not recomputed
    if "lpreg/kl_sum" in out:
        out["lpreg/kl_mean"] = out["lpreg/kl_sum"] / max(out["lpreg/regularised"], 1.0)
    return out


def decoder_positions(batch: Batch, lengths: Tensor, micro: list[slice], cfg: Config,
                      shares_prompts: bool) -> tuple[int, int, int]:
    """(real tokens, positions the decoder computes, of them padding) over ``micro``, in
    the layout the forward uses: padded rows, packed rows, or packed rows with shared
    prompts (fewer positions than real tokens; ``shares_prompts``: the policy can)."""
    capacity = pack_capacity(cfg)
    if capacity is not None and cfg.learner.share_prompts and shares_prompts:
        counts = [shared_positions(batch.input_ids[sl], batch.targets[sl], capacity) for sl in micro]
        return tuple(sum(c[i] for c in counts) for i in range(3))
    real, computed = input_positions(lengths, micro, batch.input_ids.shape[1], capacity)
    return real, computed, computed - real


def finite_step(grad_norm: Tensor, local_loss: Tensor) -> bool:
    """Whether every rank's loss and the (global) gradient norm are finite: the same
    answer on every rank, so all of them step or none does."""
    bad = (~torch.isfinite(local_loss.detach().float())).float().reshape(1)
    dist.all_reduce(bad)
    return bool(torch.isfinite(grad_norm)) and not bool(bad.item())


class NonFiniteGuard:
    """Stops the run after ``max_bad`` consecutive rollout batches with a skipped
    (non-finite) optimiser step, while the weights are still the last good ones."""

    def __init__(self, max_bad: int) -> None:
        self.max_bad, self.bad = max_bad, 0

    def check(self, step: int, stats: dict[str, float]) -> None:
        if not stats.get("train/skipped_steps"):
            self.bad = 0
            return
        self.bad += 1
        log.warning("step %d: non-finite loss or gradient norm (loss %s, grad norm %s); skipped %d optimiser "
                    "step(s), weights unchanged (%d/%d in a row)", step, stats.get("loss/total"),
                    stats.get("train/grad_norm"), stats["train/skipped_steps"], self.bad, self.max_bad)
        if self.bad >= self.max_bad:
            raise FloatingPointError(
                f"{self.bad} consecutive steps with a non-finite loss or gradient norm (last: step {step}); stopped "
                "before the weights were corrupted. Lower learner.lr or raise learner.grad_clip, check the data, "
                "then continue from the last checkpoint with run.resume=auto")
