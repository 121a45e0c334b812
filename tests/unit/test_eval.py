"""Evaluation: per-data_source temperatures as the engine was asked, and mean@k /
pass@k against a hand computation, on the benchmark-format samples."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from asyncrl.config import load_config
from asyncrl.data.files import load_problems
from asyncrl.eval.metrics import mean_at_k, pass_at_k, summarize, to_markdown
from asyncrl.eval.sampling import hub_metrics, run_eval, temperature_for
from asyncrl.generator.engine import Completion
from asyncrl.rewards import RewardPool

pytest.importorskip("math_verify")
DATA = Path(__file__).resolve().parents[1] / "data"
EVAL_SETS = ["aime24", "aime25", "math500", "minerva", "olympiadbench"]
K = 4
# correct samples out of K, per (source, row): a hand-written table
CORRECT = {("aime24", 0): 0, ("aime24", 1): 2, ("aime25", 0): 4, ("aime25", 1): 1,
           ("HuggingFaceH4/MATH-500", 0): 3, ("HuggingFaceH4/MATH-500", 1): 0, ("minerva", 0): 1,
           ("minerva", 1): 1, ("olympiadbench", 0): 4, ("olympiadbench", 1): 2}


class CharTok:
    eos_token_id = 0

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return [ord(c) for m in messages for c in m["content"]]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


class RecordingEngine:
    """Answers the first CORRECT[...] samples of a problem right (boxed truth), the rest
    wrong, and records the sampling parameters each problem was sampled with (samples:
    its episodes, one row each, times ``n``)."""

    def __init__(self, problems):
        self.by_ids = {p.prompt_ids: (p, n) for p, n in problems}
        self.asked: list[tuple[str, float, float, int]] = []

    def generate(self, prompts, params, between_steps=None):
        out, copies = [], Counter(tuple(ids) for ids in prompts)
        for key, count in copies.items():
            p = self.by_ids[key][0]
            self.asked.append((p.data_source, params.temperature, params.top_p, count * params.n))
        seen: Counter = Counter()
        for ids in prompts:
            p, n_right = self.by_ids[tuple(ids)]
            texts = []
            for _ in range(params.n):
                texts.append(rf"so \boxed{{{p.ground_truth}}}" if seen[p.prompt_ids] < n_right else r"\boxed{-17}")
                seen[p.prompt_ids] += 1
            out.append([Completion([ord(c) for c in t], [0.0] * len(t), [0] * len(t), "stop") for t in texts])
        return out


def load_eval():
    problems = load_problems([str(DATA / f"{s}.jsonl") for s in EVAL_SETS], CharTok(), 4096, "error")
    rows: dict[str, int] = {}
    tagged = []
    for p in problems:
        i = rows[p.data_source] = rows.get(p.data_source, -1) + 1
        tagged.append((p, CORRECT[(p.data_source, i)]))
    return problems, tagged


def test_pass_at_k_and_mean_at_k_by_hand():
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0  # n == k: "any correct"
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the mean
    assert mean_at_k([True, False, False, True]) == 0.5
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_eval_temperatures_by_source_and_metrics():
    cfg = load_config("quickstart", ["generator.temperature=0.9", "eval.top_p=0.95", f"eval.k={K}"])
    problems, tagged = load_eval()
    engine = RecordingEngine(tagged)
    summary, records = run_eval(engine, CharTok(), problems, cfg, RewardPool(0))
    temps = {s: {t for src, t, _, _ in engine.asked if src == s} for s, _, _, _ in engine.asked}
    assert temps == {"aime24": {0.6}, "aime25": {0.6}, "HuggingFaceH4/MATH-500": {0.9}, "minerva": {0.9},
                     "olympiadbench": {0.9}}
    assert {(tp, n) for _, _, tp, n in engine.asked} == {(0.95, K)} and len(engine.asked) == len(problems)
    # by hand: mean@4 = average over rows of correct/4; pass@4 = fraction of rows with any correct
    want = {"aime24": (0.25, 0.5), "aime25": (0.625, 1.0), "HuggingFaceH4/MATH-500": (0.375, 0.5),
            "minerva": (0.25, 1.0), "olympiadbench": (0.75, 1.0)}
    for source, (mean, pas) in want.items():
        assert summary["sources"][source]["mean@4"] == pytest.approx(mean)
        assert summary["sources"][source]["pass@4"] == pytest.approx(pas)
    assert summary["average"]["mean@4"] == pytest.approx((0.25 + 0.625 + 0.375 + 0.25 + 0.75) / 5)
    assert summary["average"]["pass@4"] == pytest.approx(4.0 / 5)
    assert all(len(r["rewards"]) == K for r in records)
    table = to_markdown(summary)
    assert "| aime25 | 2 | 62.5 | 100.0 |" in table and "| **average** | | 45.0 | 80.0 |" in table


def test_temperature_keys_and_overrides():
    cfg = load_config("quickstart", ["generator.temperature=1.0", "eval.temperature=0.7",
                                     "eval.temperature_by_source={aime: 0.6, math-ai/aime25: 0.5}"])
    assert temperature_for("AIME2024", cfg) == 0.6
    assert temperature_for("math-ai/aime25", cfg) == 0.5  # the longest matching key wins
    assert temperature_for("minerva", cfg) == 0.7


def test_hub_metrics_shape():
    problems, _ = load_eval()
    results = [(i, [1.0, 0.0], [3, 5]) for i in range(len(problems))]
    m = hub_metrics(problems, results, k=2)
    assert m["eval/accuracy"] == 0.5 and m["eval/response_length"] == 4.0
    assert m["eval/pass@2"] == 1.0 and m["eval/aime25/mean@2"] == 0.5


def test_summarize_empty_source_list():
    assert summarize({}, 4) == {"k": 4, "sources": {}, "average": {}}
