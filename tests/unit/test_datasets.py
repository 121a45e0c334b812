"""veRL-layout dataset files: parquet and jsonl read alike, chat-templated prompt ids,
length limits, malformed rows named precisely, and the seeded epoch stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncrl.config import load_config
from asyncrl.data import build_eval_problems, build_train_source
from asyncrl.data.export_synthetic import synthetic_rows, write_rows
from asyncrl.data.files import DatasetError, DatasetSource, load_problems
from asyncrl.tasks import build_task
from asyncrl.tasks.tokenizer import build_char_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
SETS = ["dapo_math_17k", "aime24", "aime25", "math500", "minerva", "olympiadbench"]


class FakeTok:
    """One id per character; the chat template joins the user contents."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        return {"input_ids": [ord(c) for m in messages if m["role"] == "user" for c in m["content"]]}


@pytest.mark.parametrize("name", SETS)
def test_parquet_and_jsonl_read_alike(name):
    pytest.importorskip("pyarrow")
    a = load_problems([str(DATA / f"{name}.parquet")], FakeTok(), 4096, "error")
    b = load_problems([str(DATA / f"{name}.jsonl")], FakeTok(), 4096, "error")
    assert a == b and len(a) >= 2
    assert all(p.prompt_ids == tuple(map(ord, p.prompt)) for p in a)


def test_truncation_policies(tmp_path):
    path = str(DATA / "aime25.jsonl")
    full = load_problems([path], FakeTok(), 4096, "error")
    with pytest.raises(DatasetError, match=r"aime25.jsonl row 0: prompt is \d+ tokens > data.max_prompt_length=20"):
        load_problems([path], FakeTok(), 20, "error")
    left = load_problems([path], FakeTok(), 20, "left")
    assert [p.prompt_ids for p in left] == [p.prompt_ids[-20:] for p in full]
    short = min(len(p.prompt_ids) for p in full)
    kept = load_problems([path], FakeTok(), short, "drop")
    assert [len(p.prompt_ids) for p in kept] == [short]


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.pop("prompt"), r"row 1: field 'prompt' is missing"),
    (lambda r: r.update(prompt="just text"), r"row 1: field 'prompt' is str, not a non-empty list"),
    (lambda r: r["prompt"][0].pop("content"), r"row 1: field 'prompt\[0\]' is not a \{role: str, content: str\}"),
    (lambda r: r.pop("data_source"), r"row 1: field 'data_source' is missing"),
    (lambda r: r.pop("reward_model"), r"row 1: field 'reward_model' is missing"),
    (lambda r: r["reward_model"].pop("ground_truth"), r"row 1: field 'reward_model.ground_truth' is missing"),
])
def test_malformed_row_error_names_file_row_and_field(tmp_path, mutate, message):
    rows = [json.loads(line) for line in (DATA / "minerva.jsonl").read_text().splitlines()]
    mutate(rows[1])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match=rf"bad\.jsonl {message}.*veRL layout"):
        load_problems([str(bad)], FakeTok(), 4096, "error")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_problems([str(tmp_path / "nope.parquet")], FakeTok(), 64, "error")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="use .parquet or .jsonl"):
        load_problems([str(tmp_path / "x.csv")], FakeTok(), 64, "error")


def test_dataset_source_epochs_are_seeded_permutations():
    problems = load_problems([str(DATA / "dapo_math_17k.jsonl")], FakeTok(), 4096, "error")
    n = len(problems)
    src = DatasetSource(problems, seed=3)
    epochs = [[src.position(e * n + k) for k in range(n)] for e in range(3)]
    for e, ep in enumerate(epochs):
        assert [x[0] for x in ep] == [e] * n and sorted(x[1] for x in ep) == list(range(n))
    assert len({tuple(x[1] for x in ep) for ep in epochs}) > 1  # reshuffled per epoch
    again = DatasetSource(problems, seed=3)  # a resumed run: same position, same row
    assert [again.problem(i) for i in range(5 * n - 1, 2, -1)] == [src.problem(i) for i in range(5 * n - 1, 2, -1)]
    assert [DatasetSource(problems, 3, shuffle=False).position(n + 1)] == [(1, 1)]


def test_synthetic_export_trains_like_the_task(tmp_path):
    """The char tokenizer's chat template keeps the prompt ids of the raw prompt."""
    tok = build_char_tokenizer()
    out = write_rows(synthetic_rows(8, seed=5), tmp_path / "arith.jsonl")
    task = build_task("arith")
    cfg = load_config("quickstart", [f"data.train_files=[{out}]", f"data.eval_files=[{out}]", "data.shuffle=false"])
    src = build_train_source(cfg, tok)
    for i in range(8):
        p, q = src.problem(i), task.sample(5, i)
        assert (p.prompt, p.ground_truth, p.data_source) == (q.prompt, q.ground_truth, q.data_source)
        assert list(p.prompt_ids) == tok(q.prompt)["input_ids"]
    assert len(build_eval_problems(cfg, tok)) == 8
    assert len(build_eval_problems(load_config("quickstart", ["task.eval_size=3"]), tok)) == 3
