"""The environment protocol: what a multi-turn (or single-turn) task tells the generator.

An *episode* starts from one problem (a ``PromptGroup``: prompt ids, ground truth, data
source). The engine samples a *model turn* until a stop condition: EOS, one of the
environment's ``stop`` strings (its tool-call delimiters), or a token limit. The
environment's session then reads that turn and answers with one of:

- :class:`Observation` -- text (or token ids) appended to the context as environment
  tokens (mask 0: not trained on), after which the model samples its next turn;
- :class:`ToolCall` -- run ``tool`` on ``input`` in the tool pool (off the decode loop:
  every call of a round goes to the pool at once); the pool's output text comes back
  through :meth:`Session.tool_output`, which answers with an observation or a finish;
- :class:`Finish` -- the episode is over, with a ``reward`` of the environment's own,
  or ``reward=None``: score ``answer`` (default: the whole response text) with the
  task's verifier (``asyncrl.rewards.RewardPool``, as single-turn tasks are scored).

The runner (``asyncrl.envs.runner``) ends an episode itself when the environment wants
to go on but the turn limit (``env.max_turns``) or the episode's token budget (the
request's ``max_tokens``: every response token, model and observation) is used up; the
verifier then scores the whole response. A single-turn task is the one-turn case:
:class:`asyncrl.envs.single_turn.SingleTurnEnv` finishes after the first turn.

To add an environment: implement :class:`Environment` (``stop`` and ``start``) and a
:class:`Session` (``step`` and, if it calls tools, ``tool_output``), then give it a
``env.type`` in ``asyncrl.envs.build``. Sessions run in the generator process between
engine rounds: keep ``step`` cheap (parsing), and put anything slow in a tool.

Stop strings: with a tokenizer where each stop string is one token (the built-in
character tokenizer and a one-character delimiter, or a BPE vocabulary's special
token) they become stop token ids, which every engine honours exactly. Longer ones are
passed as stop strings to engines that support them (vllm); the hf engine stops on
token ids only and refuses them at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Union

from asyncrl.wire.schema import PromptGroup

TurnEnd = Literal["eos", "stop", "length"]


@dataclass(frozen=True)
class Turn:
    """One model turn as the environment sees it. ``text`` is decoded without special
    tokens (EOS removed); ``token_ids`` are exactly what was sampled. ``end``: ``eos``
    (the model ended its answer), ``stop`` (one of the environment's stop strings),
    ``length`` (the turn's token limit)."""

    text: str
    token_ids: tuple[int, ...]
    end: TurnEnd
    index: int  # 0 for the first turn of the episode


@dataclass(frozen=True)
class Observation:
    """Context appended after the model's turn. ``token_ids`` (if given) are used as
    they are; otherwise ``text`` is encoded without special tokens."""

    text: str
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ToolCall:
    """Run ``tool`` (a name the tool pool knows) on ``input``; the output text is
    handed to :meth:`Session.tool_output`."""

    tool: str
    input: str


@dataclass(frozen=True)
class Finish:
    """End the episode. ``reward=None``: the task's verifier scores ``answer``
    (``None``: the whole response, every turn and observation, decoded)."""

    reward: float | None = None
    answer: str | None = None


Reply = Union[Observation, ToolCall, Finish]


class Session(Protocol):
    """One episode's environment state (one per sample; never shared)."""

    def step(self, turn: Turn) -> Reply:
        """React to the model's latest turn."""
        ...

    def tool_output(self, output: str) -> Observation | Finish:
        """The pool's output for the :class:`ToolCall` this session last returned
        (a tool's own failure or time-out arrives here as text too)."""
        ...


class Environment(Protocol):
    stop: tuple[str, ...]
    """Strings that end a model turn besides EOS (e.g. a tool call's closing delimiter)."""

    def start(self, problem: PromptGroup) -> Session:
        """A new episode for ``problem`` (called once per sample, ``n`` per group)."""
        ...
