"""The ``env`` config section (validated at start-up, errors naming the fix), building
the environment from it, stop-string resolution per tokenizer and engine, and the tool
environment's call parsing."""

from __future__ import annotations

import pytest

from asyncrl.config import ConfigError, load_config
from asyncrl.envs import Finish, SingleTurnEnv, ToolCall, ToolEnv, Turn, build_env, check_stops, episode_limits
from asyncrl.envs.runner import resolve_stops
from asyncrl.envs.tools import ToolSyntax, parse_call
from asyncrl.tasks.tokenizer import ASCII, build_char_tokenizer

CALC = ["env.type=tools", "env.tools=[{name: calculator, start: '<calc>', end: '</calc>'}]"]


def test_default_is_single_turn():
    cfg = load_config("quickstart")
    assert isinstance(build_env(cfg), SingleTurnEnv) and episode_limits(cfg).max_turns == 1


def test_tools_section_builds_a_tool_env():
    cfg = load_config("quickstart", CALC + ["env.max_turns=3", "env.output_template=<out>{output}</out>"])
    env = build_env(cfg)
    assert isinstance(env, ToolEnv) and env.stop == ("</calc>",) and episode_limits(cfg).max_turns == 3
    assert env.start(None).tool_output("5").text == "<out>5</out>"


@pytest.mark.parametrize("overrides, fix", [
    (["env.type=tools"], "env.tools=[{name: calculator"),
    (["env.tools=[{name: calculator, start: '(', end: ')'}]"], "set env.type=tools"),
    (CALC + ["env.output_template=<out></out>"], "must contain {output}"),
    (CALC + ["env.max_turns=0"], "env.max_turns must be >= 1"),
    (["env.type=multi"], "env.type"),
    (["env.max_turn=3"], "did you mean env.max_turns"),
    (["env.type=tools", "env.tools=[{name: calculator, start: '', end: ')'}]"], "non-empty start and end"),
    (["env.type=tools", "env.tools=[{name: calculator, start: '(', ende: ')'}]"], "did you mean env.tools.0.end"),
])
def test_bad_env_config_names_the_fix(overrides, fix):
    with pytest.raises(ConfigError, match=fix.replace("[", r"\[").replace("{", r"\{")):
        load_config("quickstart", overrides)


def test_stops_one_token_become_ids_longer_ones_stay_strings():
    tok = build_char_tokenizer(ASCII)
    assert resolve_stops(tok, (")", "</calc>")) == ((tok.convert_tokens_to_ids(")"),), ("</calc>",))
    small = build_char_tokenizer()  # the quickstart vocabulary has no '<': it reads as <pad>, never a stop id
    assert resolve_stops(small, ("<",)) == ((), ("<",))
    env = ToolEnv((ToolSyntax("calculator", "<calc>", "</calc>"),))
    with pytest.raises(ValueError, match="generator.engine=hf stops on token ids only"):
        check_stops(env, tok, "hf")
    check_stops(env, tok, "vllm")
    check_stops(ToolEnv((ToolSyntax("calculator", "(", ")"),)), tok, "sglang")


@pytest.mark.parametrize("text, call", [
    ("so <calc>2+3</calc>", ToolCall("calculator", "2+3")),
    ("<calc>1</calc> then <calc>4*4</calc>", ToolCall("calculator", "4*4")),
    ("<py>print(1)</py>\n", ToolCall("python", "print(1)")),  # a little text after a multi-token stop
    ("<calc>1</calc> <py>x = '</calc>'</py>", ToolCall("python", "x = '</calc>'")),  # the closing one that is last
    ("no call </calc>", None),
    ("", None),
])
def test_parse_call(text, call):
    tools = (ToolSyntax("calculator", "<calc>", "</calc>"), ToolSyntax("python", "<py>", "</py>"))
    assert parse_call(text, tools) == call


def test_tool_session_finishes_on_eos_or_a_malformed_call():
    s = ToolEnv((ToolSyntax("calculator", "(", ")"),)).start(None)
    assert s.step(Turn("x(1+2)", (), "stop", 0)) == ToolCall("calculator", "1+2")
    assert s.step(Turn("#3", (), "eos", 1)) == Finish(answer="#3")
    assert s.step(Turn("1+2)", (), "stop", 1)) == Finish(answer="1+2)")
    assert s.step(Turn("x(1+2", (), "length", 1)) == Finish(answer="x(1+2")
