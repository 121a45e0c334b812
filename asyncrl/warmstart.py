"""Reproducible warm-start of the built-in model: a short supervised pass on the task's
own reference solutions, from random weights.

No pretrained weights can be downloaded, so the quickstart starts from this base. It is
stopped early on purpose: the base should solve some problems (RL needs reward signal)
but far from all of them (RL needs room to improve).

    python -m asyncrl.warmstart --out asyncrl/assets/quickstart-base
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("asyncrl.warmstart")


def evaluate(model, tok, task, seed: int, size: int, temperature: float, max_tokens: int) -> float:
    from asyncrl.generator.engine import SamplingParams
    from asyncrl.generator.hf import HFEngine
    from asyncrl.tasks import verify

    engine = HFEngine(model, pad_id=tok.pad_token_id, seed=seed)
    problems = [task.sample(seed, i) for i in range(size)]
    params = SamplingParams(n=1, max_tokens=max_tokens, temperature=temperature, stop_token_ids=(tok.eos_token_id,))
    outs = engine.generate([tok(p.prompt)["input_ids"] for p in problems], params)
    hits = [verify(p.data_source, tok.decode(o[0].token_ids, skip_special_tokens=True), p.ground_truth) for p, o in zip(problems, outs)]
    model.train()
    return sum(hits) / len(hits)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="asyncrl/assets/quickstart-base")
    ap.add_argument("--terms", type=int, default=3)
    ap.add_argument("--digits", type=int, default=3)
    ap.add_argument("--steps", type=int, default=350)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--eval-every", type=int, default=350)
    ap.add_argument("--eval-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch
    from transformers import Qwen3ForCausalLM

    from asyncrl.models import save_hf, tiny_qwen3_config
    from asyncrl.tasks import build_task
    from asyncrl.tasks.tokenizer import build_char_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = build_char_tokenizer()
    task = build_task("arith", terms=args.terms, digits=args.digits)
    model = Qwen3ForCausalLM(tiny_qwen3_config(len(tok), tok.eos_token_id, tok.pad_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    # SFT problems use their own seed, disjoint from the RL training and eval seeds
    sft_seed = args.seed + 7919
    log.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    history, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        rows, labels = [], []
        for i in range(args.batch):
            p = task.sample(sft_seed, step * args.batch + i)
            prompt = tok(p.prompt)["input_ids"]
            resp = tok(p.solution)["input_ids"] + [tok.eos_token_id]
            rows.append(prompt + resp)
            labels.append([-100] * len(prompt) + resp)
        L = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (L - len(r)) for r in rows])
        lab = torch.tensor([r + [-100] * (L - len(r)) for r in labels])
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            log.info("step %d/%d loss %.4f [%.0fs]", step, args.steps, loss.item(), time.time() - t0)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model, tok, task, seed=args.seed + 1, size=args.eval_size, temperature=1.0, max_tokens=64)
            history.append({"step": step, "loss": loss.item(), "accuracy_t1": acc})
            log.info("step %d loss %.4f sampled accuracy (T=1) %.3f  [%.0fs]", step, loss.item(), acc, time.time() - t0)
    save_hf(model, tok, args.out)
    Path(args.out, "warmstart.json").write_text(json.dumps({"args": vars(args), "history": history}, indent=1))
    log.info("saved %s", args.out)


if __name__ == "__main__":
    main()
