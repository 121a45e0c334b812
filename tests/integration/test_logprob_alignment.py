"""The glue between sampler and learner, end to end: answers sampled by the real
``hf`` engine (``asyncrl.generator.worker.build_engine`` + ``run_prompts``), sent
through the wire codec, decoded as the hub does, padded by ``build_batch`` and scored
by the learner's own policy (``build_policy``: FSDP2 on one gloo rank, float32) give
back the generator's sampled log-probs at every response token, within 1e-5.

Any misalignment between the three (a target shifted by one position, log-probs
reversed or taken from another sample, the temperature applied on one side only)
shows up as a difference of order 0.1-1 here: the model is initialised with a large
scale (0.3) so next-token distributions are far from uniform, and the answers are
long enough (up to 24 tokens, different lengths) that every position is exercised.
Top-p is not included: the learner refuses ``generator.top_p < 1`` for training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asyncrl.config import load_config
from asyncrl.generator.worker import build_engine, run_prompts
from asyncrl.kernels import IGNORE_INDEX
from asyncrl.learner.batch import build_batch
from asyncrl.learner.hub import Group
from asyncrl.learner.main import build_policy
from asyncrl.wire.codec import decode_checked, encode, trajectory_arrays
from asyncrl.wire.schema import PromptGroup, Prompts, TrajectoryGroup

from testkit import make_tiny_model, one_gloo_rank

ATOL = 1e-5
PROMPTS = ["1+2=", "417+385+296=", "9=", "12+345+6="]  # different lengths: left padding in the engine
N = 3  # answers per prompt
MAX_TOKENS = 24


one_rank = pytest.fixture(scope="module")(one_gloo_rank)


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("peaked") / "model", seed=0, initializer_range=0.3)


def sample_groups(cfg, tok, engine) -> list[Group]:
    """What the hub holds after receiving the generator's answers (wire round trip)."""
    groups = [PromptGroup(group_id=i, prompt_ids=tok(p)["input_ids"], ground_truth="0", data_source="asyncrl/arith")
              for i, p in enumerate(PROMPTS)]
    msg = Prompts(groups=groups, min_version=0, n=N, temperature=cfg.generator.temperature,
                  top_p=cfg.generator.top_p, max_tokens=cfg.generator.max_tokens)
    out = []
    for header, frames in run_prompts(engine, tok, msg, worker_id=0):
        got, arrays = decode_checked(encode(header, frames))
        assert isinstance(got, TrajectoryGroup)
        out.append(Group(got, trajectory_arrays(got, arrays)))
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_learner_recomputes_the_generators_logprobs(one_rank, peaked_model, temperature):
    cfg = load_config("quickstart", [f"model.path={peaked_model}", f"generator.temperature={temperature}",
                                     f"generator.max_tokens={MAX_TOKENS}", f"generator.samples_per_prompt={N}",
                                     "learner.world_size=1", "run.seed=5"])
    engine, tok = build_engine(cfg, worker_id=0)
    groups = sample_groups(cfg, tok, engine)
    lengths = [len(s.token_ids) for g in groups for s in g.samples]
    assert max(lengths) >= 8 and len(set(lengths)) > 1, lengths  # long, ragged answers

    batch = build_batch(groups, tok.pad_token_id, scale_advantages=True)
    policy, _ = build_policy(cfg, torch.device("cpu"))
    with torch.no_grad():
        lp, _, _ = policy(batch.input_ids, batch.targets, temperature=temperature)

    mask = batch.mask
    assert int(mask.sum()) == sum(lengths)
    rows = [(g.msg.prompt_ids, s) for g in groups for s in g.samples]
    for i, (prompt, s) in enumerate(rows):  # the padded layout, row by row, against the wire arrays
        got = batch.targets[i][mask[i]]
        assert got.tolist() == s.token_ids.tolist(), f"row {i}: targets are not the sampled tokens in order"
        assert batch.input_ids[i, : len(prompt)].tolist() == list(prompt)
        np.testing.assert_array_equal(batch.behaviour_logprobs[i][mask[i]].numpy(), s.logprobs)
        sampled = lp[i][mask[i]]
        diff = (sampled - torch.from_numpy(s.logprobs.astype(np.float32))).abs()
        assert float(diff.max()) <= ATOL, (
            f"row {i} (T={temperature}): learner vs generator log-prob differ by {float(diff.max()):.3g} "
            f"at response token {int(diff.argmax())} of {len(s.token_ids)}")
    assert bool((batch.targets[~mask] == IGNORE_INDEX).all())
    # the test has teeth: log-probs vary along an answer, so a one-token shift is visible
    assert float(batch.behaviour_logprobs[mask].std()) > 0.1
    assert float((lp - batch.behaviour_logprobs)[mask].abs().max()) <= ATOL
