"""The learner role: one process per rank, started by ``asyncrl.launch``.

Rank 0 talks to the generators (prompts out, trajectories in, weights out) and
broadcasts each rollout batch to the other ranks; every rank trains its share
under FSDP2. The loop below is the whole algorithm at the level of batches.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from pathlib import Path

import msgspec
import torch
import torch.distributed as dist

from asyncrl.algos import build_algorithm
from asyncrl.algos.collective import dist_all_gather
from asyncrl.config import Config, from_yaml_file
from asyncrl.data import build_eval_problems, build_train_source
from asyncrl.learner.batch import Batch, broadcast_batch, build_batch, save_batch
from asyncrl.learner.checkpoint import full_state_dict, save_hf_checkpoint
from asyncrl.learner.cores import CoreLender
from asyncrl.learner.exploration import exploration_metrics
from asyncrl.learner.fsdp import parallelize
from asyncrl.learner.hub import RolloutHub
from asyncrl.learner.policy import Policy
from asyncrl.learner.state import Checkpointer
from asyncrl.learner.train import NonFiniteGuard, train_on_batch
from asyncrl.logs import setup_logging
from asyncrl.metrics import MetricsLogger
from asyncrl.models import load_model, load_tokenizer
from asyncrl.wire.transport import LearnerEndpoint
from asyncrl.wire.weights import build_sender

log = logging.getLogger("asyncrl.learner")


def learner_device() -> torch.device:
    """One GPU per rank where there are GPUs (LOCAL_RANK picks it), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else 0)
    torch.cuda.set_device(device)
    return device


def build_policy(cfg: Config, device: torch.device | None = None) -> tuple[Policy, torch.optim.Optimizer]:
    device = device or learner_device()
    torch.manual_seed(cfg.run.seed)
    policy = Policy(load_model(cfg.model.path, "float32").to(device))  # float32 master weights
    parallelize(policy, cfg, device.type, dist.get_world_size())  # FSDP2 mesh, checkpointing, mixed precision
    lc = cfg.learner
    # fused: one kernel for all parameters (CPU and CUDA), ~6x faster than the per-tensor loop on CPU
    opt = torch.optim.AdamW(policy.parameters(), lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay,
                            fused=device.type in ("cpu", "cuda"))
    return policy, opt


def batch_metrics(batch: Batch, version: int) -> dict[str, float]:
    mask = batch.mask
    lens = mask.sum(-1).float()
    lag = version - batch.versions.masked_fill(~mask, version).min(-1).values
    return {"train/reward_mean": batch.rewards.mean().item(), "train/accuracy": (batch.rewards == 1).float().mean().item(),
            "train/response_length": lens.mean().item(), "async/lag_min": lag.min().item(),
            "async/lag_mean": lag.float().mean().item(), "async/lag_max": lag.max().item()}


def train(cfg: Config, policy: Policy, opt, hub: RolloutHub | None, metrics: MetricsLogger | None, tok, stop,
          ckpt: Checkpointer, version: int = 0) -> int:
    """Train from policy ``version`` (> 0 when resumed) to ``learner.steps``; returns the final version."""
    rank0, lc = dist.get_rank() == 0, cfg.learner
    algo, all_gather = build_algorithm(cfg.algo), dist_all_gather()
    guard = NonFiniteGuard(lc.max_bad_steps)
    lend = CoreLender(lc.threads, lc.borrow_threads, hub.generators_busy) if rank0 and lc.borrow_threads else None
    if version:  # resumed: generators start from the base weights
        state = full_state_dict(policy)
        if rank0:
            hub.publish(publishable(state, policy), version)
    elif rank0:
        metrics.log(0, hub.evaluate(version))
    for step in range(version + 1, lc.steps + 1):
        t0 = time.time()
        got = hub.next_batch(version) if rank0 and not stop() else None
        groups, stats = got if got else (None, {})
        batch = broadcast_batch(build_batch(groups, tok.pad_token_id, cfg.algo.scale_advantages) if groups else None)
        if batch is None:  # rank 0 was asked to stop: every rank leaves the loop together
            break
        if rank0 and cfg.debug.record_batches:
            save_batch(batch, Path(cfg.run.dir) / "batches" / f"step_{step}.safetensors")
        stats |= batch_metrics(batch, version)
        if rank0:  # explore/*: sampled-token probabilities, spark moves (only rank 0 has the groups)
            stats |= exploration_metrics(batch, groups, tok)
        if stats["async/lag_max"] > lc.max_staleness:  # next_batch drops these: this is a bug guard
            raise RuntimeError(f"trained sample with lag {stats['async/lag_max']} > max_staleness {lc.max_staleness}")
        t1 = time.time()
        time.sleep(cfg.debug.learner_step_delay_s)
        stats |= train_on_batch(policy, opt, algo, batch, cfg, all_gather, poison=step in cfg.debug.nan_loss_steps,
                                before_micro=lend or (lambda: None), step=step)
        guard.check(step, stats)  # raises after learner.max_bad_steps non-finite steps in a row
        version += 1
        state = full_state_dict(policy)
        t2 = time.time()
        if rank0:
            if lend:  # generators get new weights and prompts next: give the cores back first
                stats |= lend.release(train_s=t2 - t1)
            hub.publish(publishable(state, policy), version)
            stats |= step_metrics(hub, batch, t0, t1, t2, version)
            if lc.eval_every and step % lc.eval_every == 0 and step != lc.steps:
                stats |= hub.evaluate(version)
            metrics.log(step, stats)
            hub.record_trained(step, groups)
        if lc.checkpoint_every and step % lc.checkpoint_every == 0:
            ckpt.save(step, policy, opt, hub.snapshot() if rank0 else None)
    if rank0 and not stop():
        metrics.log(version, hub.evaluate(version) | {"policy/version": version})
    return version


