"""Environments for the generator's episodes (issue #18): the protocol
(``asyncrl.envs.base``), the single-turn and tool-calling environments, and the episode
runner (``asyncrl.envs.runner``). ``build_env`` maps ``env.type`` to an environment;
a new environment type adds its branch there and its name to ``EnvConfig.type``."""

from __future__ import annotations

from asyncrl.envs.base import Environment, Finish, Observation, Session, ToolCall, Turn
from asyncrl.envs.runner import Episode, EpisodeLimits, resolve_stops, run_episodes
from asyncrl.envs.single_turn import SingleTurnEnv
from asyncrl.envs.tools import ToolEnv, ToolSyntax

__all__ = ["Environment", "Episode", "EpisodeLimits", "Finish", "Observation", "Session", "SingleTurnEnv",
           "ToolCall", "ToolEnv", "ToolSyntax", "Turn", "build_env", "build_tools", "check_stops",
           "episode_limits", "resolve_stops", "run_episodes"]


def build_env(cfg) -> Environment:
    """The environment of ``cfg.env`` (a ``Config``)."""
    e = cfg.env
    if e.type == "single_turn":
        return SingleTurnEnv()
    if e.type == "tools":
        return ToolEnv(tuple(ToolSyntax(t.name, t.start, t.end) for t in e.tools), e.output_template)
    if e.type == "calc_tool":
        from asyncrl.envs.calc import CalcToolEnv

        return CalcToolEnv()
    raise ValueError(f"env.type {e.type!r} has no environment in asyncrl.envs.build_env")


def episode_limits(cfg) -> EpisodeLimits:
    return EpisodeLimits(max_turns=1 if cfg.env.type == "single_turn" else cfg.env.max_turns,
                         max_turn_tokens=cfg.env.max_turn_tokens)


def check_stops(env: Environment, tok, engine: str) -> None:
    """Refuse at start-up stop strings the engine cannot honour: hf and sglang stop on
    token ids only, so every delimiter must be a single token of this tokenizer."""
    _, strings = resolve_stops(tok, env.stop)
    if strings and engine != "vllm":
        raise ValueError(f"env stop strings {list(strings)} are not single tokens of this tokenizer, and "
                         f"generator.engine={engine} stops on token ids only; use one-token delimiters in "
                         "env.tools (e.g. one character with the built-in tokenizer) or generator.engine=vllm")


def build_tools(cfg):
    """The tool pool of ``env.type: tools`` (None for environments without tools)."""
    if cfg.env.type not in ("tools", "calc_tool"):
        return None
    from asyncrl.tools import ToolPool  # only runs where tools are configured

    e = cfg.env
    names = tuple(dict.fromkeys(t.name for t in e.tools))  # the pool refuses a name it has no tool for
    if e.type == "calc_tool":
        from asyncrl.envs.calc import TOOL

        names = (TOOL,)
    return ToolPool(processes=e.tool_processes, timeout_s=e.tool_timeout_s, max_output_chars=e.max_output_chars,
                    tools=names)
