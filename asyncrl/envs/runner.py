"""The episode runner: many episodes in flight in one engine, advanced in rounds.

A round is one ``engine.generate`` call over the context (prompt + response so far) of
every episode still running, ``n=1`` each, stopping at EOS or the environment's stop
strings, each limited to what is left of its episode's budget. Then every session
reads its turn; the tool calls of the round go to the tool pool together (in other
processes, off the decode loop); observations are tokenized and appended as
environment tokens (mask 0, log-prob 0.0, version -1). Between rounds
``between_steps`` runs (the worker polls for weights there), so weights that arrive
during a turn or between turns sample the later tokens, and each model token carries
the version that sampled it, as engines record within a turn.

Round one is exactly today's single-turn call (the ``n`` copies of each prompt are
the engine's rows in the same order), so a single-turn environment samples the same
tokens as before for the same seed.

Budgets: the request's ``max_tokens`` bounds the whole response (model and
observation tokens, what the learner trains on); ``max_turn_tokens`` (0 = none) caps
one model turn; ``max_turns`` caps model turns. An observation that would leave no
room for a model token is not appended: the episode ends ``length``.

Finish reasons: ``stop`` (the environment finished after a turn that ended at EOS or a
stop string), ``length`` (the budget, or the environment finished after a turn cut by
its limit), ``turns`` (the environment wanted another turn at ``max_turns``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable

from asyncrl.envs.base import Environment, Finish, Observation, Session, ToolCall, Turn, TurnEnd
from asyncrl.generator.engine import Completion, Engine, SamplingParams
from asyncrl.wire.schema import PromptGroup

log = logging.getLogger(__name__)
_PAD_WARNED: list[bool] = []


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 1
    max_turn_tokens: int = 0  # 0 = what is left of the episode's budget


@dataclass
class Episode:
    """One sample: its response (model turns and observations interleaved), how it ended."""

    group: PromptGroup
    session: Session
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)  # 1 = sampled by the model, 0 = environment
    turns: int = 0
    finish_reason: str = ""  # "" while running
    reward: float | None = None  # None: the verifier scores `answer`
    answer: str | None = None  # None: the whole response text

    @property
    def model_tokens(self) -> int:
        return sum(self.mask)

    def add_turn(self, c: Completion) -> None:
        self.token_ids += c.token_ids
        self.logprobs += c.logprobs
        self.versions += c.versions
        self.mask += [1] * len(c.token_ids)
        self.turns += 1

    def add_observation(self, ids: list[int]) -> None:
        self.token_ids += ids
        self.logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)
        self.mask += [0] * len(ids)

    def finish(self, reason: str, done: Finish | None = None) -> None:
        self.finish_reason = reason
        if done is not None:
            self.reward, self.answer = done.reward, done.answer


def resolve_stops(tok, stop: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(stop token ids, stop strings): a stop string that is exactly one token becomes
    its id (exact on every engine); any other stays a string."""
    ids, strings = [], []
    for s in stop:
        enc = tok.encode(s, add_special_tokens=False)
        if len(enc) == 1 and tok.decode(enc) == s:
            ids.append(enc[0])
        else:
            strings.append(s)
    return tuple(ids), tuple(strings)


def _turn_end(c: Completion, eos: int) -> TurnEnd:
    if c.finish_reason == "length":
        return "length"
    return "eos" if c.token_ids and c.token_ids[-1] == eos else "stop"


class _Round:
    """What one round's replies ask for: tool calls to run, observations to append."""

    def __init__(self) -> None:
        self.calls: list[tuple[Episode, ToolCall]] = []
        self.observe: list[tuple[Episode, Observation]] = []


