"""Evaluate a checkpoint in process (no learner, no generator processes):

    python -m asyncrl.eval CONFIG.yaml --checkpoint DIR [a.b.c=value ...] [--out FILE.json]

Problems are ``data.eval_files`` (or the synthetic task's held-out set), sampled per
data_source as ``eval.*`` says (AIME / AIME25 at T=0.6), ``eval.k`` samples each, with
the sampling parameters of the learner's in-training evaluation
(``asyncrl.eval.sampling.plan``); ``eval.preset=lpreg_paper`` is the Lp-Reg paper's
protocol (AIME / AMC at T=0.6, the other sources greedy, one sample each). Samples are
episodes of ``env`` (with tools: turns and tool outputs, the tool pool started here).
Prints a markdown table and writes JSON (summary + per-problem records) to ``--out``
(default ``DIR/eval.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from asyncrl.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="asyncrl evaluation of a checkpoint")
    ap.add_argument("config", help="YAML path or shipped config name")
    ap.add_argument("--checkpoint", required=True, help="Hugging Face model directory (a run's checkpoints/step_N)")
    ap.add_argument("--out", default=None, help="JSON output (default: CHECKPOINT/eval.json)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.k=16")
    args = ap.parse_intermixed_args(argv)  # overrides may come after --checkpoint
    try:
        cfg = load_config(args.config, [*args.overrides, f"model.path={args.checkpoint}"])
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2

    import torch

    from asyncrl.data import build_eval_problems
    from asyncrl.envs import build_env, build_tools, check_stops
    from asyncrl.eval.metrics import to_markdown
    from asyncrl.eval.sampling import run_eval
    from asyncrl.generator.hf import HFEngine
    from asyncrl.models import load_model, load_tokenizer
    from asyncrl.rewards import RewardPool

    torch.set_num_threads(cfg.generator.threads)
    torch.manual_seed(cfg.run.seed)
    tok = load_tokenizer(cfg.model.path)
    engine = HFEngine(load_model(cfg.model.path, cfg.model.dtype), pad_id=tok.pad_token_id, seed=cfg.run.seed)
    problems = build_eval_problems(cfg, tok)
    env = build_env(cfg)
    check_stops(env, tok, "hf")  # the environment's delimiters: single tokens for the hf engine
    pooled = cfg.data.eval_files or cfg.task.name == "reasoning_gym"  # scorers that may hang run in processes
    rewards = RewardPool(cfg.data.reward_processes if pooled else 0, cfg.data.reward_timeout_s)
    tools = build_tools(cfg)  # env.type tools: the pool that runs the episodes' tool calls
    try:
        summary, records = run_eval(engine, tok, problems, cfg, rewards, tools=tools, env=env)
    finally:
        rewards.close()
        if tools is not None:
            tools.close()
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval.json"
    out.write_text(json.dumps({"checkpoint": args.checkpoint, "summary": summary, "records": records}, indent=1))
    print(to_markdown(summary))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
