"""The exploration part of ``python -m asyncrl.report``, and the seed aggregation a study
script calls.

Figures (each only where a run logged its metrics; names in asyncrl/learner/exploration.py
and asyncrl/eval/metrics.py):

- ``low_prob.png``: fraction of sampled tokens with probability below 1% / 5% / 10%
- ``pass_k.png``: held-out pass@1 and pass@K (K = the largest j logged) per evaluation
- ``pass_curve.png``: held-out pass@j against j, at the first (base) and the last evaluation
  of every run: where RL's "narrowing" shows (the trained curve under the base's at large j)
- ``sparks.png``: per spark move, the fraction of sampled answers containing it, split by
  the sign of the answer's advantage

Aggregation over seeds: :func:`aggregate` / :func:`aggregate_markdown` take
``{condition: [run directories]}`` and give, per condition and metric, the mean ± sample
std over runs of each run's final value (:func:`final_value`).
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from asyncrl.report import Run, load_run

_PASS = re.compile(r"eval/pass@(\d+)")
_SPARK = re.compile(r"explore/spark/([^/]+)/frac")


def pass_js(runs: Sequence[Run]) -> list[int]:
    """The j of the averaged held-out pass@j any run logged, ascending."""
    return sorted({int(m.group(1)) for run in runs for r in run.rows for key in r if (m := _PASS.fullmatch(key))})


def spark_names(runs: Sequence[Run]) -> list[str]:
    return sorted({m.group(1) for run in runs for r in run.rows for key in r if (m := _SPARK.fullmatch(key))})


def figures(runs: Sequence[Run]) -> list[tuple[str, str, list]]:
    """Figure specs (``asyncrl.report.FIGURES`` layout) of the metrics these runs logged."""
    out = [("low_prob.png", "Low-probability sampled tokens", [
        ("Sampled tokens (sampling distribution)", "fraction of sampled tokens",
         [("explore/sampled_frac_below_1pct", "p < 0.01", "-"), ("explore/sampled_frac_below_5pct", "p < 0.05", "--"),
          ("explore/sampled_frac_below_10pct", "p < 0.10", ":")]),
    ])]
    js = pass_js(runs)
    if js and js[-1] > 1:
        out.append(("pass_k.png", "Held-out pass@k", [
            ("pass@1 and pass@k", "fraction of problems",
             [("eval/pass@1", "pass@1", "o-"), (f"eval/pass@{js[-1]}", f"pass@{js[-1]}", "s--")]),
        ]))
    names = spark_names(runs)
    if names:
        out.append(("sparks.png", "Spark moves in the sampled answers", [
            (f"spark {name}", "fraction of answers containing it",
             [(f"explore/spark/{name}/frac_adv_pos", "advantage > 0", "-"),
              (f"explore/spark/{name}/frac_adv_neg", "advantage < 0", "--"),
              (f"explore/spark/{name}/frac_adv_zero", "advantage = 0", ":")])
            for name in names
        ]))
    return out


def evaluations(run: Run) -> list[tuple[int, dict[int, float]]]:
    """(step, {j: pass@j}) of every held-out evaluation that logged pass@j."""
    out = []
    for r in run.rows:
        curve = {int(m.group(1)): float(v) for key, v in r.items() if (m := _PASS.fullmatch(key))}
        if curve:
            out.append((r["step"], curve))
    return out


def plot_pass_curve(runs: Sequence[Run], out: Path) -> bool:
    """pass@j against j (log scale) at each run's first and last evaluation; False
    (nothing written) when no run evaluated with more than one sample per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not pass_js(runs) or pass_js(runs)[-1] < 2:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        evals = evaluations(run)
        for (step, curve), style in zip([evals[0], evals[-1]] if len(evals) > 1 else evals, ("o--", "o-")):
            js = sorted(curve)
            ax.plot(js, [curve[j] for j in js], style, color=colours[i % len(colours)], markersize=3,
                    label=f"{run.name + ': ' if len(runs) > 1 else ''}step {step}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(pass_js(runs), [str(j) for j in pass_js(runs)])  # 1 2 4 8, not 2^0 2^1 ...
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("held-out pass@k")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("pass@k curve: first and last evaluation")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- aggregation over seeds


def final_value(run: Run, key: str, window: int = 5) -> float:
    """A run's final value of ``key``: the last logged value for ``eval/*`` (the final
    evaluation), the mean of the last ``window`` logged values for per-step metrics (one
    step is noisy). NaN when the run never logged it."""
    _, ys = run.series(key)
    if not ys:
        return float("nan")
    return ys[-1] if key.startswith("eval/") else statistics.fmean(ys[-window:])


def default_metrics(runs: Sequence[Run]) -> list[str]:
    """What the study's table shows: held-out pass@1 and pass@K (the largest j), entropy,
    sampled-token surprisal, the 1% low-probability fraction, every spark's frequency and
    Lp-Reg's counters (tokens screened / regularised per mini-batch, mean k3), those that
    some run logged."""
    js = pass_js(runs)
    keys = ["eval/pass@1", *([f"eval/pass@{js[-1]}"] if js and js[-1] > 1 else []), "train/entropy",
            "explore/sampled_token_nll", "explore/sampled_frac_below_1pct",
            *(f"explore/spark/{name}/frac" for name in spark_names(runs)),
            "lpreg/screened", "lpreg/regularised", "lpreg/kl_mean"]
    return [k for k in keys if any(run.has(k) for run in runs)]


def _runs(paths: Sequence[str | Path | Run]) -> list[Run]:
    # loaded runs pass as they are; not isinstance(p, Run): under ``python -m asyncrl.report``
    # the caller's Run is __main__.Run, another class than the one imported here
    return [load_run(p) if isinstance(p, (str, os.PathLike)) else p for p in paths]


def aggregate(conditions: Mapping[str, Sequence[str | Path | Run]], metrics: Sequence[str] | None = None,
              window: int = 5) -> tuple[list[str], dict[str, dict[str, tuple[float, float, int]]]]:
    """``{condition: runs}`` -> (metrics, ``{condition: {metric: (mean, std, n)}}``) over the
    runs that logged the metric: mean and sample standard deviation (n - 1; NaN for one
    run) of :func:`final_value`. ``metrics`` None = :func:`default_metrics` of all runs."""
    loaded = {name: _runs(paths) for name, paths in conditions.items()}
    if metrics is None:
        metrics = default_metrics([r for runs in loaded.values() for r in runs])
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for name, runs in loaded.items():
        out[name] = {}
        for key in metrics:
            vals = [v for v in (final_value(r, key, window) for r in runs) if math.isfinite(v)]
            mean = statistics.fmean(vals) if vals else float("nan")
            std = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            out[name][key] = (mean, std, len(vals))
    return list(metrics), out


def _cell(mean: float, std: float, n: int, runs: int) -> str:
    if n == 0:
        return "-"
    text = f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"
    return text if n == runs else f"{text} (n={n})"


def aggregate_markdown(conditions: Mapping[str, Sequence[str | Path | Run]], metrics: Sequence[str] | None = None,
                       window: int = 5) -> str:
    """:func:`aggregate` as a markdown table: a row per condition, a column per metric,
    ``mean ± std`` (``(n=...)`` where fewer runs than the condition's logged it)."""
    keys, agg = aggregate(conditions, metrics, window)
    lines = ["| condition | runs | " + " | ".join(f"`{k}`" for k in keys) + " |",
             "|---|---:|" + "---:|" * len(keys)]
    for name, paths in conditions.items():
        lines.append(f"| {name} | {len(paths)} | " + " | ".join(_cell(*agg[name][k], len(paths)) for k in keys) + " |")
    lines += ["", f"Final value per run: the last evaluation for `eval/*`, the mean of the last {window} logged "
              "steps otherwise; mean ± sample standard deviation over runs."]
    return "\n".join(lines) + "\n"
