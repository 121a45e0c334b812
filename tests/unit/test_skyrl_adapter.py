"""The skyrl-gym adapter (asyncrl/envs/skyrl.py) runs skyrl-gym's own environments,
unchanged, through asyncrl's episode runner on a scripted engine: the context an
episode builds is exactly the chat template's rendering of the conversation (model
turns as sampled, observations as continuations), environment tokens are masked, the
episode's reward is the sum (or last) of skyrl-gym's turn rewards."""

from __future__ import annotations

import pytest

pytest.importorskip("skyrl_gym")

from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput  # noqa: E402

from asyncrl.envs.runner import EpisodeLimits, run_episodes  # noqa: E402
from asyncrl.envs.skyrl import SkyRLEnv, continuation  # noqa: E402
from asyncrl.generator.engine import Completion, SamplingParams  # noqa: E402
from asyncrl.tasks.tokenizer import ASCII, CHAT_TEMPLATE, build_char_tokenizer  # noqa: E402
from asyncrl.wire.schema import PromptGroup  # noqa: E402

# a template with role markers and an end-of-turn EOS after assistant messages, like real chat models
ROLE_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
MULTI_TURN_ASK = ("Please provide your step-by-step reasoning, and also include a tentative numeric answer at "
                  "the end in the exact format: '#### ANSWER'.")


def tokenizer(template: str = ROLE_TEMPLATE):
    tok = build_char_tokenizer(ASCII)
    tok.chat_template = template
    return tok


class ScriptedEngine:
    """Answers turn k of every episode with ``turns[k]`` (then EOS), log-prob -0.5 per token;
    records every context it was asked to continue."""

    version = 3

    def __init__(self, tok, turns: list[str]) -> None:
        self.tok, self.turns, self.contexts, self.calls = tok, turns, [], 0

    def generate(self, prompts, params: SamplingParams, between_steps=None):
        assert params.n == 1 and self.tok.eos_token_id in params.stop_token_ids
        text = self.turns[self.calls]
        self.calls += 1
        self.contexts += [list(p) for p in prompts]
        ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
        return [[Completion(list(ids), [-0.5] * len(ids), [self.version] * len(ids), "stop")] for _ in prompts]


def group(tok, question: str, answer: str) -> PromptGroup:
    ids = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                  add_generation_prompt=True)["input_ids"]
    return PromptGroup(group_id=0, prompt_ids=list(ids), ground_truth=answer, data_source="gsm8k")


def run(env, engine, groups, n=1, max_turns=5, max_tokens=400):
    return run_episodes(engine, engine.tok, env, groups, SamplingParams(n=n, max_tokens=max_tokens),
                        EpisodeLimits(max_turns=max_turns))


def test_gsm8k_single_turn_rewards_the_answer():
    tok = tokenizer()
    right = run(SkyRLEnv("gsm8k", tok), ScriptedEngine(tok, ["so #### 42"]), [group(tok, "6*7?", "42")], n=2)
    wrong = run(SkyRLEnv("gsm8k", tok), ScriptedEngine(tok, ["so #### 41"]), [group(tok, "6*7?", "42")])
    assert [e.reward for e in right[0]] == [1.0, 1.0] and wrong[0][0].reward == 0.0
    e = right[0][0]
    assert e.turns == 1 and e.finish_reason == "stop" and set(e.mask) == {1}
    assert tok.decode(e.token_ids, skip_special_tokens=True) == "so #### 42"


@pytest.mark.parametrize("reward", ["sum", "last"])
def test_gsm8k_multi_turn_context_is_the_chat_rendering(reward):
    """Turn 1 formatted but wrong (skyrl-gym's per-turn format score 0.2/max_turns), turn 2
    right: two turns, one observation, and the tokens are the template's rendering of the
    whole conversation."""
    tok = tokenizer()
    g = group(tok, "6*7?", "42")
    engine = ScriptedEngine(tok, ["guess #### 41", "#### 42"])
    env = SkyRLEnv("gsm8k_multi_turn", tok, extras={"max_turns": 5}, reward=reward)
    [[e]] = run(env, engine, [g])
    conversation = [{"role": "user", "content": "6*7?"}, {"role": "assistant", "content": "guess #### 41"},
                    {"role": "user", "content": MULTI_TURN_ASK}, {"role": "assistant", "content": "#### 42"}]
    expected = tok.apply_chat_template(conversation, tokenize=True)["input_ids"]
    # all of it but the template's "\n" after the final EOS (which ends the episode)
    assert list(g.prompt_ids) + e.token_ids == expected[:-1] and tok.decode(expected[-1:]) == "\n"
    assert e.turns == 2 and e.finish_reason == "stop"
    assert e.reward == (0.2 / 5 + 1.0 if reward == "sum" else 1.0)
    # mask: model turns (each ending with its sampled EOS) are 1, the observation between them 0
    turn1 = len(tok.encode("guess #### 41", add_special_tokens=False)) + 1
    turn2 = len(tok.encode("#### 42", add_special_tokens=False)) + 1
    obs = len(e.token_ids) - turn1 - turn2
    assert e.mask == [1] * turn1 + [0] * obs + [1] * turn2
    assert e.logprobs[turn1:turn1 + obs] == [0.0] * obs and e.versions[turn1:turn1 + obs] == [-1] * obs
    assert tok.decode(e.token_ids[turn1:turn1 + obs]) == f"\n<user>{MULTI_TURN_ASK}\n<assistant>"
    # the second round continued the first context: prompt + turn 1 + observation
    assert engine.contexts[1] == list(g.prompt_ids) + e.token_ids[:turn1 + obs]
    assert e.session.metrics() == {"steps": 2.0}


