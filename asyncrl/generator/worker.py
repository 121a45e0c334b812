"""The generator role: one process per worker, started by ``asyncrl.launch``.

Takes prompt groups from the learner, runs ``n`` episodes per prompt in the configured
environment (``env``, asyncrl/envs: single-turn = one answer per sample; with tools, turns
and tool outputs interleaved) with its engine, scores them (the environment's reward, or
the verifier of the row's ``data_source``) and sends one ``TrajectoryGroup`` per prompt.
Weight updates are applied as they arrive, between decode steps of a batch in flight and
between the turns of its episodes (or the batch is resampled with them:
``generator.on_weight_update``); a batch that asks for a newer version than the engine
has waits for those weights.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch

from asyncrl.config import Config, engine_tp_size, from_yaml_file
from asyncrl.envs import (Environment, Episode, EpisodeLimits, SingleTurnEnv, build_env, build_tools, check_stops,
                          episode_limits, run_episodes)
from asyncrl.generator.engine import Engine, GenerationInterrupted, SamplingParams
from asyncrl.logs import setup_logging
from asyncrl.rewards import RewardPool, build_reward_pool, overlong_penalty
from asyncrl.wire.codec import SampleArrays, trajectory_frames
from asyncrl.wire.schema import Hello, Prompts, SampleMeta, Shutdown, TrajectoryGroup, WeightUpdate
from asyncrl.wire.transport import GeneratorEndpoint
from asyncrl.wire.weights import WeightReceiver, ZmqWeights, build_receiver, weights_digest

log = logging.getLogger("asyncrl.generator")
INLINE_REWARDS = RewardPool(processes=0)
SINGLE_TURN = SingleTurnEnv()


def batch_seed(run_seed: int, first_group_id: int, version: int) -> int:
    """The sampling seed of one engine batch. Generation is a function of (seed, group
    ids, weights), not of a worker's history, so a group re-issued after a generator
    restart or a resume samples the same answers, and no generator RNG state needs to be
    checkpointed."""
    return (run_seed * 1_000_003 + first_group_id * 7_919 + version) % (2**63)


def engine_device(cfg: Config, worker_id: int) -> torch.device:
    """The hf engine's device (``cluster.generator_gpus``; which GPU: ``placement.generator_gpu``),
    made this process's current CUDA device."""
    from asyncrl.cluster.placement import generator_gpu

    index = generator_gpu(cfg, worker_id)
    if index is None:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"cluster.generator_gpus={cfg.cluster.generator_gpus} but generator {worker_id} sees no "
                           "CUDA device; set cluster.generator_gpus=0 to generate on the CPU")
    if index >= torch.cuda.device_count():
        raise RuntimeError(
            f"generator {worker_id} would run on GPU {index} (after the learner ranks' GPUs), but this machine has "
            f"{torch.cuda.device_count()}; lower generator.num_workers or learner.world_size, or with one GPU share "
            "it with learner rank 0: transport.weights=cuda_ipc")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def build_engine(cfg: Config, worker_id: int) -> tuple[Engine, object]:
    from asyncrl.models import load_model, load_tokenizer, resolve_model_path

    tok = load_tokenizer(cfg.model.path)
    if cfg.generator.engine == "hf":
        from asyncrl.generator.hf import HFEngine

        device = engine_device(cfg, worker_id)
        model = load_model(cfg.model.path, cfg.model.dtype).to(device)
        log.info("hf engine on %s", device)
        return HFEngine(model, pad_id=tok.pad_token_id, seed=cfg.run.seed * 1000 + worker_id), tok
    if cfg.generator.engine == "vllm":
        from asyncrl.generator.vllm_engine import VLLMEngine

        o = cfg.generator.vllm
        engine = VLLMEngine(str(resolve_model_path(cfg.model.path)), dtype=cfg.model.dtype,
                            seed=cfg.run.seed * 1000 + worker_id, threads=cfg.generator.threads,
                            kv_cache_bytes=int(o.kv_cache_gb * 2**30) or None,
                            gpu_memory_utilization=o.gpu_memory_utilization, enforce_eager=o.enforce_eager,
                            max_model_len=o.max_model_len or None, multiprocessing=o.multiprocessing,
                            tensor_parallel_size=engine_tp_size(cfg),
                            bucket_bytes=int(cfg.transport.bucket_mb * 2**20))
        return engine, tok
    if cfg.generator.engine == "sglang":
        from asyncrl.generator.sglang_engine import SGLangEngine

        o = cfg.generator.sglang
        engine = SGLangEngine(str(resolve_model_path(cfg.model.path)), dtype=cfg.model.dtype,
                              seed=cfg.run.seed * 1000 + worker_id, url=o.url or None,
                              mem_fraction_static=o.mem_fraction_static,
                              weights_dir=o.weights_dir or str(Path(cfg.run.dir) / f"sglang_weights{worker_id}"),
                              bucket_bytes=int(cfg.transport.bucket_mb * 2**20),
                              tp_size=max(cfg.cluster.generator_gpus, 1))
        return engine, tok
    raise ValueError(f"generator.engine {cfg.generator.engine!r} is not available")


