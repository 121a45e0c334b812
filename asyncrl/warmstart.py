"""Reproducible warm-start of the built-in model: a short supervised pass on reference
responses, from random weights.

No pretrained weights can be downloaded, so the embedded runs start from such a base.
It is stopped early on purpose: the base should solve some problems (RL needs reward
signal) but far from all of them (RL needs room to improve).

    python -m asyncrl.warmstart                      # arith -> asyncrl/assets/quickstart-base
    python -m asyncrl.warmstart --task countdown     # -> asyncrl/assets/countdown-base

``--task arith`` trains on the addition task's own column-by-column solutions.
``--task CONFIG`` (a shipped config name such as ``countdown``, or a YAML path) takes a
reasoning-gym task with compact prompts from that config and trains on search traces
from a small solver (``asyncrl.tasks.compact``: missed chains, then a solution, then
its ``<answer>`` tag). Its problems come from a stream of their own that skips the
config's held-out split, and the held-out accuracy it reports is measured the way the
RL run measures it at step 0: that split, ``generator.temperature`` and
``generator.max_tokens``, scored by the dataset's own ``score_answer``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("asyncrl.warmstart")

# Per task: the settings the shipped bases were made with (each flag overrides one).
DEFAULTS = {
    "arith": dict(out="asyncrl/assets/quickstart-base", steps=350, batch=64, lr=1e-3, seed=1234, eval_every=350,
                  eval_size=512, max_trials=0),
    "countdown": dict(out="asyncrl/assets/countdown-base", steps=400, batch=64, lr=1e-3, seed=1234, eval_every=200,
                      eval_size=512, max_trials=2),
}
Pairs = Callable[[int], list[tuple[str, str]]]  # step -> [(prompt, response)]


def evaluate(model, tok, task, seed: int, size: int, temperature: float, max_tokens: int) -> float:
    """arith: sampled accuracy on ``size`` problems of seed ``seed``."""
    from asyncrl.generator.engine import SamplingParams
    from asyncrl.generator.hf import HFEngine
    from asyncrl.tasks import verify

    engine = HFEngine(model, pad_id=tok.pad_token_id, seed=seed)
    problems = [task.sample(seed, i) for i in range(size)]
    params = SamplingParams(n=1, max_tokens=max_tokens, temperature=temperature, stop_token_ids=(tok.eos_token_id,))
    outs = engine.generate([tok(p.prompt)["input_ids"] for p in problems], params)
    texts = [tok.decode(o[0].token_ids, skip_special_tokens=True) for o in outs]
    hits = [verify(p.data_source, t, p.ground_truth) for p, t in zip(problems, texts)]
    model.train()
    return sum(hits) / len(hits)


def evaluate_held_out(model, tok, cfg, problems, seed: int) -> float:
    """reasoning-gym: accuracy (score 1.0) on the config's held-out split, sampled as the
    RL run samples it, scored in a process pool (a scorer can hang on an odd answer)."""
    from asyncrl.eval.sampling import run_eval
    from asyncrl.generator.hf import HFEngine
    from asyncrl.rewards import RewardPool

    pool = RewardPool(processes=2, timeout_s=cfg.data.reward_timeout_s)
    try:
        summary, _ = run_eval(HFEngine(model, pad_id=tok.pad_token_id, seed=seed), tok, problems, cfg, pool)
    finally:
        pool.close()
    model.train()
    return summary["average"]["mean@1"]


def arith_pairs(args, task) -> Pairs:
    sft_seed = args.seed + 7919  # SFT problems use their own seed, disjoint from the RL training and eval seeds

    def pairs(step: int) -> list[tuple[str, str]]:
        problems = (task.sample(sft_seed, step * args.batch + i) for i in range(args.batch))
        return [(p.prompt, p.solution) for p in problems]

    return pairs


def trace_pairs(args, rg_task) -> Pairs:
    """Search traces for the warm-start stream of a compact reasoning-gym task."""
    from asyncrl.tasks.compact import trace

    stream = rg_task.stream(args.seed, warmstart=True)
    ops = tuple(rg_task.specs[0].config.get("operators", ("+", "-", "*", "/")))

    def pairs(step: int) -> list[tuple[str, str]]:
        out = []
        for i in range(args.batch):
            entry = stream.entry(step * args.batch + i)
            m = entry["metadata"]
            rng = random.Random(f"{args.seed}/{step}/{i}")  # str seeds hash deterministically
            response = trace(m["numbers"], m.get("target", 24), rng, args.max_trials, ops)
            if response is not None:  # every countdown and puzzle24 problem has one; keep the guard
                out.append((rg_task.render(entry), response))
        return out

    return pairs


def sft_step(model, opt, sched, tok, pairs: list[tuple[str, str]]) -> float:
    """One supervised step: cross-entropy on the response (and <eos>), not the prompt."""
    import torch

    rows, labels = [], []
    for prompt, response in pairs:
        p = tok(prompt)["input_ids"]
        r = tok(response)["input_ids"] + [tok.eos_token_id]
        rows.append(p + r)
        labels.append([-100] * len(p) + r)
    L = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (L - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (L - len(r)) for r in labels])
    loss = model(input_ids=ids, labels=lab).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.item()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="arith", help="arith, or a config (shipped name or YAML) with a compact "
                    "reasoning-gym task, e.g. countdown")
    ap.add_argument("--out")
    ap.add_argument("--terms", type=int, default=3, help="arith")
    ap.add_argument("--digits", type=int, default=3, help="arith")
    ap.add_argument("--max-trials", type=int, help="reasoning-gym: most missed chains before the solution in a trace")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--eval-size", type=int)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for k, v in DEFAULTS.get(args.task, DEFAULTS["countdown"]).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch
    from transformers import Qwen3ForCausalLM

    from asyncrl.models import save_hf, tiny_qwen3_config
    from asyncrl.tasks.tokenizer import ASCII, build_char_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.task == "arith":
        from asyncrl.tasks import build_task

        tok = build_char_tokenizer()
        task = build_task("arith", terms=args.terms, digits=args.digits)
        pairs = arith_pairs(args, task)
        def held_out(m):
            return evaluate(m, tok, task, seed=args.seed + 1, size=args.eval_size, temperature=1.0, max_tokens=64)
    else:
        tok = build_char_tokenizer(ASCII)
        pairs, held_out = reasoning_gym_setup(args, tok)
    model = Qwen3ForCausalLM(tiny_qwen3_config(len(tok), tok.eos_token_id, tok.pad_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    log.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    history, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        loss = sft_step(model, opt, sched, tok, pairs(step))
        if step % 50 == 0:
            log.info("step %d/%d loss %.4f [%.0fs]", step, args.steps, loss, time.time() - t0)
        if step % args.eval_every == 0 or step == args.steps:
            acc = held_out(model)
            history.append({"step": step, "loss": loss, "accuracy_t1": acc})
            log.info("step %d loss %.4f sampled accuracy (T=1) %.3f  [%.0fs]", step, loss, acc, time.time() - t0)
    save_hf(model, tok, args.out)
    Path(args.out, "warmstart.json").write_text(json.dumps({"args": vars(args), "history": history}, indent=1))
    log.info("saved %s", args.out)


def reasoning_gym_setup(args, tok) -> tuple[Pairs, Callable]:
    """(SFT pairs, held-out evaluation) for a compact reasoning-gym task named by a config."""
    import msgspec

    from asyncrl.config import load_config
    from asyncrl.tasks.reasoning_gym import ReasoningGymTask

    cfg = load_config(args.task, [f"task.eval_size={args.eval_size}"])
    if cfg.task.name != "reasoning_gym" or cfg.task.prompt != "compact" or not isinstance(cfg.task.dataset, str):
        raise SystemExit(f"--task {args.task}: the warm-start needs task.name=reasoning_gym, task.prompt=compact "
                         f"and one dataset (got {msgspec.json.encode(cfg.task).decode()})")
    rg_task = ReasoningGymTask(cfg.task)
    problems = rg_task.eval_problems()
    return trace_pairs(args, rg_task), lambda m: evaluate_held_out(m, tok, cfg, problems, seed=args.seed + 1)


if __name__ == "__main__":
    main()
