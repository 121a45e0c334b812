"""What asynchrony buys: the same model, task and number of trained samples with
max_staleness k = 0 (on-policy) against k = 1 and 2, on this machine.

    python benchmarks/async_speedup.py --steps 30 --seeds 0 1 2

Reports trained samples/s (steps 2..N, the first is warm-up), its ratio to k = 0, the
learner's idle fraction (waiting for trajectories), the generators' busy fraction, the
share of training time the learner ran on borrowed cores and the final held-out
accuracy; writes a table, JSON and a PNG timeline of generator and learner activity
(first seed).

Core placement per setup (2 cores; --cores to change):
- k=0: each role gets all cores (they take turns), the strongest on-policy baseline;
- k=0 split: each role owns half the cores, as when generators and learner sit on
  separate devices (the placement of disaggregated GPU systems); shown for reference;
- k>=1: each role owns half the cores, and the learner borrows the generator's half
  while it has nothing to generate (learner.borrow_threads).
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


def setups(ks: list[int], cores: int, split_baseline: bool) -> list[tuple[str, int, int, int]]:
    """(name, k, threads per role, learner.borrow_threads)."""
    half = max(1, cores // 2)
    out = []
    for k in ks:
        if k == 0:
            out.append(("k=0", 0, cores, 0))
            if split_baseline:
                out.append(("k=0 split", 0, half, 0))
        else:
            out.append((f"k={k}", k, half, cores - half))
    return out


def overrides(k: int, seed: int, steps: int, threads: int, borrow: int, extra: list[str]) -> list[str]:
    """The quickstart's overrides for one run: one generator of ``threads`` threads (the
    quickstart itself runs two) against a learner of ``threads`` plus ``borrow``."""
    return [f"learner.steps={steps}", f"learner.max_staleness={k}", f"run.seed={seed}", f"learner.threads={threads}",
            f"learner.borrow_threads={borrow}", "generator.num_workers=1", f"generator.threads={threads}",
            "run.console=false", "learner.micro_batch_size=32",  # 8 micro-batches a step: the granularity of lending
            *extra]


def run(k: int, seed: int, steps: int, threads: int, borrow: int, extra: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"asyncrl-k{k}-s{seed}-"))
    cmd = [sys.executable, "-m", "asyncrl.launch", "quickstart", f"run.dir={run_dir}",
           *overrides(k, seed, steps, threads, borrow, extra)]
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
        "borrowed_frac": statistics.mean(r["perf/borrowed_frac"] for r in train[1:]) if cfg.learner.borrow_threads
        else 0.0,  # from the resolved config: an override may have turned lending off
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
        first.setdefault(r["setup"], r)
    fig, axes = plt.subplots(len(first), 1, figsize=(11, 1.6 * len(first) + 0.8), sharex=False, squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], first.items()):
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
        ax.set_title(f"{name}: {r['samples_per_s']:.0f} samples/s", fontsize=9)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cores", type=int, default=2, help="cores the run may use (threads are set from it)")
    ap.add_argument("--no-split-baseline", dest="split_baseline", action="store_false",
                    help="skip the k=0 run with each role on half the cores")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/async_speedup"))
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run, e.g. learner.off_policy=none")
    a = ap.parse_args()
    plan = setups(a.ks, a.cores, a.split_baseline)
    results = []
    for seed in a.seeds:
        for name, k, threads, borrow in plan:
            r = run(k, seed, a.steps, threads, borrow, a.overrides) | {"setup": name}
            results.append(r)
            print(f"{name} seed={seed}: {r['samples_per_s']:.1f} samples/s, learner idle {r['learner_idle_frac']:.2f}, "
                  f"borrowed {r['borrowed_frac']:.2f}, final accuracy {r['final_accuracy']:.3f}", flush=True)

    def mean_sps(name: str) -> float | None:
        rs = [r["samples_per_s"] for r in results if r["setup"] == name]
        return statistics.mean(rs) if rs else None

    base, split = mean_sps("k=0"), mean_sps("k=0 split")
    rows = []
    print(f"\n{'setup':>10} {'samples/s':>10} {'x k=0':>6} {'x split':>8} {'learner idle':>13} {'gen busy':>9} "
          f"{'borrowed':>9} {'lag':>5} {'final acc (mean ± sd)':>22}")
    for name, k, threads, borrow in plan:
        rs = [r for r in results if r["setup"] == name]
        sps = statistics.mean(r["samples_per_s"] for r in rs)
        acc = [r["final_accuracy"] for r in rs]
        row = {"setup": name, "k": k, "threads_per_role": threads, "borrow_threads": borrow, "samples_per_s": sps,
               "speedup": sps / base if base else None, "speedup_vs_split": sps / split if split else None,
               "learner_idle_frac": statistics.mean(r["learner_idle_frac"] for r in rs),
               "generator_busy_frac": statistics.mean(r["generator_busy_frac"] for r in rs),
               "borrowed_frac": statistics.mean(r["borrowed_frac"] for r in rs),
               "lag_mean": statistics.mean(r["lag_mean"] for r in rs),
               "final_accuracy_mean": statistics.mean(acc), "final_accuracy_sd": statistics.pstdev(acc),
               "seeds": len(rs)}
        rows.append(row)
        print(f"{name:>10} {sps:>10.1f} {row['speedup'] or 0:>6.2f} {row['speedup_vs_split'] or 0:>8.2f} "
              f"{row['learner_idle_frac']:>13.2f} {row['generator_busy_frac']:>9.2f} {row['borrowed_frac']:>9.2f} "
              f"{row['lag_mean']:>5.2f} {row['final_accuracy_mean']:>14.3f} ± {row['final_accuracy_sd']:.3f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": vars(a), "summary": rows, "runs": [
        {k: v for k, v in r.items() if k != "timeline"} for r in results]}, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
