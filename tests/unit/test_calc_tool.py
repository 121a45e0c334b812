"""The calculator tool-use task and its environment: problems and the verifier, the call
syntax, the warm-start traces (the observations masked out of the SFT loss), and
episodes through the real runner on a scripted engine with the real calculator."""

from __future__ import annotations

import random
import re

import pytest

from asyncrl.config import load_config
from asyncrl.envs import build_env
from asyncrl.envs.calc import CalcToolEnv, parse_value
from asyncrl.envs.runner import EpisodeLimits, run_episodes
from asyncrl.generator.engine import Completion, SamplingParams
from asyncrl.tasks import build_task, verify
from asyncrl.tasks.base import find_sparks
from asyncrl.tasks.calc_tool import (CHARS, DATA_SOURCE, TRACE_MIX, call_text, expression, extract_answer,
                                     malformed_call, observation, terms_of, trace, value_of)
from asyncrl.tasks.tokenizer import build_char_tokenizer
from asyncrl.warmstart import response_tokens
from asyncrl.wire.schema import PromptGroup


def test_problems_are_a_times_b_plus_c_and_deterministic():
    task = build_task("calc_tool", terms=3, digits=3)
    for i in range(200):
        p = task.sample(0, i)
        m = re.fullmatch(r"(\d{3})\*(\d{3})\+(\d{3})=", p.prompt)
        assert m, p.prompt
        a, b, c = map(int, m.groups())
        assert p.ground_truth == str(a * b + c) and p.data_source == DATA_SOURCE
        assert terms_of(p.prompt) == [a, b, c] and p == task.sample(0, i)
    assert task.sample(0, 0) != task.sample(-1, 0)  # the held-out seed gives other problems
    two = build_task("calc_tool", terms=2, digits=2).sample(0, 0)
    a, b = terms_of(two.prompt)
    assert two.prompt == f"{a}*{b}=" and two.ground_truth == str(a * b)


@pytest.mark.parametrize("response, reward", [
    ("#155039", 1.0), ("[412*374+951]=155039#155039", 1.0), ("#1#155039", 1.0), ("#155039 ", 1.0),
    ("#155038", 0.0), ("155039", 0.0), ("[412*374+951]=155039", 0.0), ("#", 0.0), ("#155039]", 0.0), ("", 0.0),
])
def test_verifier(response, reward):
    assert verify(DATA_SOURCE, response, "155039") == reward


def test_call_syntax():
    assert call_text("[412*374+951]") == "412*374+951"
    assert call_text("#1[2*3]") == "2*3" and call_text("[1[2*3]") == "2*3"  # the last opening bracket
    assert call_text("[412*374") is None and call_text("#155039") is None and call_text("412]") is None
    assert observation(155039) == "=155039" and observation(None) == "=?"
    assert parse_value("155039") == 155039 and parse_value(" 12.0\n") == 12
    assert parse_value("2.5") is None and parse_value("error: invalid syntax") is None
    assert set("".join(observation(v) for v in (0, 10**6, None))) <= set(CHARS)


def test_sparks_count_calls_in_model_text():
    sparks = find_sparks(DATA_SOURCE)
    assert sparks["tool_call"].search("[1*2]") and not sparks["tool_call"].search("#12")
    assert sparks["product_call"].search("[412*374+951]") and not sparks["product_call"].search("[412*374+]")


def test_traces_follow_the_mix_and_mask_the_observation():
    tok = build_char_tokenizer(CHARS)
    rng = random.Random(0)
    kinds = {"direct": 0, "tool": 0, "malformed": 0}
    for i in range(2000):
        terms = [rng.randint(100, 999) for _ in range(3)]
        segs = trace(terms, rng)
        text = "".join(t for t, _ in segs)
        assert set(text) <= set(CHARS)
        if len(segs) == 1:
            kinds["direct"] += 1
            assert segs[0][1] and extract_answer(text) is not None
            continue
        (call, c_tr), (obs, o_tr), (ans, a_tr) = segs
        assert (c_tr, o_tr, a_tr) == (True, False, True)
        if obs == observation(None):
            kinds["malformed"] += 1
            assert call_text(call) != expression(terms)
        else:
            kinds["tool"] += 1
            assert call_text(call) == expression(terms) and obs == f"={value_of(terms)}"
            assert ans == f"#{value_of(terms)}"
        ids, labels = response_tokens(tok, segs)
        assert ids == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n_call, n_obs = len(call), len(obs)  # one token per character
        assert labels[:n_call] == ids[:n_call] and labels[n_call:n_call + n_obs] == [-100] * n_obs
        assert labels[n_call + n_obs:] == ids[n_call + n_obs:]
    for k, share in TRACE_MIX.items():
        assert abs(kinds[k] / 2000 - share) < 0.04, kinds


def test_plain_string_responses_are_trained_on_throughout():
    tok = build_char_tokenizer(CHARS)
    ids, labels = response_tokens(tok, "#123")
    assert ids == labels == tok("#123")["input_ids"] + [tok.eos_token_id]


# ------------------------------------------------------------- with the real calculator
tools = pytest.importorskip("asyncrl.tools")