def run_episodes(engine: Engine, tok, env: Environment, groups: list[PromptGroup], params: SamplingParams,
                 limits: EpisodeLimits = EpisodeLimits(), between_steps: Callable[[], None] | None = None,
                 tools=None) -> list[list[Episode]]:
    """``params.n`` episodes per group, every one finished; per group, in sample order.
    ``params.max_tokens`` is each episode's response budget; ``tools``: an object with
    ``run(calls: list[tuple[str, str]]) -> list[str]`` (``asyncrl.tools.ToolPool``).
    :class:`GenerationInterrupted` from ``between_steps`` propagates (the caller resamples)."""
    episodes = [Episode(g, env.start(g)) for g in groups for _ in range(params.n)]
    stop_ids, stop_strings = resolve_stops(tok, env.stop)
    eos = tok.eos_token_id
    turn_params = SamplingParams(n=1, max_tokens=params.max_tokens, temperature=params.temperature,
                                 top_p=params.top_p, stop_token_ids=tuple(dict.fromkeys((eos, *stop_ids))),
                                 stop_strings=stop_strings)
    active, first = episodes, True
    while active:
        if not first and between_steps is not None:  # before round one the worker polled already
            between_steps()
        first = False
        budget = [_turn_budget(e, params.max_tokens, limits) for e in active]
        outs = engine.generate([list(e.group.prompt_ids) + e.token_ids for e in active],
                               _with_limits(turn_params, budget), between_steps=between_steps)
        todo = _Round()
        for e, [c] in zip(active, outs):
            e.add_turn(c)
            end = _turn_end(c, eos)
            reply = e.session.step(Turn(tok.decode(c.token_ids, skip_special_tokens=True), tuple(c.token_ids), end,
                                        e.turns - 1))
            _dispatch(e, reply, end, todo, params.max_tokens, limits)
        _run_tools(todo, tools)
        for e, obs in todo.observe:
            ids = list(obs.token_ids) if obs.token_ids is not None else tok.encode(obs.text, add_special_tokens=False)
            if tok.pad_token_id in ids and not _PAD_WARNED:  # the char tokenizer reads characters it lacks as <pad>
                _PAD_WARNED.append(True)
                log.warning("an observation encodes to <pad> tokens (characters outside the vocabulary?): %r; "
                            "said once", obs.text[:200])
            if len(e.token_ids) + len(ids) >= params.max_tokens:  # no room left for a model token
                e.finish("length")
            else:
                e.add_observation(ids)
        active = [e for e in active if not e.finish_reason]
    return [episodes[i : i + params.n] for i in range(0, len(episodes), params.n)]


def _turn_budget(e: Episode, max_tokens: int, limits: EpisodeLimits) -> int:
    left = max_tokens - len(e.token_ids)
    return min(left, limits.max_turn_tokens) if limits.max_turn_tokens else left


def _with_limits(p: SamplingParams, budget: list[int]) -> SamplingParams:
    """One limit for the call when all agree (round one: today's exact parameters),
    else a limit per prompt."""
    if len(set(budget)) == 1:
        return replace(p, max_tokens=budget[0])
    return replace(p, max_tokens=max(budget), limits=tuple(budget))


def _dispatch(e: Episode, reply, end: TurnEnd, todo: _Round, max_tokens: int, limits: EpisodeLimits) -> None:
    """Act on a session's reply to a turn: finish, or queue its tool call / observation
    unless a limit ends the episode first."""
    if isinstance(reply, Finish):
        e.finish("length" if end == "length" else "stop", reply)
    elif not isinstance(reply, (Observation, ToolCall)):
        raise TypeError(f"an environment session answered {type(reply).__name__}; expected Observation, "
                        "ToolCall or Finish")
    elif e.turns >= limits.max_turns:
        e.finish("turns")
    elif len(e.token_ids) >= max_tokens:
        e.finish("length")
    elif isinstance(reply, ToolCall):
        todo.calls.append((e, reply))
    else:
        todo.observe.append((e, reply))


def _run_tools(todo: _Round, tools) -> None:
    """Every tool call of the round in one batch to the pool; each output back to its
    session, whose answer is an observation (queued) or a finish."""
    if not todo.calls:
        return
    if tools is None:
        raise RuntimeError(f"the environment called tool {todo.calls[0][1].tool!r} but this generator has no "
                           "tool pool (env.type: tools builds one)")
    outputs = tools.run([(call.tool, call.input) for _, call in todo.calls])
    if len(outputs) != len(todo.calls):
        raise RuntimeError(f"the tool pool answered {len(outputs)} of {len(todo.calls)} calls")
    for (e, _), out in zip(todo.calls, outputs):
        reply = e.session.tool_output(out)
        if isinstance(reply, Finish):
            e.finish("stop", reply)
        elif isinstance(reply, Observation):
            todo.observe.append((e, reply))
        else:
            raise TypeError(f"tool_output answered {type(reply).__name__}; expected Observation or Finish")
