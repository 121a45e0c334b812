"""``env.type: single_turn``: one model turn, scored by the task's verifier.

Today's behaviour of every built-in task (arith, reasoning-gym, dataset files) as the
one-turn case of the environment protocol: no stop strings besides EOS, and the first
turn finishes the episode with ``reward=None`` (the verifier scores the response).
"""

from __future__ import annotations

from asyncrl.envs.base import Finish, Observation, Turn
from asyncrl.wire.schema import PromptGroup


class _OneTurn:
    def step(self, turn: Turn) -> Finish:
        return Finish()

    def tool_output(self, output: str) -> Observation | Finish:
        raise RuntimeError("a single-turn episode never calls tools")


class SingleTurnEnv:
    stop: tuple[str, ...] = ()

    def start(self, problem: PromptGroup) -> _OneTurn:
        return _OneTurn()
