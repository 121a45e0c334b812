"""Where a quickstart step's time goes: every stage of asyncrl's on-policy step, run one
after another in one process with the roles' own code, timed alone (wall and CPU).

    python benchmarks/step_profile.py --steps 8 --threads 2
    python benchmarks/step_profile.py --steps 8 --keep-finished     # the decode loop before rows left the batch

Stages, per rollout batch of the quickstart (32 prompts x 8 samples, T = 1, 64 tokens):
- ``decode``: the hf engine's decode loop (``HFEngine.generate``);
- ``reward+frames``: the rest of the generator's ``run_prompts``: decoding the tokens
  to text, the verifier, the trajectory frames;
- ``hop``: the wire in between, without the sockets: encoding each group's message,
  the learner endpoint's checked decode and the hub's arrays (``trajectory_arrays``);
- ``build_batch``: groups -> padded tensors and advantages;
- ``train``: ``train_on_batch`` (forward, backward, optimiser step);
- ``publish``: ``full_state_dict``, the weight frames of the one bucket, their checked
  decode and ``HFEngine.load_weights``.

What this leaves out is the cost of two processes: ZeroMQ's copies and wake-ups and
the idle gaps between them (compare the step time here with ``benchmarks/peers.py``'s).
Reported: mean wall and CPU seconds per step over steps 2..N, and each stage's share.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("step_profile")


class Clock:
    """Wall and process-CPU seconds per stage, per step."""

    def __init__(self) -> None:
        self.rows: list[dict[str, tuple[float, float]]] = []

    def step(self) -> None:
        self.rows.append(defaultdict(lambda: (0.0, 0.0)))

    def time(self, stage: str, fn, *args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        dw, dc = time.perf_counter() - w, time.process_time() - c
        w0, c0 = self.rows[-1][stage]
        self.rows[-1][stage] = (w0 + dw, c0 + dc)
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        later = self.rows[1:] or self.rows  # step 1 is warm-up
        stages = list(self.rows[0])
        out = {s: {"wall_s": statistics.mean(r[s][0] for r in later), "cpu_s": statistics.mean(r[s][1] for r in later)}
               for s in stages}
        total = sum(v["wall_s"] for v in out.values())
        for v in out.values():
            v["share"] = v["wall_s"] / total
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-finished", action="store_true", help="finished rows stay in the decoder's batch")
    ap.add_argument("--out", default=None, help="JSON output (default: none)")
    ap.add_argument("overrides", nargs="*", help="config overrides for the quickstart, e.g. learner.packing=true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch
    import torch.distributed as dist

    from asyncrl.algos import build_algorithm
    from asyncrl.algos.collective import dist_all_gather
    from asyncrl.config import load_config
    from asyncrl.data import build_train_source
    from asyncrl.generator.hf import HFEngine
    from asyncrl.generator.worker import INLINE_REWARDS, batch_seed, run_prompts
    from asyncrl.learner.batch import build_batch
    from asyncrl.learner.checkpoint import full_state_dict
    from asyncrl.learner.hub import Group
    from asyncrl.learner.main import build_policy, publishable
    from asyncrl.learner.train import train_on_batch
    from asyncrl.models import load_model, load_tokenizer
    from asyncrl.wire.codec import decode_checked, encode, trajectory_arrays, weight_frames, weight_tensors
    from asyncrl.wire.schema import PromptGroup, Prompts
    from asyncrl.wire.transport import generator_limits, learner_limits

    cfg = load_config("quickstart", [f"run.seed={a.seed}", f"learner.threads={a.threads}",
                                     f"generator.threads={a.threads}", *a.overrides])
    torch.set_num_threads(a.threads)
    g, lc = cfg.generator, cfg.learner
    tok = load_tokenizer(cfg.model.path)
    engine = HFEngine(load_model(cfg.model.path, cfg.model.dtype), pad_id=tok.pad_token_id,
                      seed=cfg.run.seed * 1000, drop_finished=not a.keep_finished)
    source = build_train_source(cfg, tok)
    clock = Clock()
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("gloo", init_method=f"file://{store}/pg", rank=0, world_size=1)
        try:
            policy, opt = build_policy(cfg, torch.device("cpu"))
            algo, all_gather = build_algorithm(cfg.algo), dist_all_gather()
            generate = engine.generate
            engine.generate = lambda *args, **kw: clock.time("decode", generate, *args, **kw)
            for step in range(1, a.steps + 1):
                clock.step()
                first = (step - 1) * lc.prompts_per_step
                groups = [PromptGroup(group_id=i, prompt_ids=tok(p.prompt)["input_ids"], ground_truth=p.ground_truth,
                                      data_source=p.data_source)
                          for i, p in ((i, source.problem(i)) for i in range(first, first + lc.prompts_per_step))]
                msg = Prompts(groups=groups, min_version=step - 1, n=g.samples_per_prompt, temperature=g.temperature,
                              top_p=g.top_p, max_tokens=g.max_tokens)
                engine.reseed(batch_seed(cfg.run.seed, first, engine.version))
                results = clock.time("reward+frames", run_prompts, engine, tok, msg, 0, rewards=INLINE_REWARDS)
                w, c = clock.rows[-1]["reward+frames"]  # minus the decode inside it
                dw, dc = clock.rows[-1]["decode"]
                clock.rows[-1]["reward+frames"] = (w - dw, c - dc)

                def hop(results=results):
                    out = []
                    for header, frames in results:
                        wire = [bytes(f) for f in encode(header, frames)]
                        got, arrays = decode_checked(wire, learner_limits())
                        out.append(Group(got, trajectory_arrays(got, arrays)))
                    return out

                received = clock.time("hop", hop)
                batch = clock.time("build_batch", build_batch, received, tok.pad_token_id, cfg.algo.scale_advantages)
                stats = clock.time("train", train_on_batch, policy, opt, algo, batch, cfg, all_gather, step=step)

                def publish(step=step):
                    named = publishable(full_state_dict(policy), policy)
                    notice, frames = weight_frames(named, step)
                    wire = [bytes(f) for f in encode(notice, frames)]
                    got, arrays = decode_checked(wire, generator_limits())
                    engine.load_weights(weight_tensors(got, arrays), step)

                clock.time("publish", publish)
                log.info("step %d: reward %.3f, response length %.1f, grad norm %.3f, %.2f s", step,
                         batch.rewards.mean().item(), batch.mask.sum(-1).float().mean().item(),
                         stats["train/grad_norm"], sum(w for w, _ in clock.rows[-1].values()))
        finally:
            dist.destroy_process_group()
    summary = clock.summary()
    step_s = sum(v["wall_s"] for v in summary.values())
    print(f"\n{'stage':<15}{'wall s':>9}{'cpu s':>9}{'share':>8}")
    for stage, v in summary.items():
        print(f"{stage:<15}{v['wall_s']:>9.3f}{v['cpu_s']:>9.3f}{v['share']:>8.1%}")
    print(f"{'step':<15}{step_s:>9.3f}{'':>9}{'':>8}  -> {lc.prompts_per_step * g.samples_per_prompt / step_s:.1f} "
          f"trained samples/s in one process, {a.threads} threads")
    if a.out:
        Path(a.out).write_text(json.dumps({"settings": vars(a), "stages": summary, "step_s": step_s}, indent=1))


if __name__ == "__main__":
    main()
