"""A three-turn episode on the real vllm engine (asyncrl.envs.runner): each model token's
log-prob equals a float32 transformers recomputation over the whole context (prompt,
earlier turns and the observations in between), so every turn continued the right
context; the second turn's context is served by the prefix cache (not prefilled
again); and weights loaded between turn 2 and turn 3 label turn 3's tokens."""

from __future__ import annotations

import random

import pytest
import torch

from asyncrl.envs import EpisodeLimits, Finish, Observation, run_episodes
from asyncrl.generator.engine import SamplingParams
from asyncrl.tasks.tokenizer import build_char_tokenizer
from asyncrl.wire.schema import PromptGroup

pytestmark = pytest.mark.vllm

TOK = build_char_tokenizer()
OBS = "=5;"
T = 0.8


class TwoObservations:
    """Appends ``=5;`` after turns 1 and 2 whatever the model wrote, finishes after turn 3."""

    stop = ()

    def start(self, problem):
        return self

    def step(self, turn):
        return Observation(OBS) if turn.index < 2 else Finish(reward=1.0)

    def tool_output(self, output):
        raise AssertionError


class Counted:
    """The engine, with the prefix-cache counters read around each call."""

    def __init__(self, engine) -> None:
        self.engine, self.cached = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, params, between_steps=None):
        before = self.engine.cached_tokens
        out = self.engine.generate(prompts, params, between_steps)
        self.cached.append(self.engine.cached_tokens - before)
        return out


@pytest.fixture(scope="module")
def engine(vllm_model_dir):
    from asyncrl.generator.vllm_engine import VLLMEngine

    # prompts longer than one KV block (128 tokens on CPU): only whole blocks are cached
    e = VLLMEngine(str(vllm_model_dir), dtype="float32", seed=0, kv_cache_bytes=64 << 20, max_model_len=256)
    yield e
    e.shutdown()


def test_three_turn_episode_continues_its_context(engine, vllm_model_dir):
    from transformers import AutoModelForCausalLM

    rng = random.Random(7)
    groups = [PromptGroup(group_id=i, prompt_ids=[rng.randrange(2, len(TOK)) for _ in range(150)], ground_truth="",
                          data_source="x") for i in range(2)]
    hf = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()
    same = [(k, v.clone()) for k, v in hf.state_dict().items() if k != "lm_head.weight"]  # tied
    counted, v0 = Counted(engine), engine.version

    def between_steps():  # the worker's poll: new weights (a new version) arrive after turn 2
        if len(counted.cached) == 2 and engine.version == v0:
            engine.load_weights(same, v0 + 1)

    eps = [e for g in run_episodes(counted, TOK, TwoObservations(), groups,
                                   SamplingParams(n=2, max_tokens=48, temperature=T),
                                   EpisodeLimits(max_turns=3, max_turn_tokens=6), between_steps) for e in g]
    obs = TOK.encode(OBS, add_special_tokens=False)
    assert len(counted.cached) == 3 and all(e.turns == 3 for e in eps)
    for e in eps:
        ctx = torch.tensor([list(e.group.prompt_ids) + e.token_ids])
        with torch.no_grad():
            logits = hf(input_ids=ctx).logits[0, len(e.group.prompt_ids) - 1 : -1].float()
        ref = torch.log_softmax(logits / T, -1).gather(-1, torch.tensor(e.token_ids)[:, None])[:, 0]
        model = torch.tensor(e.mask, dtype=torch.bool)
        assert (torch.tensor(e.logprobs)[model] - ref[model]).abs().max() < 1e-4
        turns = "".join("m" if m else "e" for m in e.mask).split("e" * len(obs))
        assert len(turns) == 3 and all(1 <= len(t) <= 6 and set(t) == {"m"} for t in turns)
        assert [t for t, m in zip(e.token_ids, e.mask) if not m] == obs * 2
        n1, n2 = len(turns[0]), len(turns[1])
        cut = len(turns[2]) == 6 and e.token_ids[-1] != TOK.eos_token_id  # the last turn hit max_turn_tokens
        assert e.finish_reason == ("length" if cut else "stop")
        model_versions = [v for v, m in zip(e.versions, e.mask) if m]
        assert model_versions == [v0] * (n1 + n2) + [v0 + 1] * len(turns[2])
    # turn 2: each episode's context (150-token prompt + turn 1 + observation, under 256)
    # starts with its first 128-token block from the cache. Turn 1 and turn 3 (after the
    # weight update, which empties the cache) only share a prompt's block between its n copies.
    assert counted.cached[1] == 128 * len(eps)
    assert counted.cached[0] == counted.cached[2] <= 128 * len(groups)
