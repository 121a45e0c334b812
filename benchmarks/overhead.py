"""The framework's tax: trained samples/s of asyncrl (on-policy, quickstart settings)
against a minimal single-process GRPO loop written here (same model, task, batch,
sampler, optimiser). Target: asyncrl >= 70% of the minimal loop.

    python benchmarks/overhead.py --steps 20 --out benchmarks/results/overhead.json

Both runs train the same number of rollout batches; the first step of each is a
warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def minimal_loop(steps: int, prompts: int, n: int, lr: float, max_tokens: int, threads: int, seed: int) -> float:
    """A plain GRPO loop: sample, score, group-normalise, one clipped step. Returns trained samples/s."""
    import torch

    from asyncrl.generator.engine import SamplingParams
    from asyncrl.generator.hf import HFEngine
    from asyncrl.models import load_model, load_tokenizer
    from asyncrl.tasks import build_task, verify

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tok = load_tokenizer("builtin:quickstart-base")
    model = load_model("builtin:quickstart-base")
    engine = HFEngine(model, pad_id=tok.pad_token_id, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    task = build_task("arith", terms=3, digits=3)
    params = SamplingParams(n=n, max_tokens=max_tokens, temperature=1.0, stop_token_ids=(tok.eos_token_id,))
    t_start = None
    for step in range(steps):
        if step == 1:
            t_start = time.time()
        problems = [task.sample(seed, step * prompts + i) for i in range(prompts)]
        prompt_ids = [tok(p.prompt)["input_ids"] for p in problems]
        outs = engine.generate(prompt_ids, params)
        rows, rewards = [], []
        for p, ids, comps in zip(problems, prompt_ids, outs):
            for c in comps:
                rows.append((ids, c.token_ids))
                rewards.append(verify(p.data_source, tok.decode(c.token_ids, skip_special_tokens=True), p.ground_truth))
        r = torch.tensor(rewards).view(prompts, n)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)
        L = max(len(a) + len(b) for a, b in rows) - 1
        ids = torch.full((len(rows), L), tok.pad_token_id)
        tgt = torch.full((len(rows), L), -100)
        for i, (a, b) in enumerate(rows):
            seq = torch.tensor(a + b)
            ids[i, : len(seq) - 1] = seq[:-1]
            tgt[i, len(a) - 1 : len(seq) - 1] = seq[len(a) :]
        model.train()
        logits = model(input_ids=ids).logits.float()
        mask = tgt != -100
        lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
        ratio = torch.exp(lp - lp.detach())  # on-policy: one step, old = current
        a = adv[:, None]
        pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
        loss = (pg * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.eval()
    return (steps - 1) * prompts * n / (time.time() - t_start)


def asyncrl_run(steps: int, prompts: int, n: int, lr: float, max_tokens: int, seed: int) -> float:
    run_dir = Path(tempfile.mkdtemp(prefix="asyncrl-overhead-"))
    cmd = [sys.executable, "-m", "asyncrl.launch", "quickstart", f"run.dir={run_dir}", f"learner.steps={steps}",
           f"learner.prompts_per_step={prompts}", f"generator.samples_per_prompt={n}", f"learner.lr={lr}",
           f"generator.max_tokens={max_tokens}", f"run.seed={seed}", "task.eval_size=8", "run.console=false"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["time_s"] for r in rows if "train/reward_mean" in r}
    return (steps - 1) * prompts * n / (train[steps] - train[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/overhead.json"))
    a = ap.parse_args()
    minimal = minimal_loop(a.steps, a.prompts, a.n, a.lr, a.max_tokens, a.threads, a.seed)
    framework = asyncrl_run(a.steps, a.prompts, a.n, a.lr, a.max_tokens, a.seed)
    ratio = framework / minimal
    print(f"{'loop':<22}{'trained samples/s':>20}")
    print(f"{'minimal single-file':<22}{minimal:>20.1f}")
    print(f"{'asyncrl (on-policy)':<22}{framework:>20.1f}")
    print(f"asyncrl / minimal = {ratio:.2f} (target >= 0.70)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(a), "minimal_samples_per_s": minimal,
                               "asyncrl_samples_per_s": framework, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