def test_gsm8k_multi_turn_stops_at_its_own_turn_limit():
    """Never right: skyrl-gym's environment ends the episode after its max_turns (3), before
    asyncrl's limit (5); the reward is the three format scores."""
    tok = tokenizer()
    engine = ScriptedEngine(tok, ["#### 1", "#### 2", "#### 3", "#### 4"])
    [[e]] = run(SkyRLEnv("gsm8k_multi_turn", tok, extras={"max_turns": 3}), engine, [group(tok, "q", "42")])
    assert e.turns == 3 and e.finish_reason == "stop" and engine.calls == 3
    assert e.reward == pytest.approx(3 * (0.2 / 3), abs=1e-15)
    assert sum(1 for a, b in zip(e.mask, e.mask[1:]) if a == 1 and b == 0) == 2  # two observations


def test_asyncrl_turn_limit_cuts_a_longer_skyrl_episode():
    tok = tokenizer()
    engine = ScriptedEngine(tok, ["#### 1", "#### 2", "#### 3"])
    [[e]] = run(SkyRLEnv("gsm8k_multi_turn", tok, extras={"max_turns": 5}), engine, [group(tok, "q", "42")],
                max_turns=2)
    assert e.turns == 2 and e.finish_reason == "turns" and e.reward is None  # the runner's verifier scores it


def test_template_without_assistant_turns_continues_with_the_new_messages_only():
    """The built-in char tokenizers' template renders user contents only."""
    tok = tokenizer(CHAT_TEMPLATE)
    engine = ScriptedEngine(tok, ["#### 41", "#### 42"])
    g = group(tok, "6*7?", "42")
    [[e]] = run(SkyRLEnv("gsm8k_multi_turn", tok, extras={"max_turns": 5}), engine, [g])
    text = tok.decode(e.token_ids, skip_special_tokens=True)
    assert text == "#### 41" + MULTI_TURN_ASK + "#### 42" and e.reward == 0.2 / 5 + 1.0


def test_continuation_does_not_repeat_a_sampled_eos_but_adds_a_missing_one():
    tok = tokenizer()
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    new = [{"role": "user", "content": "more"}]
    assert continuation(tok, history, new, eos_sampled=True) == "\n<user>more\n<assistant>"
    assert continuation(tok, history, new, eos_sampled=False) == "<eos>\n<user>more\n<assistant>"


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # renders the last message differently from the others: appending a message changes the past
    tok = tokenizer("{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}"
                    "{% endif %}{% endfor %}")
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(ValueError, match="renders the conversation differently"):
        continuation(tok, history, [{"role": "user", "content": "b"}], eos_sampled=True)


class RewritesPrompt(BaseTextEnv):
    def __init__(self, env_config=None, extras=None):
        super().__init__()

    def init(self, prompt):
        return [{"role": "system", "content": "be brief"}, *prompt], {}

    def step(self, action):
        return BaseTextEnvStepOutput(observations=[], reward=0.0, done=True, metadata={})


def test_an_env_that_rewrites_the_prompt_is_refused():
    import skyrl_gym

    if "asyncrl_test_rewrites" not in skyrl_gym.registry:
        skyrl_gym.register(id="asyncrl_test_rewrites", entry_point=RewritesPrompt)
    tok = tokenizer()
    with pytest.raises(ValueError, match="rewrote the prompt"):
        run(SkyRLEnv("asyncrl_test_rewrites", tok), ScriptedEngine(tok, ["x"]), [group(tok, "q", "1")])


def test_unknown_env_id_names_the_registered_ones():
    with pytest.raises(ValueError, match="gsm8k_multi_turn"):
        SkyRLEnv("gsm8k_multiturn", tokenizer())
