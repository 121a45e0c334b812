"""The Lp-Reg study on the spark testbed (``asyncrl/tasks/spark.py``): GRPO and the
exploration baselines against Lp-Reg, several seeds each, on-policy, through the real
pipeline (``asyncrl.launch spark``).

    python benchmarks/sparks.py                                   # the whole study (README)
    python benchmarks/sparks.py --algos grpo lpreg --seeds 0      # a subset
    python benchmarks/sparks.py --algos grpo --seeds 0 --steps 2 --eval-size 8 --out /tmp/smoke eval.k=4

Every run is ``python -m asyncrl.launch spark`` (asyncrl/configs/spark.yaml: 80 steps x
32 prompts x 8 samples, one optimiser step per batch, lr 3e-4, held-out evaluation of
192 problems x 16 samples at steps 0, 40 and 80) plus the algorithm's overrides and any extra
``key=value`` given here (e.g. ``learner.ppo_mini_batches=4`` for the whole set
off-policy). Writes ``<out>.md`` (final pass@1 and pass@16 mean ± std over seeds,
overall and on the hard problems, entropy at the start and the end, the share of
training answers with the spark -- multiplication --, junk moves per 1,000 tokens (the
noise tail) and Lp-Reg's regularised tokens per step), ``<out>.json`` (every run's
curves) and ``<out>.png`` (the curves, mean over seeds, shaded ± std). Progress goes to
stdout; each run's log is kept in its run directory (``--runs-dir``,
``<algo>_s<seed>/study.log``). ``--jobs 2`` (the default) runs two at a time: an
on-policy run keeps about one core busy. ``--report-only --runs-dir DIR`` launches
nothing and tabulates the finished runs there again.

pass@k is on the held-out split: "all" is the unweighted mean of the easy and hard
problems' values (``eval/pass@k``), "hard" the hard problems' alone, where only the
rare move can succeed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, installed or not
from asyncrl.config import load_config  # noqa: E402

HARD = "eval/asyncrl/spark/hard"
SPARK = "explore/spark/mul/frac"  # share of sampled training answers with a * (asyncrl/learner/exploration.py)
NOISE = "explore/spark/noise/per_1k_tokens"  # junk moves (the noise tail) per 1,000 sampled tokens

# name -> overrides. Entropy bonus: the paper does not give its coefficient; 0.002 is a
# nudge, 0.02 is ten times that (against GRPO's per-token advantages of order 1).
# Lp-Reg: the paper's kappa 0.02 and rho 0.01 (Qwen3-14B), then larger rho: at 0.01 the
# screened lowest 1% of negative tokens are nearly all junk moves, which the proxy
# filters, so almost nothing is regularised on this testbed (lpreg/regularised).
ALGOS: dict[str, list[str]] = {
    "grpo": ["algo.type=grpo"],
    "entropy_0.02": ["algo.type=entropy_bonus", "algo.coef=0.02"],
    "entropy_0.002": ["algo.type=entropy_bonus", "algo.coef=0.002"],
    "clip_higher": ["algo.type=clip_higher"],
    "eighty_twenty": ["algo.type=eighty_twenty"],
    "kl_cov": ["algo.type=kl_cov"],
    "lpreg": ["algo.type=lpreg", "algo.kappa=0.02", "algo.rho=0.01"],
    "lpreg_rho0.05": ["algo.type=lpreg", "algo.kappa=0.02", "algo.rho=0.05"],
    "lpreg_rho0.2": ["algo.type=lpreg", "algo.kappa=0.02", "algo.rho=0.2"],
}


def launch(algo: str, seed: int, a: argparse.Namespace, runs_dir: Path) -> list[dict]:
    """One run; its metrics rows. A failed run stops the study with its log's tail."""
    run_dir = runs_dir / f"{algo}_s{seed}"
    sizes = [f"{key}={v}" for key, v in (("learner.steps", a.steps), ("learner.eval_every", a.eval_every),
                                          ("task.eval_size", a.eval_size)) if v is not None]
    cmd = [sys.executable, "-m", "asyncrl.launch", "spark", f"run.dir={run_dir}", "run.overwrite=true",
           f"run.seed={seed}", "run.console=false", *sizes, *ALGOS[algo], *a.overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "study.log"
    with log.open("w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{algo} seed {seed} failed (exit {done.returncode}); {log}:\n{log.read_text()[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_run(algo: str, seed: int, runs_dir: Path) -> list[dict]:
    """A finished run's metrics rows (``--report-only``)."""
    path = runs_dir / f"{algo}_s{seed}" / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"--report-only: no {path}; run the study into --runs-dir {runs_dir} first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def runs_wall_s(runs_dir: Path, jobs: list[tuple[str, int]]) -> float:
    """The study's wall time read from its run directories: first config written to last metrics line."""
    dirs = [runs_dir / f"{algo}_s{seed}" for algo, seed in jobs]
    return max((d / "metrics.jsonl").stat().st_mtime for d in dirs) - min((d / "config.yaml").stat().st_mtime
                                                                           for d in dirs)


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r]


def summarise(rows: list[dict], k: int) -> dict:
    """The curves and the start / final values of one run. Training-batch values (entropy,
    spark share) are means over the first / last 5 steps, to average out batch noise."""
    curves = {"pass@1": series(rows, "eval/pass@1"), f"pass@{k}": series(rows, f"eval/pass@{k}"),
              f"hard_pass@{k}": series(rows, f"{HARD}/pass@{k}"), "hard_pass@1": series(rows, f"{HARD}/pass@1"),
              "entropy": series(rows, "train/entropy"), "spark": series(rows, SPARK), "noise": series(rows, NOISE),
              "reward": series(rows, "train/reward_mean")}
    reg = [r["lpreg/regularised"] for r in rows if "lpreg/regularised" in r]
    out = {"curves": curves, "regularised": statistics.mean(reg) if reg else math.nan}
    for name, c in curves.items():
        ys = [y for _, y in c]
        w = 5 if name in ("entropy", "spark", "noise", "reward") else 1
        out[name] = {"start": statistics.mean(ys[:w]) if ys else math.nan,
                     "final": statistics.mean(ys[-w:]) if ys else math.nan}
    return out


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "n/a"
    return f"{statistics.mean(xs):.3f} ± {statistics.pstdev(xs):.3f}"


def table(results: dict[str, list[dict]], k: int) -> str:
    cols = ["pass@1", f"pass@{k}", "hard_pass@1", f"hard_pass@{k}"]
    lines = [f"| algorithm | pass@1 | pass@{k} | hard pass@1 | hard pass@{k} | entropy start → final | "
             "spark share start → final | noise / 1k tokens start → final | Lp-Reg tokens regularised / step | "
             "seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    runs = [r for rs in results.values() for r in rs]
    base = [statistics.mean(r[c]["start"] for r in runs) for c in cols]
    lines.append("| base (step 0) | " + " | ".join(f"{b:.3f}" for b in base)
                 + f" | {mean_std([r['entropy']['start'] for r in runs])} | "
                 f"{mean_std([r['spark']['start'] for r in runs])} | {mean_std([r['noise']['start'] for r in runs])} | | |")
    for algo, rs in results.items():
        vals = [mean_std([r[c]["final"] for r in rs]) for c in cols]
        ent, spk, noise = (f"{statistics.mean(r[c]['start'] for r in rs):.3f} → {mean_std([r[c]['final'] for r in rs])}"
                           for c in ("entropy", "spark", "noise"))
        reg = mean_std([r["regularised"] for r in rs]).replace("n/a", "–")
        lines.append(f"| {algo} | " + " | ".join(vals) + f" | {ent} | {spk} | {noise} | {reg} | {len(rs)} |")
    return "\n".join(lines)


def smooth(ys: list[float], w: int) -> list[float]:
    """Trailing running mean over ``w`` points (training-batch curves are noisy step to step)."""
    return [statistics.mean(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]


def plot(results: dict[str, list[dict]], k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("pass@1", "held-out pass@1 (easy and hard)"), (f"pass@{k}", f"held-out pass@{k} (easy and hard)"),
              (f"hard_pass@{k}", f"held-out pass@{k}, hard problems"),
              ("entropy", "policy entropy of trained tokens (nats; mean of 5 steps)"),
              ("spark", "training answers with a * (share; mean of 5 steps)"),
              ("noise", "junk moves per 1k sampled tokens (mean of 5 steps)")]
    fig, axes = plt.subplots(2, 3, figsize=(17, 8))
    for ax, (name, title) in zip(axes.flat, panels):
        for i, (algo, rs) in enumerate(results.items()):
            steps = sorted(set.intersection(*(set(s for s, _ in r["curves"][name]) for r in rs)) if rs else set())
            if not steps:
                continue
            by = [dict(r["curves"][name]) for r in rs]
            mean = smooth([statistics.mean(b[s] for b in by) for s in steps], 1 if "pass" in name else 5)
            std = smooth([statistics.pstdev(b[s] for b in by) for s in steps], 1 if "pass" in name else 5)
            style = "--" if algo.startswith("lpreg_") else "-"
            ax.plot(steps, mean, style, color=f"C{i % 10}", label=algo, marker="o" if "pass" in name else None, ms=3)
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=f"C{i % 10}", alpha=0.12)
        ax.set(xlabel="step", title=title)
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, help="learner.steps (default: spark.yaml's)")
    ap.add_argument("--eval-every", type=int, help="learner.eval_every (default: spark.yaml's)")
    ap.add_argument("--eval-size", type=int, help="task.eval_size (default: spark.yaml's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/sparks"))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time: an on-policy run keeps about one core "
                    "busy (its generator and learner take turns), so 2 fill 2 cores")
    ap.add_argument("--runs-dir", help="where the run directories go (default: a new temporary directory)")
    ap.add_argument("--report-only", action="store_true", help="launch nothing: tabulate and plot the finished "
                    "runs in --runs-dir (after changing the report, or to recover a study cut short at the end)")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run (e.g. learner.lr=1e-4)")
    a = ap.parse_args(argv)
    if a.report_only and not a.runs_dir:
        ap.error("--report-only needs --runs-dir")
    runs_dir = Path(a.runs_dir or tempfile.mkdtemp(prefix="asyncrl-sparks-"))
    cfg = load_config("spark", a.overrides)
    k = cfg.eval.k
    a.steps = a.steps or cfg.learner.steps
    n, t0 = len(a.algos) * len(a.seeds), time.time()
    print(f"{n} runs ({len(a.algos)} algorithms x {len(a.seeds)} seeds, {a.steps} steps, {a.jobs} at a time) in "
          f"{runs_dir}", flush=True)
    results: dict[str, list[dict]] = {algo: [] for algo in a.algos}
    jobs = [(algo, seed) for seed in a.seeds for algo in a.algos]
    run = (lambda algo, seed, a, d: read_run(algo, seed, d)) if a.report_only else launch
    with ThreadPoolExecutor(a.jobs) as pool:  # threads only wait on the launch subprocesses
        futures = {pool.submit(run, algo, seed, a, runs_dir): (algo, seed) for algo, seed in jobs}
        for fut in as_completed(futures):
            algo, seed = futures[fut]
            s = summarise(fut.result(), k)
            s["seed"] = seed
            results[algo].append(s)
            done = sum(map(len, results.values()))
            print(f"[{done}/{n}] {algo:>15} seed {seed}: pass@1 {s['pass@1']['start']:.3f} -> "
                  f"{s['pass@1']['final']:.3f}, hard pass@{k} {s[f'hard_pass@{k}']['start']:.3f} -> "
                  f"{s[f'hard_pass@{k}']['final']:.3f}, entropy {s['entropy']['start']:.3f} -> "
                  f"{s['entropy']['final']:.3f}, spark {s['spark']['start']:.3f} -> {s['spark']['final']:.3f} "
                  f"[{time.time() - t0:.0f}s]", flush=True)
    for rs in results.values():
        rs.sort(key=lambda r: r["seed"])
    md = table(results, k)
    wall = runs_wall_s(runs_dir, jobs) if a.report_only else time.time() - t0
    note = (f"{a.steps} steps x {cfg.learner.prompts_per_step} prompts x {cfg.generator.samples_per_prompt} samples, "
            f"lr {cfg.learner.lr:g}, {cfg.learner.ppo_mini_batches} optimiser step(s) per batch; held-out: "
            f"{a.eval_size or cfg.task.eval_size} problems x {k} samples at T=1 every "
            f"{a.eval_every or cfg.learner.eval_every} steps; seeds {a.seeds}; extra overrides "
            f"{a.overrides or 'none'}; wall {wall / 60:.1f} min ({a.jobs} runs at a time)")
    print("\n" + md + "\n\n" + note, flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md + "\n\n" + note + "\n")
    out.with_suffix(".json").write_text(json.dumps({"settings": vars(a), "k": k, "wall_s": wall,
                                                    "results": results}, indent=1))
    plot(results, k, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