def publishable(state: dict[str, torch.Tensor], policy: Policy) -> list[tuple[str, torch.Tensor]]:
    """Weights to send to generators (a tied lm_head is the embedding: sent once)."""
    tied = policy.lm.config.tie_word_embeddings
    return [(k, v) for k, v in state.items() if not (tied and k == "lm_head.weight")]


def step_metrics(hub: RolloutHub, batch: Batch, t0: float, t1: float, t2: float, version: int) -> dict[str, float]:
    busy, received = sum(hub.gen_busy_s.values()), hub.tokens_received
    gen_busy, gen_tokens = busy - hub.last_gen_busy, received - hub.last_tokens_received
    hub.last_gen_busy, hub.last_tokens_received = busy, received
    wall = time.time() - t0
    out = {"perf/train_tokens_per_s": batch.mask.sum().item() / (t2 - t1), "perf/step_s": wall,
           "time/step_start": t0, "time/train_start": t1, "time/train_end": t2,
           "perf/learner_idle_frac": (t1 - t0) / wall, "perf/generator_busy_frac": gen_busy / (wall * len(hub.workers)),
           "perf/weight_sync_s": time.time() - t2, "policy/version": version,
           "reliability/generator_restarts": hub.restarts}
    if gen_busy > 0:  # generator throughput over what arrived since the last step
        out["perf/gen_tokens_per_s"] = gen_tokens / gen_busy
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="asyncrl learner rank (started by asyncrl.launch)")
    ap.add_argument("--run-dir", required=True)
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    cfg = from_yaml_file(run_dir / "config.yaml")
    # gloo carries the CPU tensors (batch broadcast), NCCL the GPU ones (FSDP2)
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    setup_logging(run_dir, f"learner{rank}", cfg.run.log_level)
    (run_dir / "logs" / f"learner{rank}.pid").write_text(f"{os.getpid()}\n")  # for tests and operators
    torch.set_num_threads(cfg.learner.threads)
    stopping = []
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))  # drain at the next step boundary
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    policy, opt = build_policy(cfg)
    ckpt = Checkpointer(run_dir, cfg.learner.keep_checkpoints, cfg.debug.checkpoint_marker_delay_s)
    version, hub_state = ckpt.resume(policy, opt) if cfg.run.resume == "auto" else (0, None)
    tok = load_tokenizer(cfg.model.path)
    hub = metrics = None
    if rank == 0:
        hub = RolloutHub(cfg, LearnerEndpoint.from_config(cfg.transport, run_dir), build_train_source(cfg, tok),
                         build_eval_problems(cfg, tok), tok, stop=lambda: bool(stopping),
                         vocab_size=policy.lm.config.vocab_size)
        hub.weight_sender = build_sender(cfg, run_dir)
        hub.wait_for_workers(cfg.transport.timeout_s)
        if hub_state is not None:
            hub.restore(hub_state)
        metrics = MetricsLogger(run_dir, total_steps=cfg.learner.steps, console=cfg.run.console,
                                tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb,
                                config=msgspec.to_builtins(cfg) if cfg.run.wandb else None)
    try:
        version = train(cfg, policy, opt, hub, metrics, tok, stop=lambda: bool(stopping), ckpt=ckpt, version=version)
        state = full_state_dict(policy)
        if rank == 0:
            out = run_dir / "checkpoints" / f"step_{version}"
            save_hf_checkpoint(policy, tok, state, out)
            log.info("saved checkpoint %s%s", out, " (interrupted)" if stopping else "")
        if ckpt.last_saved != version:  # and the resumable state (run.resume=auto continues from it)
            ckpt.save(version, policy, opt, hub.snapshot() if rank == 0 else None)
    finally:
        if rank == 0:
            hub.shutdown("learner finished")
            metrics.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
