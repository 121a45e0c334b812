"""GRPO, GRPO + entropy bonus, Clip-Higher and Lp-Reg on the built-in synthetic task,
several seeds each, through the real pipeline (``asyncrl.launch``).

    python benchmarks/compare_algos.py --steps 60 --seeds 0 1 2

Writes a markdown table (final held-out accuracy mean ± std, final entropy) and a PNG
with held-out accuracy and training entropy curves per algorithm. Defaults are sized
to finish in well under an hour on 2 CPU cores (smaller batches than the quickstart).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ALGOS = {
    "grpo": ["algo.type=grpo"],
    "entropy_bonus": ["algo.type=entropy_bonus"],
    "clip_higher": ["algo.type=clip_higher"],
    "lpreg": ["algo.type=lpreg"],
}


def run(algo: str, seed: int, a: argparse.Namespace) -> list[dict]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"asyncrl-{algo}-s{seed}-"))
    cmd = [sys.executable, "-m", "asyncrl.launch", "quickstart", f"run.dir={run_dir}", f"run.seed={seed}",
           f"learner.steps={a.steps}", f"learner.prompts_per_step={a.prompts}", f"learner.lr={a.lr}",
           f"learner.eval_every={a.eval_every}", f"task.eval_size={a.eval_size}", "run.console=false",
           *ALGOS[algo], *a.overrides]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarise(rows: list[dict]) -> dict:
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    train = [r for r in rows if "train/entropy" in r]
    return {"eval": evals, "entropy": [(r["step"], r["train/entropy"]) for r in train],
            "final_accuracy": evals[-1][1], "initial_accuracy": evals[0][1],
            "final_entropy": statistics.mean(r["train/entropy"] for r in train[-5:]),
            "regularised": statistics.mean(r.get("lpreg/regularised", 0.0) for r in train)}


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for algo, runs in results.items():
        for i, r in enumerate(runs):
            kw = {"label": algo} if i == 0 else {}
            color = f"C{list(results).index(algo)}"
            ax1.plot(*zip(*r["eval"]), color=color, alpha=0.8, **kw)
            ax2.plot(*zip(*r["entropy"]), color=color, alpha=0.6, lw=0.8, **kw)
    ax1.set(xlabel="step", ylabel="held-out accuracy (T=1)", title="accuracy")
    ax2.set(xlabel="step", ylabel="nats / token", title="policy entropy on trained tokens")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-size", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/compare_algos"))
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    a = ap.parse_args()
    t0 = time.time()
    results: dict[str, list[dict]] = {algo: [] for algo in a.algos}
    for seed in a.seeds:
        for algo in a.algos:
            s = summarise(run(algo, seed, a))
            results[algo].append(s)
            print(f"{algo:>14} seed {seed}: accuracy {s['initial_accuracy']:.3f} -> {s['final_accuracy']:.3f}, "
                  f"entropy {s['final_entropy']:.3f} [{time.time() - t0:.0f}s]", flush=True)
    lines = ["| algorithm | final held-out accuracy (mean ± std) | final entropy (nats/token) | seeds |",
             "| --- | --- | --- | --- |"]
    for algo, runs in results.items():
        acc = [r["final_accuracy"] for r in runs]
        ent = [r["final_entropy"] for r in runs]
        lines.append(f"| {algo} | {statistics.mean(acc):.3f} ± {statistics.pstdev(acc):.3f} | "
                     f"{statistics.mean(ent):.3f} ± {statistics.pstdev(ent):.3f} | {len(runs)} |")
    table = "\n".join(lines)
    print("\n" + table)
    print(f"\nbase accuracy {results[a.algos[0]][0]['initial_accuracy']:.3f}; wall {time.time() - t0:.0f}s; "
          f"settings: {a.steps} steps x {a.prompts} prompts x 8 samples, lr {a.lr}, eval on {a.eval_size} problems")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"settings": vars(a), "wall_s": time.time() - t0,
                                                    "results": results}, indent=1))
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
