"""Figures and a markdown summary of one or more runs:

    python -m asyncrl.report RUN_DIR [RUN_DIR ...] [--out DIR]

Reads each run's ``metrics.jsonl`` and ``config.yaml`` and writes, to ``--out``
(default ``RUN_DIR/report`` for one run, ``report/`` for several), one PNG per subject
with every run overlaid (x axis: policy version = training step):

- ``reward.png``: training reward and accuracy per step, held-out accuracy at each evaluation
- ``entropy.png``: mean policy entropy of the trained tokens, and the mean surprisal
  (-log p) of the sampled tokens where logged
- ``response_length.png``: mean response length, training samples and held-out
- ``async.png``: policy lag of the trained samples (mean and max) and groups dropped as too stale
- ``throughput.png``: generation and training tokens/s
- ``lpreg.png`` (runs with Lp-Reg metrics): tokens screened and regularised, mean k3 KL
- the exploration figures of ``asyncrl.report_explore`` where the runs logged their
  metrics: low-probability sampled tokens, held-out pass@1 / pass@K and the pass@k
  curve, spark moves by advantage sign

and ``report.md``: per run a config digest, held-out accuracy before and after, wall
time, steps and throughput, the final exploration values
(``asyncrl.report_explore.aggregate_markdown``, one run per row), then the figures.
Needs matplotlib (``asyncrl[report]``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("asyncrl.report")


@dataclass
class Run:
    name: str
    path: Path
    rows: list[dict]
    config: dict = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the rows that have ``key`` with a finite value."""
        pts = [(r["step"], float(r[key])) for r in self.rows if isinstance(r.get(key), (int, float))
               and math.isfinite(r[key])]
        return [s for s, _ in pts], [v for _, v in pts]

    def has(self, key: str) -> bool:
        return any(key in r for r in self.rows)


def load_run(path: str | Path) -> Run:
    import yaml

    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        raise SystemExit(f"{path}: no metrics.jsonl (is it a run directory?)")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    cfg_file = path / "config.yaml"
    config = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else {}
    return Run(name=path.name, path=path, rows=rows, config=config or {})


def unique_names(runs: list[Run]) -> None:
    """Legends need distinct labels: runs/a/x and runs/b/x become a/x and b/x."""
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        for r in runs:
            r.name = "/".join(r.path.resolve().parts[-2:])


# ---------------------------------------------------------------- figures

# (file, title, [(panel title, y label, [(metric, line label, style)])]); a y label in
# INTEGER_Y counts whole things and gets whole-number ticks.
FIGURES = [
    ("reward.png", "Reward and accuracy", [
        ("Training samples", "mean per step", [("train/reward_mean", "reward", "-"),
                                               ("train/accuracy", "accuracy", ":")]),
        ("Held-out problems", "accuracy (fraction correct)", [("eval/accuracy", "held-out accuracy", "o-")]),
    ]),
    ("entropy.png", "Policy entropy", [
        ("Trained tokens", "entropy (nats / token)", [("train/entropy", "entropy of pi_old", "-"),
                                                      ("explore/sampled_token_nll", "-log p of the sampled token",
                                                       ":")]),
    ]),
    ("response_length.png", "Response length", [
        ("Training samples", "tokens / response", [("train/response_length", "training", "-")]),
        ("Held-out problems", "tokens / response", [("eval/response_length", "held-out", "o-")]),
    ]),
    ("async.png", "Asynchrony", [
        ("Policy lag of trained samples", "versions behind the learner",
         [("async/lag_mean", "mean", "-"), ("async/lag_max", "max", ":")]),
        ("Groups dropped as too stale", "groups", [("async/dropped_groups", "per step", "-"),
                                                   ("async/dropped_total", "cumulative", ":")]),
    ]),
    ("throughput.png", "Throughput", [
        ("Generation", "tokens / s (while generating)", [("perf/gen_tokens_per_s", "generated", "-")]),
        ("Training", "tokens / s (train step)", [("perf/train_tokens_per_s", "trained", "-")]),
    ]),
    ("lpreg.png", "Lp-Reg", [
        ("Tokens per mini-batch", "tokens", [("lpreg/screened", "screened (lowest-probability rho)", "-"),
                                             ("lpreg/regularised", "regularised (also below the proxy)", ":")]),
        ("KL to the proxy", "k3 (nats / regularised token)", [("lpreg/kl_mean", "mean k3", "-")]),
    ]),
]


def running_mean(ys: list[float], w: int) -> list[float]:
    return [statistics.fmean(ys[i - w + 1 : i + 1]) for i in range(w - 1, len(ys))]


INTEGER_Y = ("versions behind the learner", "groups")


