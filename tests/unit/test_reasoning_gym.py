"""reasoning-gym as a task source: seeded, disjoint, deterministic splits; rewards equal to
the dataset's own score_answer; start-up errors that name the key; veRL export."""

from __future__ import annotations

import json
import random
import sys

import pytest

from asyncrl.config import ConfigError, load_config
from asyncrl.data import build_eval_problems, build_train_source
from asyncrl.tasks import verify
from testkit import warmstart_twice

rg = pytest.importorskip("reasoning_gym")

# a small problem space (3 numbers of 1-6): held-out prompts come up again in the training
# stream, so the test sees the stream skip them, not merely miss them by chance
SMALL = ["task.name=reasoning_gym", "task.dataset=countdown", "task.prompt=compact", "task.eval_size=64",
         "task.config={min_numbers: 3, max_numbers: 3, max_value: 6, min_target: 10, max_target: 40}"]


def cfg(*overrides: str):
    return load_config("quickstart", [*SMALL, *overrides])


def entry_of(problem) -> dict:
    from asyncrl.tasks.reasoning_gym import unpack

    return unpack(json.loads(problem.ground_truth)["entry"])


def test_splits_are_deterministic_and_disjoint():
    from asyncrl.data import _RG_TASKS

    held_out = build_eval_problems(cfg())
    train = [build_train_source(cfg()).problem(i) for i in range(150)]
    _RG_TASKS.clear()  # a fresh task object regenerates everything from the seeds
    assert build_eval_problems(cfg()) == held_out
    assert [build_train_source(cfg()).problem(i) for i in range(150)] == train
    assert not {p.prompt for p in held_out} & {p.prompt for p in train}
    # the held-out split does not depend on run.seed; the training stream does
    assert build_eval_problems(cfg("run.seed=3")) == held_out
    other = [build_train_source(cfg("run.seed=3")).problem(i) for i in range(150)]
    assert other != train and not {p.prompt for p in held_out} & {p.prompt for p in other}


def test_the_stream_replaces_held_out_problems():
    """Without the skip, the small space would put held-out prompts in the stream."""
    from asyncrl.data import reasoning_gym_task
    from asyncrl.tasks.reasoning_gym import PRIMARY

    task = reasoning_gym_task(cfg())
    stream = task.stream(0)
    held = {p.prompt for p in task.eval_problems()}
    raw = [task.render(task.entry(stream.region, i)) for i in range(150)]
    hits = [i for i, prompt in enumerate(raw) if prompt in held]
    assert hits, "the test's problem space is too large to exercise the skip"
    assert stream.entry(hits[0]) != task.entry(stream.region, hits[0])
    assert stream.entry(hits[0]) in [task.entry(stream.region, hits[0] + k * PRIMARY) for k in range(1, 8)]


@pytest.mark.parametrize("dataset,config", [
    ("countdown", {"min_numbers": 3, "max_numbers": 4, "max_value": 20, "min_target": 10, "max_target": 100}),
    ("puzzle24", {}),
    ("chain_sum", {}),
    ("basic_arithmetic", {}),
    ("arc_agi", {}),  # its scorer compares tuple grids: the ground-truth JSON must keep them tuples
])
def test_reward_is_the_datasets_own_score(dataset, config):
    c = load_config("quickstart", ["task.name=reasoning_gym", f"task.dataset={dataset}", "task.eval_size=4",
                                   f"task.config={json.dumps(config)}"])
    ds = rg.create_dataset(dataset, **config, seed=0, size=4)
    for p in build_eval_problems(c):
        e = entry_of(p)
        assert p.data_source == f"reasoning_gym/{dataset}"
        for answer in (e["answer"], "7", "not an answer"):
            expected = ds.score_answer(answer, e)
            assert verify(p.data_source, f"thinking...<answer>{answer}</answer>", p.ground_truth) == expected
        assert verify(p.data_source, f"<answer>{e['answer']}</answer>", p.ground_truth) == 1.0
        assert verify(p.data_source, "no tag", p.ground_truth) == ds.score_answer(None, e)


def test_countdown_rewards_and_partial_credit():
    p = build_eval_problems(cfg())[0]
    e = entry_of(p)
    right = f"<answer>{e['answer']}</answer>"
    wrong = f"<answer>{'+'.join(map(str, e['metadata']['numbers']))}1</answer>"  # its numbers, one digit more
    ds = rg.create_dataset("countdown", seed=0, size=1)
    assert verify(p.data_source, right, p.ground_truth) == 1.0
    assert verify(p.data_source, wrong, p.ground_truth) == ds.score_answer(wrong[8:-9], e) == 0.05
    binary = build_eval_problems(cfg("task.partial_reward=0"))[0]
    assert verify(binary.data_source, right, binary.ground_truth) == 1.0
    assert verify(binary.data_source, wrong, binary.ground_truth) == 0.0
    half = build_eval_problems(cfg("task.partial_reward=0.5"))[0]
    assert verify(half.data_source, wrong, half.ground_truth) == pytest.approx(0.025)


def test_compact_trace_solves_and_scores():
    from asyncrl.tasks.compact import compact_prompt, trace

    for p in build_eval_problems(cfg())[:20]:
        m = entry_of(p)["metadata"]
        assert p.prompt == compact_prompt(m["numbers"], m["target"])
        response = trace(m["numbers"], m["target"], random.Random(0), max_trials=2)
        assert verify(p.data_source, response, p.ground_truth) == 1.0, response


