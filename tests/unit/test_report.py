"""python -m asyncrl.report: PNGs and a markdown summary from run directories, several
runs overlaid, Lp-Reg's figure only where its metrics are."""

from __future__ import annotations

import json

import pytest
import yaml

pytest.importorskip("matplotlib")

from asyncrl.report import load_run, main, summary  # noqa: E402


def fake_run(path, algo: str, steps: int = 6, acc0: float = 0.1, acc1: float = 0.4):
    path.mkdir(parents=True)
    rows = [{"step": 0, "time_s": 1.0, "eval/accuracy": acc0, "eval/response_length": 50.0}]
    for s in range(1, steps + 1):
        row = {"step": s, "time_s": 1.0 + 2.0 * s, "train/reward_mean": 0.1 * s, "train/accuracy": 0.05 * s,
               "train/entropy": 0.5 - 0.02 * s, "train/response_length": 40.0 + s, "async/lag_mean": 0.5,
               "async/lag_max": 1, "async/dropped_groups": 0, "async/dropped_total": 0, "loss/total": 0.0,
               "perf/gen_tokens_per_s": 1000.0, "perf/train_tokens_per_s": 2000.0, "perf/step_s": 2.0}
        if algo == "lpreg":
            row |= {"lpreg/screened": 3.0, "lpreg/regularised": 1.0, "lpreg/kl_mean": 0.2}
        rows.append(row)
    rows.append({"step": steps, "time_s": 2.0 + 2.0 * steps, "eval/accuracy": acc1, "eval/response_length": 45.0})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"algo": {"type": algo}, "task": {"name": "reasoning_gym", "dataset": "countdown", "config": {},
                                            "prompt": "compact"},
           "model": {"path": "builtin:countdown-base"}, "generator": {"engine": "hf", "samples_per_prompt": 8},
           "learner": {"prompts_per_step": 4, "lr": 1e-4, "max_staleness": 0, "ppo_mini_batches": 1},
           "run": {"seed": 0}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return path


def test_one_run_writes_pngs_and_summary(tmp_path):
    run = fake_run(tmp_path / "grpo_run", "grpo")
    assert main([str(run)]) == 0
    out = run / "report"
    assert sorted(p.name for p in out.glob("*.png")) == ["async.png", "entropy.png", "response_length.png",
                                                         "reward.png", "throughput.png"]  # no Lp-Reg metrics
    md = (out / "report.md").read_text()
    assert "| grpo_run | 6 | 10.0% | 40.0% | 0 min 14 s |" in md
    assert "algo `grpo`" in md and "countdown" in md and "![reward.png](reward.png)" in md
    assert all((out / f).stat().st_size > 10_000 for f in ("reward.png", "throughput.png"))


def test_several_runs_overlay_and_lpreg_figure(tmp_path):
    a = fake_run(tmp_path / "a" / "run", "grpo")
    b = fake_run(tmp_path / "b" / "run", "lpreg", acc1=0.5)
    out = tmp_path / "cmp"
    assert main([str(a), str(b), "--out", str(out)]) == 0
    assert (out / "lpreg.png").exists()
    md = (out / "report.md").read_text()
    assert "| a/run | 6 | 10.0% | 40.0% |" in md and "| b/run | 6 | 10.0% | 50.0% |" in md  # names made distinct
    assert "algo `lpreg`" in md


def test_summary_numbers(tmp_path):
    s = summary(load_run(fake_run(tmp_path / "r", "grpo")))
    assert s["steps"] == 6 and s["wall_s"] == 14.0
    assert (s["acc_before"], s["acc_after"]) == (0.1, 0.4)
    assert s["gen_tok_s"] == 1000.0 and s["samples_s"] == pytest.approx(6 * 4 * 8 / 14.0)


def test_not_a_run_dir(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        main([str(tmp_path)])