def run_prompts(engine: Engine, tok, msg: Prompts, worker_id: int, between_steps=None,
                busy_total_s: float = 0.0, rewards: RewardPool | None = None, env: Environment | None = None,
                limits: EpisodeLimits = EpisodeLimits(), tools=None) -> list[tuple[TrajectoryGroup, list]]:
    """``msg.n`` episodes per group in ``env`` (default: single-turn, today's one answer
    per sample), scored, as one ``TrajectoryGroup`` per group. ``msg.max_tokens`` is an
    episode's budget of response tokens (model and observation)."""
    t0 = time.time()
    params = SamplingParams(n=msg.n, max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p)
    groups = run_episodes(engine, tok, env or SINGLE_TURN, msg.groups, params, limits, between_steps, tools)
    dt = time.time() - t0
    scores = iter(episode_rewards([e for eps in groups for e in eps], tok, rewards or INLINE_REWARDS,
                                  msg.max_tokens, train=msg.purpose == "train"))
    results = []
    for g, eps in zip(msg.groups, groups):
        metas, arrays = [], []
        for e in eps:
            metas.append(SampleMeta(num_tokens=len(e.token_ids), reward=next(scores), finish_reason=e.finish_reason))
            arrays.append(SampleArrays(np.asarray(e.token_ids, np.int32), np.asarray(e.logprobs, np.float32),
                                       np.asarray(e.versions, np.int32), np.asarray(e.mask, np.uint8)))
        header = TrajectoryGroup(group_id=g.group_id, worker_id=worker_id, data_source=g.data_source,
                                 prompt_ids=g.prompt_ids, samples=metas, purpose=msg.purpose, gen_seconds=dt,
                                 busy_total_s=busy_total_s + dt)
        results.append((header, trajectory_frames(arrays)))
    return results


def episode_rewards(episodes: list[Episode], tok, pool: RewardPool, max_tokens: int, train: bool) -> list[float]:
    """Each episode's reward: the environment's own, or the task verifier's (through the
    pool: a process pool bounds slow math verification) on its answer. The overlong
    penalty (training only) counts model tokens: observations are not the model's
    length, and with a single turn every token is the model's, as before."""
    need = [e for e in episodes if e.reward is None]
    items = [(e.group.data_source, e.answer if e.answer is not None else tok.decode(e.token_ids,
              skip_special_tokens=True), e.group.ground_truth) for e in need]
    verified = iter(pool.rewards(items, [e.model_tokens for e in need], max_tokens, train=train) if need else [])
    return [next(verified) if e.reward is None
            else float(e.reward) + (overlong_penalty(e.model_tokens, max_tokens, *pool.overlong) if train else 0.0)
            for e in episodes]


