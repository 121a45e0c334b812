"""The exploration part of python -m asyncrl.report: its figures appear where the runs
logged their metrics, and the seed aggregation gives mean ± std of final values as
computed by hand."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from asyncrl.report import load_run, main  # noqa: E402
from asyncrl.report_explore import aggregate, aggregate_markdown, default_metrics, final_value  # noqa: E402


def explore_run(path, pass1: float, pass8: float, entropy_end: float, steps: int = 8):
    """A run with eval at steps 0 and ``steps`` (k = 8) and explore/* every step; the
    last five steps' entropy is ``entropy_end``, earlier steps 9.0 (must not count)."""
    path.mkdir(parents=True)
    rows = [{"step": 0, "time_s": 1.0, "eval/accuracy": 0.1, "eval/pass@1": 0.1, "eval/pass@2": 0.2,
             "eval/pass@4": 0.35, "eval/pass@8": 0.5}]
    for s in range(1, steps + 1):
        rows.append({"step": s, "time_s": 1.0 + s, "train/reward_mean": 0.2, "loss/total": 0.0,
                     "train/entropy": entropy_end if s > steps - 5 else 9.0,
                     "explore/sampled_token_nll": 0.4, "explore/sampled_frac_below_1pct": 0.01 * s,
                     "explore/sampled_frac_below_5pct": 0.02 * s, "explore/sampled_frac_below_10pct": 0.03 * s,
                     "explore/spark/wait/frac": 0.5, "explore/spark/wait/frac_adv_pos": 0.6,
                     "explore/spark/wait/frac_adv_neg": 0.3})
    rows.append({"step": steps, "time_s": 20.0, "eval/accuracy": pass1, "eval/pass@1": pass1, "eval/pass@2": pass1,
                 "eval/pass@4": pass8, "eval/pass@8": pass8})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_final_value_and_default_metrics(tmp_path):
    run = load_run(explore_run(tmp_path / "r", 0.3, 0.45, entropy_end=0.7))
    assert final_value(run, "eval/pass@8") == 0.45  # the last evaluation, not the base's 0.5
    assert final_value(run, "train/entropy") == pytest.approx(0.7)  # mean of the last 5 steps
    assert final_value(run, "train/entropy", window=6) == pytest.approx((0.7 * 5 + 9.0) / 6)
    assert final_value(run, "nothing/logged") != final_value(run, "nothing/logged")  # NaN
    assert default_metrics([run]) == ["eval/pass@1", "eval/pass@8", "train/entropy", "explore/sampled_token_nll",
                                      "explore/sampled_frac_below_1pct", "explore/spark/wait/frac"]


def test_aggregate_mean_and_sample_std_over_seeds(tmp_path):
    grpo = [explore_run(tmp_path / f"grpo{i}", p, 0.4, e) for i, (p, e) in enumerate([(0.2, 1.0), (0.4, 2.0),
                                                                                          (0.6, 3.0)])]
    lpreg = [explore_run(tmp_path / f"lpreg{i}", 0.5, p8, 1.5) for i, p8 in enumerate([0.5, 0.7])]
    keys, agg = aggregate({"grpo": grpo, "lpreg": lpreg}, ["eval/pass@1", "eval/pass@8", "train/entropy"])
    assert keys == ["eval/pass@1", "eval/pass@8", "train/entropy"]
    m, s, n = agg["grpo"]["eval/pass@1"]
    assert (m, n) == (pytest.approx(0.4), 3) and s == pytest.approx(0.2)  # sample std of 0.2, 0.4, 0.6
    m, s, n = agg["grpo"]["train/entropy"]
    assert (m, s, n) == (pytest.approx(2.0), pytest.approx(1.0), 3)
    m, s, n = agg["lpreg"]["eval/pass@8"]
    assert (m, n) == (pytest.approx(0.6), 2) and s == pytest.approx(0.1414213562, rel=1e-6)
    md = aggregate_markdown({"grpo": grpo, "lpreg": lpreg}, ["eval/pass@1", "eval/pass@8"])
    assert "| grpo | 3 | 0.400 ± 0.200 | 0.400 ± 0.000 |" in md
    assert "| lpreg | 2 | 0.500 ± 0.000 | 0.600 ± 0.141 |" in md


def test_aggregate_counts_runs_that_lack_a_metric(tmp_path):
    a = explore_run(tmp_path / "a", 0.2, 0.4, 1.0)
    b = tmp_path / "b"
    b.mkdir()
    (b / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/entropy": 3.0}) + "\n")
    md = aggregate_markdown({"mixed": [a, b]}, ["eval/pass@1", "train/entropy"])
    assert "| mixed | 2 | 0.200 (n=1) | 2.000 ± 1.414 |" in md


def test_report_writes_the_exploration_figures(tmp_path):
    run = explore_run(tmp_path / "run", 0.3, 0.45, 0.7)
    assert main([str(run)]) == 0
    out = run / "report"
    names = {p.name for p in out.glob("*.png")}
    assert {"low_prob.png", "pass_k.png", "pass_curve.png", "sparks.png", "entropy.png"} <= names
    md = (out / "report.md").read_text()
    assert "## Final values" in md and "| run | 1 | 0.300 | 0.450 |" in md
    assert all((out / f).stat().st_size > 10_000 for f in ("pass_curve.png", "sparks.png"))


def test_runs_without_exploration_metrics_get_no_exploration_figures(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/entropy": 0.5, "loss/total": 0.0}) + "\n")
    assert main([str(run)]) == 0
    names = {p.name for p in (run / "report").glob("*.png")}
    assert not names & {"low_prob.png", "pass_k.png", "pass_curve.png", "sparks.png"}


def test_python_m_asyncrl_report_with_exploration_metrics(tmp_path):
    """As a script: its Run class is then __main__.Run, not the one report_explore imports."""
    import subprocess
    import sys

    from testkit import REPO, subprocess_env

    a, b = explore_run(tmp_path / "a", 0.3, 0.45, 0.7), explore_run(tmp_path / "b", 0.5, 0.5, 0.6)
    done = subprocess.run([sys.executable, "-m", "asyncrl.report", str(a), str(b), "--out", str(tmp_path / "out")],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| a | 1 | 0.300 | 0.450 |" in md and "| b | 1 | 0.500 | 0.500 |" in md
