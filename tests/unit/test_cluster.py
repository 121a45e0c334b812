"""Cluster config: the shipped 64-GPU recipes parse with the paper's settings, the
placement plan packs learner ranks on the first nodes and generators on the rest,
``--dry-run`` prints it without starting anything, and settings that cannot work
together (weights transport vs engine, disk without shared storage, hybrid mesh
shape, a cluster too small) are start-up errors that name the fix."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from asyncrl.cluster.placement import plan_placement
from asyncrl.config import CONFIG_DIR, ConfigError, load_config
from asyncrl.launch import main as launch_main

RECIPES = sorted((CONFIG_DIR / "recipes").glob("*.yaml"))


def test_four_recipes_are_shipped():
    assert [r.stem for r in RECIPES] == ["qwen25_32b_lpreg_offpolicy", "qwen25_32b_lpreg_onpolicy",
                                         "qwen3_14b_lpreg_offpolicy", "qwen3_14b_lpreg_onpolicy"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_with_the_paper_settings(path: Path):
    cfg = load_config(str(path))
    a, lc, g = cfg.algo, cfg.learner, cfg.generator
    assert a.__struct_config__.tag == "lpreg"
    assert (a.kappa, a.beta, a.clip_low, a.clip_high, a.rho_pos) == (0.02, 1.0, 1.0, 9.0, 0.0)
    assert a.rho == (0.01 if "qwen3_14b" in path.stem else 0.005)
    assert (lc.lr, lc.prompts_per_step, g.samples_per_prompt, g.temperature) == (1e-6, 256, 8, 1.0)
    assert lc.ppo_mini_batches == (1 if "onpolicy" in path.stem else 8)
    assert (cfg.data.max_prompt_length, g.max_tokens) == (2048, 8192)
    assert any("dapo" in f for f in cfg.data.train_files)
    assert (cfg.cluster.backend, g.engine, cfg.transport.weights) == ("ray", "vllm", "nccl")
    assert cfg.cluster.nodes * cfg.cluster.gpus_per_node == 64


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_plan_on_8_nodes_of_8_gpus(path: Path):
    cfg = load_config(str(path))
    plan = plan_placement(cfg)
    learners = [p for p in plan if p.role == "learner"]
    gens = [p for p in plan if p.role == "generator"]
    assert [p.index for p in learners] == list(range(32)) and all(p.gpus == 1 for p in learners)
    # learner ranks packed node by node on nodes 0..3, in rank order
    assert Counter(p.node for p in learners) == {0: 8, 1: 8, 2: 8, 3: 8}
    assert [p.node for p in learners] == sorted(p.node for p in learners)
    assert {p.node for p in gens} == {4, 5, 6, 7}
    assert len(gens) * cfg.cluster.generator_gpus == 32
    for node in range(8):  # nothing oversubscribed
        assert sum(p.gpus for p in plan if p.node == node) <= 8


def test_dry_run_prints_the_plan_and_starts_nothing(capsys, tmp_path):
    recipe = CONFIG_DIR / "recipes" / "qwen3_14b_lpreg_onpolicy.yaml"
    assert launch_main([str(recipe), "--dry-run", f"run.dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert "8 node(s) x 8 GPU(s)" in out and "learner mesh hybrid" in out
    assert "node 0: 8/8 GPUs\n  learner ranks 0, 1, 2, 3, 4, 5, 6, 7" in out
    assert "node 7: 8/8 GPUs\n  generator workers 12, 13, 14, 15 (2 GPU" in out
    assert not (tmp_path / "run").exists()


def test_cpu_plan_puts_everything_on_one_node():
    cfg = load_config("quickstart", ["learner.world_size=2", "generator.num_workers=2", "learner.prompts_per_step=4"])
    plan = plan_placement(cfg)
    assert [(p.role, p.index, p.node, p.gpus) for p in plan] == [
        ("learner", 0, 0, 0), ("learner", 1, 0, 0), ("generator", 0, 0, 0), ("generator", 1, 0, 0)]


def test_plan_fills_the_learners_last_node():
    cfg = load_config("quickstart", ["cluster.nodes=2", "cluster.gpus_per_node=4", "cluster.learner_gpus=1",
                                     "cluster.generator_gpus=2", "learner.world_size=2", "generator.num_workers=3",
                                     "learner.prompts_per_step=4"])
    assert [(p.name, p.node) for p in plan_placement(cfg)] == [
        ("learner0", 0), ("learner1", 0), ("generator0", 0), ("generator1", 1), ("generator2", 1)]


def test_too_small_cluster_is_an_error():
    cfg = load_config("quickstart", ["cluster.nodes=1", "cluster.gpus_per_node=2", "cluster.learner_gpus=1",
                                     "cluster.generator_gpus=2", "learner.world_size=2", "learner.prompts_per_step=4"])
    with pytest.raises(ConfigError, match="generator 0 does not fit.*raise cluster.nodes"):
        plan_placement(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["transport.weights=nccl"], "transport.weights=nccl broadcasts GPU tensors"),
    (["transport.weights=nccl", "generator.engine=vllm", "cluster.gpus_per_node=8", "cluster.learner_gpus=1"],
     "GPU engines"),
    (["transport.weights=disk", "cluster.nodes=2"], "transport.weights_dir"),
    (["transport.weights=disk", "cluster.backend=ray", "cluster.address=auto"], "transport.weights_dir"),
    (["learner.mesh=hybrid"], "learner.mesh=hybrid"),
    (["learner.mesh=hybrid", "cluster.gpus_per_node=8", "cluster.learner_gpus=1", "learner.world_size=12",
      "learner.prompts_per_step=12"], "multiple of the learner ranks per node"),
    (["cluster.learner_gpus=1"], "exceeds cluster.gpus_per_node"),
    (["cluster.backend=slurm"], "cluster.backend"),
])
def test_mismatched_cluster_settings_fail_at_start_up(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("quickstart", overrides)


def test_disk_with_a_shared_dir_and_local_disk_are_fine():
    load_config("quickstart", ["transport.weights=disk"])  # local: <run.dir>/weights
    load_config("quickstart", ["transport.weights=disk", "cluster.nodes=2", "transport.weights_dir=/shared/w"])
