"""Learner training throughput with variable-length responses: padded rows against
packed rows (``learner.packing``) and token-budget micro-batches.

The real ``train_on_batch`` (one gloo rank, in process) on rollout batches built by
the real ``build_batch``, whose response lengths span ``--min-len``..``--max-len``
(uniform, so 10x and more apart). Reports the padding fraction of the decoder's input
(``perf/padding_frac``, over all steps: exact and deterministic) and trained tokens per
second (real response tokens / step time), median over ``--steps`` timed steps after
one warm-up. Packed rows use ``asyncrl.learner.attention`` (one causal sdpa span per
sample) unless the setup says sdpa: transformers' dense block-diagonal mask; the last
setup also computes each group's prompt once (``learner.share_prompts``).

    PYTHONPATH=. python benchmarks/packing.py                 # table + benchmarks/results/packing.json
    PYTHONPATH=. python benchmarks/packing.py --padding-only  # the padding fractions only, no model, seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("benchmarks.packing")


def make_model(out: Path, hidden: int, layers: int, vocab: int) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from asyncrl.models import save_hf
    from asyncrl.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = Qwen3Config(vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(hidden // 128, 1),
                      head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    save_hf(Qwen3ForCausalLM(cfg), tok, out)
    return out


def rollout(seed: int, prompts: int, samples: int, lengths: tuple[int, int], vocab: int, pad_id: int):
    from asyncrl.learner.batch import build_batch
    from asyncrl.learner.hub import Group
    from asyncrl.wire.codec import SampleArrays
    from asyncrl.wire.schema import SampleMeta, TrajectoryGroup

    rng = np.random.default_rng(seed)
    groups = []
    for g in range(prompts):
        prompt = rng.integers(2, vocab, 24).tolist()
        arrays, metas = [], []
        for s in range(samples):
            n = int(rng.integers(lengths[0], lengths[1] + 1))
            arrays.append(SampleArrays(rng.integers(2, vocab, n).astype(np.int32),
                                       rng.uniform(-3, -0.1, n).astype(np.float32), np.zeros(n, np.int32)))
            metas.append(SampleMeta(num_tokens=n, reward=float(rng.random() < 0.5), finish_reason="stop"))
        groups.append(Group(TrajectoryGroup(group_id=g, worker_id=0, data_source="bench", prompt_ids=prompt,
                                            samples=metas), arrays))
    return build_batch(groups, pad_id, True)


def make_config(model_dir: Path | str, learner: dict, args):
    from asyncrl.config import Config

    return msgspec.convert({"model": {"path": str(model_dir)},
                            "generator": {"samples_per_prompt": args.samples, "max_tokens": args.max_len},
                            "learner": {"prompts_per_step": args.prompts, "lr": 1e-5, **learner},
                            "algo": {"type": args.algo}}, Config)


def padding(learner: dict, attention: str | None, args) -> float:
    """The decoder input's padding fraction over all steps' batches, as train_on_batch
    lays them out (the same micro-batches and packed rows), without running a model."""
    from asyncrl.learner.batch import rank_rows
    from asyncrl.learner.packing import row_lengths
    from asyncrl.learner.train import decoder_positions, micro_batches

    cfg = make_config("unused", learner, args)
    padded = computed = 0
    for step in range(args.steps + 1):
        batch = rollout(step, args.prompts, args.samples, (args.min_len, args.max_len), args.vocab, 0)
        lengths = row_lengths(batch.targets)
        rows = rank_rows(batch.input_ids.shape[0], cfg.learner.ppo_mini_batches, 1, 0)
        micro = [m for r in rows for m in micro_batches(r, lengths, cfg)]
        _, c, p = decoder_positions(batch, lengths, micro, cfg, shares_prompts=attention is None)
        computed, padded = computed + c, padded + p
    return padded / computed


def measure(model_dir: Path, learner: dict, attention: str | None, args) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from asyncrl.algos import build_algorithm
    from asyncrl.algos.collective import dist_all_gather
    from asyncrl.learner.fsdp import apply_fsdp
    from asyncrl.learner.policy import Policy
    from asyncrl.learner.train import train_on_batch
    from asyncrl.models import load_model

    cfg = make_config(model_dir, learner, args)
    torch.manual_seed(0)
    policy = Policy(load_model(str(model_dir), "float32"))
    if attention:
        policy.lm.set_attn_implementation(attention)
    apply_fsdp(policy, init_device_mesh("cpu", (1,)))
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learner.lr)
    algo = build_algorithm(cfg.algo)
    times, stats = [], {}
    for step in range(args.steps + 1):
        batch = rollout(step, args.prompts, args.samples, (args.min_len, args.max_len), args.vocab, 0)
        t0, c0 = time.perf_counter(), time.process_time()
        stats = train_on_batch(policy, opt, algo, batch, cfg, dist_all_gather(), step=step)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = int(batch.mask.sum())
        if step:  # step 0 warms up
            times.append((dt, tokens, cpu))
        log.info("%s step %d: %.2fs, %d tokens, padding %.1f%%", learner, step, dt, tokens,
                 100 * stats["perf/padding_frac"])
    step_s = statistics.median(t for t, _, _ in times)
    return {"learner": learner, "attention": attention or policy.lm.config._attn_implementation, "step_s": step_s,
            "tokens_per_s": statistics.median(n / t for t, n, _ in times),
            "tokens_per_cpu_s": statistics.median(n / c for _, n, c in times), "padding_frac": padding(learner, attention, args),
            "shared_frac": stats["perf/shared_frac"],
            "loss": stats["loss/total"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=30)
    ap.add_argument("--max-len", type=int, default=600)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--algo", default="grpo")
    ap.add_argument("--budget", type=int, default=8192, help="learner.max_tokens_per_micro_batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/packing.json")
    ap.add_argument("--padding-only", action="store_true", help="print the padding fractions; no model, no timing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    budget = {"micro_batch_size": 64, "max_tokens_per_micro_batch": args.budget}
    setups = {  # name: (learner settings, attention implementation or None = the policy's own)
        "padded, 16 rows per micro-batch": ({"micro_batch_size": 16}, None),
        "padded, token budget": (budget, None),
        "packed, one row per micro-batch": ({**budget, "packing": True, "share_prompts": False}, None),
        "packed, rows of 2048 tokens": ({**budget, "packing": True, "pack_row_tokens": 2048, "share_prompts": False},
                                        None),
        "packed, rows of 2048 tokens, sdpa mask": ({**budget, "packing": True, "pack_row_tokens": 2048}, "sdpa"),
        "packed, one row per micro-batch, prompts shared": ({**budget, "packing": True}, None),
    }
    if args.padding_only:
        for name, (learner, attention) in setups.items():
            print(f"{name}: padding {100 * padding(learner, attention, args):.2f}%")
        dist.destroy_process_group()
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "model", args.hidden, args.layers, args.vocab)
        results = {name: measure(model_dir, learner, attention, args) for name, (learner, attention) in setups.items()}
    dist.destroy_process_group()
    base = results["padded, 16 rows per micro-batch"]["tokens_per_s"]
    # CPU seconds (all threads) drift less than wall time when other processes share the cores
    cpu_base = results["padded, 16 rows per micro-batch"]["tokens_per_cpu_s"]
    lines = ["| setup | padding | prompt tokens shared | trained tokens/s | vs padded | step s | tokens/CPU-s | "
             "vs padded | loss |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['padding_frac']:.1f}% | {100 * r['shared_frac']:.1f}% | "
                     f"{r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / base:.2f}x | {r['step_s']:.2f} | {r['tokens_per_cpu_s']:.0f} | "
                     f"{r['tokens_per_cpu_s'] / cpu_base:.2f}x | {r['loss']:.6f} |")
    print("\n".join(lines))  # the benchmark's table
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