class Worker:
    """The worker's message loop. New weights are applied as soon as they arrive: between
    batches, and between decode steps of a batch in flight (the engine then re-encodes
    the prefix with them), so every token is sampled by the newest weights on hand."""

    def __init__(self, engine: Engine, tok, link: GeneratorEndpoint, worker_id: int,
                 rewards: RewardPool | None = None, delay_s: float = 0.0, seed: int = 0) -> None:
        self.engine, self.tok, self.link, self.worker_id, self.seed = engine, tok, link, worker_id, seed
        self.rewards = rewards
        self.delay_s = delay_s  # debug.generator_batch_delay_s
        self.timeline = None  # a file: one JSON line per engine batch
        self.pending: deque[Prompts] = deque()
        self.shutdown: str | None = None
        self.busy_s = 0.0  # cumulative generation time, reported with every group
        self.weights: WeightReceiver = ZmqWeights()  # transport.weights (main sets it)
        self.max_resamples = 0  # times a batch is resampled for new weights: 0 = on_weight_update continue
        self.resampled = 0  # batches abandoned for new weights and sampled again
        self.env: Environment = SINGLE_TURN  # env.type (main sets it)
        self.limits = EpisodeLimits()  # env.max_turns, env.max_turn_tokens
        self.tools = None  # the tool pool of env.type: tools

    def handle(self, msg, frames) -> None:
        if isinstance(msg, Shutdown):
            self.shutdown = msg.reason or "requested"
        elif isinstance(msg, WeightUpdate):
            t0 = time.time()
            named = self.weights.receive(msg, frames)
            if named is None:  # superseded (disk, cuda_ipc): the newer notice is queued
                return
            self.engine.load_weights(named, msg.version)
            # before loaded(): cuda_ipc buffers may change after it; a bucketed stream was read by now
            if log.isEnabledFor(logging.DEBUG) and isinstance(named, list):
                log.debug("loaded weights v%d in %.3fs (digest %s)", msg.version, time.time() - t0,
                          weights_digest(named))
            self.weights.loaded(msg.version)
        elif isinstance(msg, Prompts):
            self.pending.append(msg)

    def poll(self) -> None:
        """Drain whatever arrived, without blocking (runs between decode steps)."""
        while self.shutdown is None and (got := self.link.recv(timeout_s=0)) is not None:
            self.handle(*got)

    def generate(self, msg: Prompts) -> list[tuple[TrajectoryGroup, list]]:
        """One engine batch (every episode of its groups, all turns). New weights
        arriving mid-batch (within a turn or between turns) abandon it (up to
        ``max_resamples`` times: generator.on_weight_update restart), and it is sampled
        again from scratch with them, as if it had started after the update (same seed
        rule); after that, or with 0, updates are applied mid-batch.

        Weights that arrived while the batch waited are loaded before each attempt: the
        engine calls ``between_steps`` only after the first token, so without this the
        first token would be sampled (and seeded) with superseded weights."""
        for attempt in itertools.count():
            self.poll()
            version, t0 = self.engine.version, time.time()
            restart = attempt < self.max_resamples
            reseed = getattr(self.engine, "reseed", None)  # engines without it keep their own stream
            if reseed is not None:
                reseed(batch_seed(self.seed, msg.groups[0].group_id, version))

            def between_steps(restart: bool = restart, version: int = version) -> None:
                self.poll()
                if restart and self.engine.version != version:
                    raise GenerationInterrupted

            try:
                return run_prompts(self.engine, self.tok, msg, self.worker_id, between_steps, self.busy_s,
                                   self.rewards, self.env, self.limits, self.tools)
            except GenerationInterrupted:
                self.busy_s += time.time() - t0  # the abandoned work was busy time too
                self.resampled += 1
                log.info("weights v%d arrived mid-batch: resampling its %d group(s) from scratch (%d so far)",
                         self.engine.version, len(msg.groups), self.resampled)

    def serve(self, stop) -> None:
        while not stop() and self.shutdown is None:
            got = self.link.recv(timeout_s=1.0)
            if got is not None:
                self.handle(*got)
            while self.pending and self.pending[0].min_version <= self.engine.version and self.shutdown is None:
                msg = self.pending.popleft()
                time.sleep(self.delay_s)
                t0 = time.time()
                results = self.generate(msg)
                self.busy_s = results[-1][0].busy_total_s
                if self.timeline is not None:  # activity spans, for benchmarks/async_speedup.py
                    self.timeline.write(json.dumps({"start": t0, "end": time.time(), "purpose": msg.purpose,
                                                    "groups": len(msg.groups)}) + "\n")
                    self.timeline.flush()
                for header, frames in results:
                    self.link.send(header, frames)
        log.info("stopping: %s", self.shutdown or "signal")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="asyncrl generator worker (started by asyncrl.launch)")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--worker-id", type=int, required=True)
    ap.add_argument("--address", required=True)
    args = ap.parse_args(argv)
    cfg = from_yaml_file(Path(args.run_dir) / "config.yaml")
    setup_logging(args.run_dir, f"generator{args.worker_id}", cfg.run.log_level)
    stopping = []
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    torch.set_num_threads(cfg.generator.threads)
    torch.manual_seed(cfg.run.seed * 1000 + args.worker_id)
    engine, tok = build_engine(cfg, args.worker_id)
    link = GeneratorEndpoint.from_config(cfg.transport, args.address, args.worker_id, args.run_dir)
    link.send(Hello(worker_id=args.worker_id, version=engine.version))
    rewards = build_reward_pool(cfg)
    pid_file = Path(args.run_dir) / "logs" / f"generator{args.worker_id}.pid"  # for tests and operators
    pid_file.write_text(f"{os.getpid()}\n")
    worker = Worker(engine, tok, link, args.worker_id, rewards, cfg.debug.generator_batch_delay_s, cfg.run.seed)
    worker.env, worker.limits = build_env(cfg), episode_limits(cfg)
    check_stops(worker.env, tok, cfg.generator.engine)
    try:
        worker.tools = build_tools(cfg)
        worker.weights = build_receiver(cfg, args.run_dir, args.worker_id, urlsplit(args.address).hostname)
        worker.max_resamples = cfg.generator.max_resamples if cfg.generator.on_weight_update == "restart" else 0
        worker.timeline = (Path(args.run_dir) / "logs" / f"generator{args.worker_id}.timeline.jsonl").open("a")
        worker.serve(stop=lambda: bool(stopping))
    finally:
        worker.weights.close()
        if worker.tools is not None:
            worker.tools.close()
        rewards.close()
        link.close()
        engine.shutdown()


if __name__ == "__main__":
    main()
