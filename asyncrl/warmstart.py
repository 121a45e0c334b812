"""Reproducible warm-start of the built-in model: a short supervised pass on reference
responses, from random weights.

No pretrained weights can be downloaded, so the embedded runs start from such a base.
It is stopped early on purpose: the base should solve some problems (RL needs reward
signal) but far from all of them (RL needs room to improve).

    python -m asyncrl.warmstart                      # arith -> asyncrl/assets/quickstart-base
    python -m asyncrl.warmstart --task countdown     # -> asyncrl/assets/countdown-base
    python -m asyncrl.warmstart --task calc_tool     # -> asyncrl/assets/calc-tool-base
    python -m asyncrl.warmstart --task spark         # -> asyncrl/assets/spark-base

``--task arith`` trains on the addition task's own column-by-column solutions.
``--task spark`` trains on the spark testbed's search traces (``asyncrl.tasks.spark``:
a warm-start mix with few hard problems, so multiplication is a rare move) and reports
sampled accuracy on the testbed's held-out split.
``--task calc_tool`` trains on tool-use traces of the calculator task (asyncrl/tasks/calc_tool.py):
some answer directly, some call the calculator well, some make a malformed call; the
calculator's observations in them are given, not predicted (masked out of the loss).
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
    "calc_tool": dict(out="asyncrl/assets/calc-tool-base", steps=300, batch=64, lr=1e-3, seed=1234, eval_every=300,
                      eval_size=512, max_trials=0),
    "countdown": dict(out="asyncrl/assets/countdown-base", steps=400, batch=64, lr=1e-3, seed=1234, eval_every=200,
                      eval_size=512, max_trials=2),
    "spark": dict(out="asyncrl/assets/spark-base", steps=600, batch=64, lr=1e-3, seed=1234, eval_every=200,
                  eval_size=512, max_trials=0),
}
# a response: its text, or (text, trained) segments where the environment wrote some of it
Response = str | list[tuple[str, bool]]
Pairs = Callable[[int], list[tuple[str, Response]]]  # step -> [(prompt, response)]


def evaluate(model, tok, task, seed: int, size: int, temperature: float, max_tokens: int,
             problem_seed: int | None = None) -> float:
    """arith, spark: sampled accuracy on ``size`` problems of seed ``problem_seed`` (default
    ``seed``; the spark task's held-out split is any negative seed)."""
    from asyncrl.generator.engine import SamplingParams
    from asyncrl.generator.hf import HFEngine
    from asyncrl.tasks import verify

    engine = HFEngine(model, pad_id=tok.pad_token_id, seed=seed)
    problems = [task.sample(seed if problem_seed is None else problem_seed, i) for i in range(size)]
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


def response_tokens(tok, response: Response) -> tuple[list[int], list[int]]:
    """(ids, labels) of a response and its <eos>: a string is trained on throughout; a
    list of (text, trained) segments -- a tool-use trace -- has the environment's
    segments (trained=False: observations, given rather than predicted) labelled -100."""
    segments = [(response, True)] if isinstance(response, str) else response
    ids, labels = [], []
    for text, trained in segments:
        seg = tok(text, add_special_tokens=False)["input_ids"]
        ids += seg
        labels += seg if trained else [-100] * len(seg)
    return ids + [tok.eos_token_id], labels + [tok.eos_token_id]


def sft_step(model, opt, sched, tok, pairs: list[tuple[str, Response]]) -> float:
    """One supervised step: cross-entropy on the response's model tokens (and <eos>), not
    on the prompt or on environment observations."""
    import torch

    rows, labels = [], []
    for prompt, response in pairs:
        p = tok(prompt)["input_ids"]
        r, lab = response_tokens(tok, response)
        rows.append(p + r)
        labels.append([-100] * len(p) + lab)
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
    ap.add_argument("--task", default="arith", help="arith, calc_tool, or a config (shipped name or YAML) with "
                    "a compact reasoning-gym task, e.g. countdown")
    ap.add_argument("--out")
    ap.add_argument("--terms", type=int, default=3, help="arith, calc_tool")
    ap.add_argument("--digits", type=int, default=3, help="arith, calc_tool")
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
    elif args.task == "spark":
        tok, pairs, held_out = spark_setup(args)
    elif args.task == "calc_tool":
        from asyncrl.tasks.calc_tool import CHARS

        tok = build_char_tokenizer(CHARS)
        pairs, held_out = calc_tool_setup(args, tok)
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


def spark_setup(args) -> tuple:
    """(tokenizer, SFT pairs, held-out evaluation) for the spark testbed: traces from the
    warm-start mix (few hard problems), accuracy on the RL mix's held-out split sampled
    as the shipped config samples it (T=1, spark.yaml's generator.max_tokens)."""
    from asyncrl.config import load_config
    from asyncrl.tasks import spark
    from asyncrl.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(spark.CHARS)
    max_tokens = load_config("spark").generator.max_tokens
    pairs = arith_pairs(args, spark.SparkTask(hard_frac=spark.SFT_HARD_FRAC))

    def held_out(m):
        return evaluate(m, tok, spark.SparkTask(), seed=args.seed + 1, size=args.eval_size, temperature=1.0,
                        max_tokens=max_tokens, problem_seed=-1)

    return tok, pairs, held_out


def calc_tool_setup(args, tok) -> tuple[Pairs, Callable]:
    """(SFT traces, held-out evaluation) of the calculator tool-use task: traces that answer
    directly, call the calculator well, or make a malformed call (``asyncrl.tasks.calc_tool.trace``;
    the observations are masked out of the loss); evaluated as episodes with the real
    calculator, on the held-out split of ``configs/calc_tool.yaml`` (run.seed 0), sampled at
    its temperature and token budget."""
    from asyncrl.config import load_config
    from asyncrl.envs.calc import evaluate
    from asyncrl.generator.hf import HFEngine
    from asyncrl.tasks.calc_tool import CalcToolTask, terms_of, trace
    from asyncrl.tools import ToolPool

    cfg = load_config("calc_tool", [f"task.eval_size={args.eval_size}"])
    task = CalcToolTask(terms=args.terms, digits=args.digits)
    sft_seed = args.seed + 7919  # disjoint from the RL run's training (run.seed) and held-out (-1 - run.seed) seeds
    problems = [task.sample(-1 - cfg.run.seed, i) for i in range(args.eval_size)]

    def pairs(step: int) -> list[tuple[str, Response]]:
        out = []
        for i in range(args.batch):
            p = task.sample(sft_seed, step * args.batch + i)
            out.append((p.prompt, trace(terms_of(p.prompt), random.Random(f"{args.seed}/{step}/{i}"))))
        return out

    def held_out(model) -> float:
        with ToolPool(processes=1, timeout_s=cfg.env.tool_timeout_s, max_output_chars=cfg.env.max_output_chars) as pool:
            got = evaluate(HFEngine(model, pad_id=tok.pad_token_id, seed=args.seed + 1), tok, problems,
                           cfg.generator.max_tokens, cfg.generator.temperature, pool, cfg.env.max_turns)
        model.train()
        log.info("held-out: %s", {k: round(v, 4) for k, v in got.items()})
        return got["accuracy"]

    return pairs, held_out


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