@pytest.fixture(scope="module")
def pool():
    with tools.ToolPool(processes=1, timeout_s=5.0, max_output_chars=200) as p:
        yield p


def test_the_calculator_accepts_the_right_call_and_refuses_every_malformed_one(pool):
    rng = random.Random(1)
    good, bad = [], []
    for _ in range(60):
        terms = [rng.randint(100, 999) for _ in range(3)]
        good.append(("calculator", expression(terms)))
        bad.append(("calculator", malformed_call(terms, rng)))
    outs = pool.run(good + bad)
    assert [parse_value(o) for o in outs[:60]] == [value_of(terms_of(g[1] + "=")) for g in good]
    assert [parse_value(o) for o in outs[60:]] == [None] * 60, [(b, o) for b, o in zip(bad, outs[60:])]


class ScriptedEngine:
    """Turn k of episode i is ``script[i][k]`` (EOS appended unless it ends with ']');
    every token has log-prob -1.0 and the engine's version."""

    def __init__(self, tok, scripts: list[list[str]], version: int = 2) -> None:
        self.tok, self.scripts, self.version, self.round = tok, scripts, version, 0

    def generate(self, prompts, params, between_steps=None):
        out = []
        live = [s for s in self.scripts if len(s) > self.round]
        assert len(live) == len(prompts)
        for s in live:
            text = s[self.round]
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            if not text.endswith("]"):
                ids.append(self.tok.eos_token_id)
            out.append([Completion(ids, [-1.0] * len(ids), [self.version] * len(ids), "stop")])
        self.round += 1
        return out


def test_episodes_with_the_real_calculator(pool):
    """Three episodes in one batch: a good call then the answer, a malformed call then a
    retry, a direct guess. Tokens, mask, rewards and per-episode metrics."""
    tok = build_char_tokenizer(CHARS)
    p = build_task("calc_tool").sample(0, 3)
    a, b, c = terms_of(p.prompt)
    v = a * b + c
    scripts = [[f"[{a}*{b}+{c}]", f"#{v}"], [f"[{a}*{b}+]", f"[{a}*{b}+{c}]", f"#{v}"], ["#123"]]
    env = CalcToolEnv()
    assert env.stop == ("]",) and build_env(load_config("calc_tool")).stop == ("]",)
    groups = [PromptGroup(group_id=i, prompt_ids=tok(p.prompt)["input_ids"], ground_truth=p.ground_truth,
                          data_source=p.data_source) for i in range(3)]
    out = run_episodes(ScriptedEngine(tok, scripts), tok, env, groups, SamplingParams(n=1, max_tokens=64),
                       EpisodeLimits(max_turns=3), tools=pool)
    good, retry, direct = (g[0] for g in out)
    assert tok.decode(good.token_ids, skip_special_tokens=True) == f"[{a}*{b}+{c}]={v}#{v}"
    call, obs = len(f"[{a}*{b}+{c}]"), len(f"={v}")
    assert good.mask == [1] * call + [0] * obs + [1] * (len(f"#{v}") + 1)
    assert good.versions[call:call + obs] == [-1] * obs and good.logprobs[call:call + obs] == [0.0] * obs
    assert tok.decode(retry.token_ids, skip_special_tokens=True) == f"[{a}*{b}+]=?[{a}*{b}+{c}]={v}#{v}"
    for e in (good, retry, direct):  # the final turn is the answer the verifier scores
        assert e.reward is None and e.finish_reason == "stop"
    assert [verify(DATA_SOURCE, e.answer, p.ground_truth) for e in (good, retry, direct)] == [1.0, 1.0, 0.0]
    assert good.session.metrics() == {"tool_called": 1.0, "tool_calls": 1.0, "tool_well_formed": 1.0}
    assert retry.session.metrics() == {"tool_called": 1.0, "tool_calls": 2.0, "tool_well_formed": 0.0}
    assert direct.session.metrics() == {"tool_called": 0.0, "tool_calls": 0.0, "tool_well_formed": 0.0}


@pytest.mark.parametrize("overrides", [[], ["learner.max_staleness=1"]])
def test_shipped_config_fits_the_task_and_the_base(overrides):
    """configs/calc_tool.yaml (and its asynchronous variant on the command line): the demo's
    task and environment, a base whose tokenizer has every marker as one token, and a budget
    that holds the longest solved episode."""
    from asyncrl.models import load_tokenizer

    cfg = load_config("calc_tool", overrides)
    assert cfg.task.name == "calc_tool" and cfg.env.type == "calc_tool" and cfg.env.max_turns >= 2
    assert cfg.learner.max_staleness == (1 if overrides else 0)
    tok = load_tokenizer(cfg.model.path)
    for ch in CHARS:
        assert len(tok(ch, add_special_tokens=False)["input_ids"]) == 1 and tok.decode(tok(ch)["input_ids"]) == ch
    d = cfg.task.digits
    longest = [10**d - 1] * cfg.task.terms
    solved = f"[{expression(longest)}]={value_of(longest)}#{value_of(longest)}"
    assert len(tok(solved)["input_ids"]) + 1 <= cfg.generator.max_tokens  # + <eos>
