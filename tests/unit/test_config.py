"""Config loading: errors name the key and the fix; every shipped YAML parses;
``--help`` is instant and torch-free."""

from __future__ import annotations

import subprocess
import sys
import time
import typing

import msgspec
import pytest
import yaml

from asyncrl.algos.config import AlgoConfig, LpRegConfig
from asyncrl.config import CONFIG_DIR, Config, _Loader, ConfigError, from_yaml_file, load_config, to_yaml

from testkit import REPO, subprocess_env

ALL_YAML = sorted(CONFIG_DIR.rglob("*.yaml"))
ALGO_YAML = sorted((CONFIG_DIR / "algos").glob("*.yaml"))
TOP_YAML = sorted(CONFIG_DIR.glob("*.yaml"))
RECIPE_YAML = sorted((CONFIG_DIR / "recipes").glob("*.yaml"))  # parsed in tests/unit/test_cluster.py


def error(name: str = "quickstart", overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(name, list(overrides))
    return str(e.value)


# ------------------------------------------------------------------ error messages


def test_unknown_key_names_key_and_suggests_the_fix():
    msg = error(overrides=["learner.stepz=3"])
    assert "learner.stepz" in msg
    assert "did you mean learner.steps" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("generator:\n  temprature: 0.7\n")
    msg = error(str(path))
    assert "generator.temprature" in msg and "generator.temperature" in msg


def test_unknown_section_lists_valid_sections():
    msg = error(overrides=["lerner.steps=3"])
    assert "lerner" in msg and "learner" in msg


def test_unknown_algo_key_uses_the_selected_algorithm():
    msg = error(overrides=["algo.type=lpreg", "algo.kapa=0.1"])
    assert "algo.kapa" in msg and "did you mean algo.kappa" in msg
    # kappa is an Lp-Reg field: for grpo it is unknown, and the message lists grpo's keys
    msg = error(overrides=["algo.kappa=0.1"])
    assert "algo.kappa" in msg and "clip_low" in msg and "kappa," not in msg


def test_wrong_type_names_key_expected_type_and_fix():
    msg = error(overrides=["learner.steps=abc"])
    assert "learner.steps" in msg and "int" in msg and "str" in msg
    assert "learner.steps=<int>" in msg
    msg = error(overrides=["run.seed=1.5"])
    assert "run.seed" in msg and "float" in msg


def test_unknown_algo_type_lists_the_choices():
    msg = error(overrides=["algo.type=ppo_magic"])
    assert "algo.type" in msg and "ppo_magic" in msg
    for tag in ("grpo", "lpreg", "gspo", "dr_grpo"):
        assert tag in msg


@pytest.mark.parametrize(
    "overrides",
    [
        ["learner.prompts_per_step=6", "learner.ppo_mini_batches=4"],
        ["learner.prompts_per_step=6", "learner.world_size=4"],
        ["learner.prompts_per_step=8", "learner.ppo_mini_batches=2", "learner.world_size=3"],
    ],
    ids=["mini_batches", "world_size", "both"],
)
def test_impossible_batch_split_is_explained(overrides):
    msg = error(overrides=overrides)
    for key in ("learner.prompts_per_step", "learner.ppo_mini_batches", "learner.world_size", "divisible"):
        assert key in msg


def test_possible_batch_split_is_accepted():
    cfg = load_config("quickstart", ["learner.prompts_per_step=12", "learner.ppo_mini_batches=3",
                                     "learner.world_size=2"])
    assert cfg.learner.prompts_per_step == 12


@pytest.mark.parametrize(
    "override, key",
    [("learner.lr=-1", "learner.lr"), ("generator.top_p=0", "generator.top_p"),
     ("generator.temperature=0", "generator.temperature"), ("learner.steps=0", "learner.steps"),
     ("algo.clip_low=2", "algo.clip_low")],
)
def test_out_of_range_values_name_the_key(override, key):
    assert key in error(overrides=[override])


@pytest.mark.parametrize("bad", ["learnersteps", "learner.steps"])
def test_bad_override_syntax(bad):
    msg = error(overrides=[bad])
    assert bad in msg and "a.b.c=value" in msg


def test_override_into_a_value_is_an_error():
    msg = error(overrides=["learner.steps.x=1"])
    assert "learner.steps" in msg and "not a section" in msg


def test_missing_config_file_and_unknown_name():
    assert "does not exist" in error("/nonexistent/dir/cfg.yaml")
    msg = error("no_such_config_name")
    assert "no_such_config_name" in msg and "quickstart" in msg


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert "mapping" in error(str(path))


# ------------------------------------------------------------------ values


def test_overrides_are_typed_and_scientific_floats_parse():
    cfg = load_config("quickstart", ["learner.lr=3e-4", "learner.steps=7", "algo.type=lpreg", "algo.rho=0.5",
                                     "run.overwrite=true", "learner.betas=[0.8, 0.95]"])
    assert cfg.learner.lr == pytest.approx(3e-4) and isinstance(cfg.learner.lr, float)
    assert cfg.learner.steps == 7
    assert isinstance(cfg.algo, LpRegConfig) and cfg.algo.rho == 0.5
    assert cfg.algo.kappa == LpRegConfig().kappa  # defaults of the chosen algorithm
    assert cfg.run.overwrite is True
    assert cfg.learner.betas == (0.8, 0.95)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("quickstart", ["learner.lr=1e-5", "algo.type=gspo", "run.seed=3"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert from_yaml_file(path) == cfg


# ------------------------------------------------------------------ shipped files


@pytest.mark.parametrize("path", TOP_YAML, ids=lambda p: p.stem)
def test_shipped_run_config_parses(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)
    assert load_config(path.stem) == cfg  # also by name


@pytest.mark.parametrize("path", ALGO_YAML, ids=lambda p: p.stem)
def test_shipped_algo_snippet_merges_into_default_config(path):
    doc = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - the loader load_config uses
    assert list(doc) == ["algo"]
    tree = msgspec.to_builtins(Config()) | doc
    cfg = msgspec.convert(tree, Config)
    assert cfg.algo.__struct_config__.tag == path.stem
    for key, value in doc["algo"].items():
        if key != "type":
            assert getattr(cfg.algo, key) == (pytest.approx(value) if isinstance(value, float) else value), key


def test_every_yaml_file_is_covered():
    assert set(ALL_YAML) == set(TOP_YAML) | set(ALGO_YAML) | set(RECIPE_YAML) and TOP_YAML and ALGO_YAML
    tags = {t.__struct_config__.tag for t in typing.get_args(AlgoConfig)}
    assert {p.stem for p in ALGO_YAML} == tags


# ------------------------------------------------------------------ entry point


def test_help_is_fast_and_torch_free():
    code = ("import sys, asyncrl.launch, asyncrl.config\n"
            "heavy = [m for m in ('torch', 'transformers', 'numpy', 'zmq') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), check=True, timeout=30)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "asyncrl.launch", "--help"], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "overrides" in out.stdout
    assert elapsed < 2.0, f"--help took {elapsed:.2f}s"


def test_launch_config_error_exits_2_before_starting(tmp_path):
    out = subprocess.run([sys.executable, "-m", "asyncrl.launch", "quickstart", f"run.dir={tmp_path}/run",
                          "learner.stepz=3"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert "learner.stepz" in out.stderr and "did you mean learner.steps" in out.stderr
    assert not (tmp_path / "run").exists()  # nothing written, nothing started


def test_lpreg_off_policy_at_a_large_lr_is_flagged():
    from asyncrl.config import advisories

    risky = load_config("quickstart", ["algo.type=lpreg", "learner.ppo_mini_batches=8", "learner.prompts_per_step=16"])
    (advice,) = advisories(risky)
    assert "learner.lr=0.0001" in advice and "[0, 10]" in advice and "beta=1" in advice
    assert advisories(load_config("quickstart", ["algo.type=lpreg"])) == []  # on-policy
    assert advisories(load_config("quickstart", ["algo.type=grpo", "learner.ppo_mini_batches=8",
                                                 "learner.prompts_per_step=16"])) == []
    for recipe in ("recipes/qwen3_14b_lpreg_offpolicy", "recipes/qwen25_32b_lpreg_offpolicy"):
        assert advisories(load_config(recipe)) == []  # the paper's lr 1e-6


def test_training_top_p_below_one_is_refused():
    """The learner's log-probs are of the full distribution: nucleus sampling would bias
    every importance weight, so training refuses it at start-up, naming the key."""
    msg = error(overrides=["generator.top_p=0.7"])
    assert "generator.top_p" in msg and "generator.top_p=1" in msg
    assert load_config("quickstart", ["eval.top_p=0.7"]).eval.top_p == 0.7  # evaluation may use it
