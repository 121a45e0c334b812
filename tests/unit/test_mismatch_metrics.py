"""mismatch/kl and mismatch/logprob_diff_max through the real train_on_batch (1 gloo
rank, in process): the engine's sampled log-probs against the learner's pi_old, on the
fused on-policy path and on the path with a separate pi_old pass."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import msgspec
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from testkit import one_gloo_rank  # noqa: E402
from test_fsdp_equivalence import make_batch  # noqa: E402


group = pytest.fixture(scope="module")(one_gloo_rank)


def setup(model_dir, algo):
    from torch.distributed.device_mesh import init_device_mesh

    from asyncrl.config import Config
    from asyncrl.learner.fsdp import apply_fsdp
    from asyncrl.learner.policy import Policy
    from asyncrl.models import load_model, load_tokenizer

    cfg = msgspec.convert({"model": {"path": str(model_dir)}, "generator": {"samples_per_prompt": 4, "max_tokens": 10},
                           "learner": {"prompts_per_step": 4, "lr": 1e-3}, "algo": algo}, Config)
    torch.manual_seed(0)
    policy = Policy(load_model(str(model_dir), "float32"))
    apply_fsdp(policy, init_device_mesh("cpu", (1,)))
    tok = load_tokenizer(str(model_dir))
    batch = make_batch(tok.pad_token_id, tok.eos_token_id, len(tok), True)
    with torch.no_grad():  # the policy's own log-probs: what an exact engine would report
        own, _, _ = policy(batch.input_ids, batch.targets, temperature=cfg.generator.temperature)
    return cfg, policy, batch, own


def train(cfg, policy, batch):
    from asyncrl.algos import build_algorithm
    from asyncrl.algos.collective import dist_all_gather
    from asyncrl.learner.train import train_on_batch

    opt = torch.optim.SGD(policy.parameters(), lr=0.0)  # keep the weights: pi_old stays the same
    return train_on_batch(policy, opt, build_algorithm(cfg.algo), batch, cfg, dist_all_gather())


@pytest.mark.parametrize("algo", [{"type": "grpo"}, {"type": "lpreg", "rho": 0.1}], ids=["fused", "old_pass"])
def test_mismatch_metrics(group, tiny_model_dir, algo):
    cfg, policy, batch, own = setup(tiny_model_dir, algo)
    mask = batch.mask
    exact = train(cfg, policy, dataclasses.replace(batch, behaviour_logprobs=own))
    assert exact["mismatch/kl"] < 1e-9 and exact["mismatch/logprob_diff_max"] < 1e-5
    shift = torch.where(mask, torch.linspace(-0.4, 0.3, mask.numel()).reshape(mask.shape), torch.zeros(()))
    got = train(cfg, policy, dataclasses.replace(batch, behaviour_logprobs=own + shift))
    d = -shift[mask].double()  # lp_learner - lp_behaviour
    want_kl = float((torch.expm1(d) - d).mean())
    assert got["mismatch/kl"] == pytest.approx(want_kl, rel=1e-4)
    assert got["mismatch/logprob_diff_max"] == pytest.approx(float(d.abs().max()), rel=1e-4)
