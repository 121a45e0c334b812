"""The learner's training step with and without its single-rank shortcuts, interleaved in
one process on the same replayed quickstart batches.

    PYTHONPATH=. python benchmarks/learner_ab.py --threads 1 --rounds 6
    PYTHONPATH=. python benchmarks/learner_ab.py --threads 2 --rounds 6 --out benchmarks/results/learner_ab.json

Setups (the same weights, batches and config; each trains its own copy):
- ``before``: FSDP2 on the one rank, Hugging Face's RMSNorm forward;
- ``plain``: the plain module (what ``parallelize`` returns for one float32 rank),
  Hugging Face's RMSNorm;
- ``after``: the plain module and the one-function RMSNorm (what the learner runs).

Separate runs cannot show changes of this size on a shared CPU, whose speed drifts by
more between runs; here every round trains each batch once in every setup, in turn.
Reported: the median step (``train_on_batch``) over rounds 2..N per setup.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time

log = logging.getLogger("learner_ab")
SETUPS = ("before", "plain", "after")


def quickstart_batches(cfg, tok, engine, count: int) -> list:
    """``count`` rollout batches of the quickstart, through the generator's own code."""
    from asyncrl.data import build_train_source
    from asyncrl.generator.worker import INLINE_REWARDS, batch_seed, run_prompts
    from asyncrl.learner.batch import build_batch
    from asyncrl.learner.hub import Group
    from asyncrl.wire.codec import decode_checked, encode, trajectory_arrays
    from asyncrl.wire.schema import PromptGroup, Prompts
    from asyncrl.wire.transport import learner_limits

    g, n = cfg.generator, cfg.learner.prompts_per_step
    source = build_train_source(cfg, tok)
    batches = []
    for step in range(count):
        problems = [(i, source.problem(i)) for i in range(step * n, (step + 1) * n)]
        groups = [PromptGroup(group_id=i, prompt_ids=tok(p.prompt)["input_ids"], ground_truth=p.ground_truth,
                              data_source=p.data_source) for i, p in problems]
        msg = Prompts(groups=groups, min_version=0, n=g.samples_per_prompt, temperature=g.temperature,
                      top_p=g.top_p, max_tokens=g.max_tokens)
        engine.reseed(batch_seed(cfg.run.seed, step * n, 0))
        got = []
        for header, frames in run_prompts(engine, tok, msg, 0, rewards=INLINE_REWARDS):
            header, arrays = decode_checked([bytes(f) for f in encode(header, frames)], learner_limits())
            got.append(Group(header, trajectory_arrays(header, arrays)))
        batches.append(build_batch(got, tok.pad_token_id, cfg.algo.scale_advantages))
    return batches


def build(cfg, setup: str):
    """(policy, optimiser) as the learner builds them, then set back to ``setup``."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from asyncrl.learner.fsdp import apply_fsdp
    from asyncrl.learner.main import build_policy

    policy, opt = build_policy(cfg, torch.device("cpu"))
    if setup in ("before", "plain"):  # Hugging Face's norm: drop the per-module fused forward
        for module in policy.modules():
            module.__dict__.pop("forward", None)
    if setup == "before":
        apply_fsdp(policy, init_device_mesh("cpu", (1,)))
    return policy, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--out", default=None, help="JSON output (default: none)")
    ap.add_argument("overrides", nargs="*", help="config overrides for the quickstart")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if a.rounds < 2:
        ap.error("--rounds must be >= 2 (round 1 is warm-up)")

    import torch
    import torch.distributed as dist

    from asyncrl.algos import build_algorithm
    from asyncrl.algos.collective import dist_all_gather
    from asyncrl.config import load_config
    from asyncrl.generator.hf import HFEngine
    from asyncrl.learner.train import train_on_batch
    from asyncrl.models import load_model, load_tokenizer

    cfg = load_config("quickstart", [f"learner.threads={a.threads}", *a.overrides])
    torch.set_num_threads(a.threads)
    tok = load_tokenizer(cfg.model.path)
    engine = HFEngine(load_model(cfg.model.path, cfg.model.dtype), pad_id=tok.pad_token_id, seed=0)
    batches = quickstart_batches(cfg, tok, engine, a.batches)
    log.info("%d batches of %d samples", len(batches), batches[0].input_ids.shape[0])
    times: dict[str, list[float]] = {s: [] for s in SETUPS}
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("gloo", init_method=f"file://{store}/pg", rank=0, world_size=1)
        try:
            setups = {s: build(cfg, s) for s in SETUPS}
            algo, all_gather = build_algorithm(cfg.algo), dist_all_gather()
            for r in range(a.rounds):
                for i, batch in enumerate(batches):
                    for s, (policy, opt) in setups.items():
                        t0 = time.perf_counter()
                        train_on_batch(policy, opt, algo, batch, cfg, all_gather, step=i + 1)
                        if r:  # round 1 is warm-up
                            times[s].append(time.perf_counter() - t0)
                log.info("round %d/%d done", r + 1, a.rounds)
        finally:
            dist.destroy_process_group()
    median = {s: statistics.median(t) for s, t in times.items()}
    print(f"\nlearner step, {a.threads} thread(s), median of {len(times['after'])} (s)")
    for s in SETUPS:
        print(f"{s:8s} {median[s]:.3f}  {median[s] / median['before']:.2f}x the time of before")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"threads": a.threads, "rounds": a.rounds, "batches": a.batches, "overrides": a.overrides,
                       "median_step_s": median, "steps_s": times}, f, indent=1)


if __name__ == "__main__":
    main()