def test_weighted_mix_scores_each_item_with_its_dataset():
    c = load_config("quickstart", ["task.name=reasoning_gym", "task.dataset={chain_sum: 1, basic_arithmetic: 1}",
                                   "task.config={chain_sum: {min_terms: 2, max_terms: 3}}", "task.eval_size=40"])
    problems = build_eval_problems(c)
    assert {p.data_source for p in problems} == {"reasoning_gym/chain_sum", "reasoning_gym/basic_arithmetic"}
    for p in problems:
        e = entry_of(p)
        assert verify(p.data_source, f"<answer>{e['answer']}</answer>", p.ground_truth) == 1.0
        if p.data_source.endswith("chain_sum"):
            assert json.loads(p.ground_truth)["config"] == {"min_terms": 2, "max_terms": 3}


@pytest.mark.parametrize("overrides,message", [
    (["task.dataset=countdwn"], r"task.dataset: reasoning-gym has no dataset 'countdwn'; did you mean countdown"),
    (["task.config={min_numbrs: 3}"], r"task.config.min_numbrs: countdown has no setting 'min_numbrs'; its settings: "
                                      r"min_numbers"),
    (["task.config={min_numbers: 1}"], r"task.config: countdown rejects this config: AssertionError: min_numbers"),
    (["task.config={seed: 3}"], r"task.config.seed: asyncrl sets it"),
    (["task.prompt=compact", "task.dataset=chain_sum"], r"task.prompt=compact has a rendering for countdown, puzzle24"),
    (["task.dataset={countdown: 1}", "task.config={chain_sum: {}}"],
     r"task.config.chain_sum: not a dataset of the mix"),
])
def test_config_errors_name_the_key(overrides, message):
    from asyncrl.tasks.reasoning_gym import check_task

    with pytest.raises(ConfigError, match=message):
        check_task(load_config("quickstart", ["task.name=reasoning_gym", *overrides]).task)


@pytest.mark.parametrize("override,message", [
    ("task.partial_reward=2", r"task.partial_reward must be in \[0, 1\]"),
    ("task.dataset={countdown: 0}", r"every weight > 0"),
    ("task.prompt=short", r"task.prompt"),
])
def test_config_values_checked_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("quickstart", ["task.name=reasoning_gym", override])


def test_missing_package_says_how_to_install(monkeypatch):
    from asyncrl.tasks.reasoning_gym import check_task

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import reasoning_gym now raises ImportError
    with pytest.raises(ConfigError, match=r"needs reasoning-gym, which is not installed: pip install 'asyncrl\[tasks"):
        check_task(load_config("quickstart", ["task.name=reasoning_gym"]).task)


def test_launch_stops_at_a_bad_task_config(tmp_path, capsys):
    from asyncrl.launch import main

    code = main(["quickstart", "task.name=reasoning_gym", "task.config={max_numbrs: 4}", f"run.dir={tmp_path}"])
    assert code == 2
    assert "task.config.max_numbrs: countdown has no setting" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()  # nothing started


def test_verl_export_scores_like_the_task(tmp_path):
    pytest.importorskip("pyarrow")
    from asyncrl.data.export_synthetic import main as export
    from asyncrl.data.files import load_problems
    from asyncrl.tasks.tokenizer import ASCII, build_char_tokenizer

    out = tmp_path / "countdown_test.parquet"
    export(["--out", str(out), "--n", "16", "--split", "test", "--config", "quickstart", *SMALL])
    tok = build_char_tokenizer(ASCII)
    rows = load_problems([str(out)], tok, 256, "error")
    task = build_eval_problems(cfg("task.eval_size=16"))
    assert [(r.prompt, r.ground_truth, r.data_source) for r in rows] == [(p.prompt, p.ground_truth, p.data_source)
                                                                         for p in task]
    assert all(list(r.prompt_ids) == tok(r.prompt)["input_ids"] for r in rows)  # chat template = bare prompt
    e = entry_of(rows[0])
    assert verify(rows[0].data_source, f"<answer>{e['answer']}</answer>", rows[0].ground_truth) == 1.0


def test_shipped_countdown_config_and_base():
    from asyncrl.models import resolve_model_path
    from asyncrl.tasks.reasoning_gym import check_task

    c = load_config("countdown")
    check_task(c.task)
    assert c.model.path == "builtin:countdown-base" and (resolve_model_path(c.model.path) / "config.json").exists()


def test_warmstart_is_reproducible(tmp_path):
    """Two runs of the countdown warm-start (a few steps) write identical weights."""
    a, b = warmstart_twice(tmp_path, "countdown", eval_size=2)
    assert a == b
    history = json.loads((tmp_path / "a" / "warmstart.json").read_text())["history"]
    assert [h["step"] for h in history] == [2] and 0 <= history[0]["accuracy_t1"] <= 1


def test_a_scorer_that_never_returns_scores_zero_in_the_pool():
    """countdown's scorer evaluates the answer with sympy: 9**9**9**9 would run forever
    inline; the generator's reward pool (used for reasoning_gym) gives it 0 and goes on."""
    from asyncrl.rewards import RewardPool, build_reward_pool

    assert build_reward_pool(cfg()).processes > 0
    p = build_eval_problems(cfg())[0]
    right = f"<answer>{entry_of(p)['answer']}</answer>"
    pool = RewardPool(processes=1, timeout_s=2.0)
    try:
        assert pool.score([(p.data_source, right, p.ground_truth)]) == [1.0]  # started: no start-up grace now
        items = [(p.data_source, "<answer>9**9**9**9</answer>", p.ground_truth), (p.data_source, right, p.ground_truth)]
        assert pool.score(items) == [0.0, 1.0] and pool.timeouts == 1
    finally:
        pool.close()
