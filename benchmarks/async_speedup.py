"""What asynchrony buys: the same model, task and number of trained samples with
max_staleness k = 0 (on-policy) against k = 1 and 2, on this machine.

    python benchmarks/async_speedup.py --steps 30 --seeds 0 1 2

Reports trained samples/s (steps 2..N, the first is warm-up), its ratio to k = 0, the
learner's idle fraction (waiting for trajectories), the generators' busy fraction and
the final held-out accuracy; writes a table, JSON and a PNG timeline of generator and
learner activity (first seed). On-policy runs give each role all cores (they take
turns); asynchronous runs split the cores between the two roles that now overlap.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from asyncrl.config import from_yaml_file

ROOT = Path(__file__).resolve().parents[1]


def run(k: int, seed: int, steps: int, threads: int, borrow: int, extra: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"asyncrl-k{k}-s{seed}-"))
    cmd = [sys.executable, "-m", "asyncrl.launch", "quickstart", f"run.dir={run_dir}", f"learner.steps={steps}",
           f"learner.max_staleness={k}", f"run.seed={seed}", f"learner.threads={threads}",
           f"learner.borrow_threads={borrow}", f"generator.threads={threads}", "run.console=false", *extra]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/reward_mean" in r]
    cfg = from_yaml_file(run_dir / "config.yaml")
    trained = (len(train) - 1) * cfg.learner.prompts_per_step * cfg.generator.samples_per_prompt  # steps 2..N
    span = train[-1]["time/train_end"] - train[0]["time/train_end"]
    gen_spans = [json.loads(l) for l in (run_dir / "logs" / "generator0.timeline.jsonl").read_text().splitlines()]
    t_lo, t_hi = train[0]["time/train_end"], train[-1]["time/train_end"]
    gen_busy = sum(max(0.0, min(s["end"], t_hi) - max(s["start"], t_lo)) for s in gen_spans)
    learner_idle = sum(r["time/train_start"] - r["time/step_start"] for r in train[1:])
    return {
        "k": k, "seed": seed, "samples_per_s": trained / span,
        "learner_idle_frac": learner_idle / span, "generator_busy_frac": gen_busy / span,
        "final_accuracy": rows[-1]["eval/accuracy"], "initial_accuracy": rows[0]["eval/accuracy"],
        "lag_mean": statistics.mean(r["async/lag_mean"] for r in train),
        "borrowed_frac": statistics.mean(r["perf/borrowed_frac"] for r in train[1:]) if borrow else 0.0,
        "dropped": train[-1]["async/dropped_total"],
        "timeline": {"learner": [(r["time/step_start"], r["time/train_start"], r["time/train_end"]) for r in train],
                     "generator": [(s["start"], s["end"], s["purpose"]) for s in gen_spans]},
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = {}
    for r in results:
        first.setdefault(r["k"], r)
    fig, axes = plt.subplots(len(first), 1, figsize=(11, 1.6 * len(first) + 0.8), sharex=False, squeeze=False)
    for ax, (k, r) in zip(axes[:, 0], sorted(first.items())):
        tl = r["timeline"]
        t0 = tl["learner"][0][0]
        t_end = tl["learner"][min(len(tl["learner"]) - 1, 12)][2]  # the first dozen steps
        for s, e, purpose in tl["generator"]:
            if s < t_end:
                ax.broken_barh([(s - t0, e - s)], (10, 8), color="tab:orange" if purpose == "train" else "tab:gray")
        for s, mid, e in tl["learner"]:
            if s < t_end:
                ax.broken_barh([(mid - t0, e - mid)], (0, 8), color="tab:blue")
        ax.set_yticks([4, 14], ["learner", "generator"])
        ax.set_xlim(0, t_end - t0)
        ax.set_title(f"max_staleness={k}: {r['samples_per_s']:.0f} samples/s", fontsize=9)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sync-threads", type=int, default=2, help="threads per role when k = 0 (roles take turns)")
    ap.add_argument("--async-threads", type=int, default=1, help="threads per role when k > 0 (roles overlap)")
    ap.add_argument("--borrow", type=int, default=1,
                    help="learner.borrow_threads when k > 0: threads the learner borrows while the generator idles")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/async_speedup"))
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    a = ap.parse_args()
    results = []
    for seed in a.seeds:
        for k in a.ks:
            r = run(k, seed, a.steps, a.sync_threads if k == 0 else a.async_threads, 0 if k == 0 else a.borrow,
                    a.overrides)
            results.append(r)
            print(f"k={k} seed={seed}: {r['samples_per_s']:.1f} samples/s, learner idle {r['learner_idle_frac']:.2f}, "
                  f"final accuracy {r['final_accuracy']:.3f}", flush=True)
    base = statistics.mean(r["samples_per_s"] for r in results if r["k"] == 0) if 0 in a.ks else None
    rows = []
    print(f"\n{'k':>2} {'samples/s':>10} {'x k=0':>6} {'learner idle':>13} {'gen busy':>9} {'lag':>5} "
          f"{'final acc (mean ± sd)':>22}")
    for k in a.ks:
        rs = [r for r in results if r["k"] == k]
        sps = statistics.mean(r["samples_per_s"] for r in rs)
        acc = [r["final_accuracy"] for r in rs]
        row = {"k": k, "samples_per_s": sps, "speedup": sps / base if base else None,
               "learner_idle_frac": statistics.mean(r["learner_idle_frac"] for r in rs),
               "generator_busy_frac": statistics.mean(r["generator_busy_frac"] for r in rs),
               "lag_mean": statistics.mean(r["lag_mean"] for r in rs),
               "final_accuracy_mean": statistics.mean(acc), "final_accuracy_sd": statistics.pstdev(acc),
               "seeds": len(rs)}
        rows.append(row)
        print(f"{k:>2} {sps:>10.1f} {row['speedup'] or 0:>6.2f} {row['learner_idle_frac']:>13.2f} "
              f"{row['generator_busy_frac']:>9.2f} {row['lag_mean']:>5.2f} "
              f"{row['final_accuracy_mean']:>14.3f} ± {row['final_accuracy_sd']:.3f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": vars(a), "summary": rows, "runs": [
        {k: v for k, v in r.items() if k != "timeline"} for r in results]}, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