def plot_figure(runs: list[Run], out: Path, title: str, panels: list) -> bool:
    """One PNG with a panel per entry, every run in its own colour (line style = metric).
    False (nothing written) when no run has any of the metrics."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not any(run.has(key) for run in runs for _, _, lines in panels for key, _, _ in lines):
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, ylabel, lines) in zip(axes[0], panels):
        for i, run in enumerate(runs):
            for key, label, style in lines:
                xs, ys = run.series(key)
                if not xs:
                    continue
                colour, name = colours[i % len(colours)], f"{run.name}: {label}" if len(runs) > 1 else label
                # noisy per-step rates get a running mean; counts, maxima and evaluations are shown as they are
                w = len(ys) // 15 if "o" not in style and ylabel not in INTEGER_Y else 0
                if w >= 2:
                    ax.plot(xs, ys, style, color=colour, linewidth=0.8, alpha=0.3)
                    xs, ys, name = xs[w - 1:], running_mean(ys, w), f"{name} (mean of {w} steps)"
                ax.plot(xs, ys, style, color=colour, markersize=3, linewidth=1.2, label=name)
        ax.set_title(panel)
        ax.set_xlabel("step (policy version)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ylabel in INTEGER_Y:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            if min(min(line.get_ydata()) for line in ax.lines) >= 0:
                ax.set_ylim(bottom=0)  # rates, counts and lengths: zero is the honest baseline
            if ylabel in INTEGER_Y:  # an all-zero count still gets a 0..1 axis with whole ticks
                ax.set_ylim(top=max(ax.get_ylim()[1], 1))
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- summary


def digest(cfg: dict) -> str:
    """The settings that tell two runs apart, on one line."""
    def get(path: str, default="?"):
        node = cfg
        for part in path.split("."):
            node = node.get(part, default) if isinstance(node, dict) else default
        return node

    task = get("task.name")
    if task == "reasoning_gym":
        dataset, settings = json.dumps(get("task.dataset")), json.dumps(get("task.config"))
        task = f"reasoning_gym:{dataset} {settings} ({get('task.prompt')})"
    data = get("data.train_files", [])
    if data:
        task = f"files {', '.join(data)}"
    return (f"algo `{get('algo.type')}`, task {task}, model `{get('model.path')}`, engine `{get('generator.engine')}`, "
            f"{get('learner.prompts_per_step')} prompts x {get('generator.samples_per_prompt')} samples, "
            f"lr {get('learner.lr')}, max_staleness {get('learner.max_staleness')}, "
            f"ppo_mini_batches {get('learner.ppo_mini_batches')}, seed {get('run.seed')}")


def summary(run: Run) -> dict:
    steps, acc = run.series("eval/accuracy")
    train = [r for r in run.rows if "loss/total" in r or "train/reward_mean" in r]
    wall = max((r.get("time_s", 0.0) for r in run.rows), default=0.0)

    def mean(key: str) -> float:
        _, ys = run.series(key)
        return statistics.fmean(ys) if ys else float("nan")

    samples = sum(1 for _ in train) * (run.config.get("learner", {}).get("prompts_per_step", 0)
                                       * run.config.get("generator", {}).get("samples_per_prompt", 0))
    return {"steps": max((r["step"] for r in train), default=0), "wall_s": wall,
            "acc_before": acc[0] if acc and steps[0] == 0 else float("nan"),
            "acc_after": acc[-1] if acc and steps[-1] > 0 else float("nan"),
            "gen_tok_s": mean("perf/gen_tokens_per_s"), "train_tok_s": mean("perf/train_tokens_per_s"),
            "samples_s": samples / wall if wall else float("nan"), "step_s": mean("perf/step_s")}


def pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def num(x: float, fmt: str = "{:.0f}") -> str:
    return "-" if math.isnan(x) else fmt.format(x)


def markdown(runs: list[Run], figures: list[str]) -> str:
    from asyncrl.report_explore import aggregate_markdown, default_metrics  # it imports Run from here

    lines = ["# asyncrl run report", "", "| run | steps | held-out before | after | wall time | s / step | "
             "gen tok/s | train tok/s | trained samples/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        s = summary(run)
        wall = f"{int(s['wall_s'] // 60)} min {s['wall_s'] % 60:02.0f} s"
        lines.append(f"| {run.name} | {s['steps']} | {pct(s['acc_before'])} | {pct(s['acc_after'])} | {wall} | "
                     f"{num(s['step_s'], '{:.2f}')} | {num(s['gen_tok_s'])} | {num(s['train_tok_s'])} | "
                     f"{num(s['samples_s'], '{:.1f}')} |")
    lines += ["", "Held-out accuracy is the fraction of sampled answers scoring exactly 1 (before: step 0, "
              "after: the last evaluation); wall time from the learner's first metric to its last; tokens/s are "
              "means over steps (generation: while the generators were busy).", "", "## Configs", ""]
    lines += [f"- **{run.name}** (`{run.path}`): {digest(run.config)}" for run in runs]
    if any(k.startswith(("explore/", "eval/pass@")) for k in default_metrics(runs)):
        lines += ["", "## Final values", "", aggregate_markdown({run.name: [run] for run in runs})]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[str], out: str | None = None) -> Path:
    runs = [load_run(d) for d in run_dirs]
    unique_names(runs)
    out_dir = Path(out) if out else (runs[0].path / "report" if len(runs) == 1 else Path("report"))
    out_dir.mkdir(parents=True, exist_ok=True)
    from asyncrl import report_explore  # it imports Run from here

    specs = FIGURES + report_explore.figures(runs)
    figures = [name for name, title, panels in specs if plot_figure(runs, out_dir / name, title, panels)]
    if report_explore.plot_pass_curve(runs, out_dir / "pass_curve.png"):
        figures.append("pass_curve.png")
    (out_dir / "report.md").write_text(markdown(runs, figures))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m asyncrl.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    ap.add_argument("--out", help="output directory (default RUN_DIR/report, or report/ for several runs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: python -m asyncrl.report needs matplotlib: pip install 'asyncrl[report]'", file=sys.stderr)
        return 2
    out = write_report(args.runs, args.out)
    log.info("wrote %s and %s", out / "report.md", ", ".join(sorted(p.name for p in out.glob("*.png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
