"""Run an environment written for ``skyrl-gym`` (``pip install 'asyncrl[envs]'``) unchanged,
as an asyncrl environment (asyncrl/envs/base.py).

skyrl-gym's text environments are Gymnasium-style objects made by
``skyrl_gym.make(env_id, env_config=..., extras=...)``: ``init(prompt_messages) ->
(messages, info)``, then ``step(action_text) -> {observations, reward, done, metadata}``
once per model turn, the observations being chat messages. :class:`SkyRLEnv` makes one
such object per episode and translates:

- **the prompt**: asyncrl renders the prompt before an episode starts (the data
  pipeline's chat template), so ``init`` receives it as one user message (the prompt
  decoded) and must hand it back unchanged; an environment whose ``init`` rewrites the
  prompt is refused with an error (write the prompt it wants into the dataset instead).
  ``extras`` is ``{"reward_spec": {"method": "rule", "ground_truth": ...},
  "extra_info": {}}`` plus the adapter's own ``extras`` (e.g. ``max_turns``).
- **a model turn**: its text (decoded without special tokens; a stop string that ended
  it included) is the action. ``postprocessed_action`` is ignored: the tokens the model
  sampled stay in the context as sampled.
- **observations**: the new chat messages are rendered with the tokenizer's chat
  template as a *continuation* of the conversation so far: the text the template puts
  after the model's turn (its end-of-turn marker; the EOS the model sampled is not
  repeated), then the new messages and the generation prompt. Only the new messages are
  rendered; the rendering of the conversation so far must be a prefix of the rendering
  with them (checked: a template that rewrites earlier turns is refused).
- **rewards**: skyrl-gym rewards each turn; the episode's reward is their **sum** (the
  return, which is what SkyRL's own trainer puts on the sequence for outcome
  advantages) or, with ``reward="last"``, the final turn's. Note that with ``sum`` a
  multi-turn episode can score above 1, which asyncrl's accuracy (reward == 1) does not
  count as solved.
- **done**: the episode finishes with that reward. When asyncrl's own limits end it
  first (``env.max_turns``, the token budget), the runner scores it instead.
- **metrics**: ``get_metrics()``'s numeric values, per episode.

skyrl-gym environments run in the generator process, between engine rounds; one whose
``step`` is slow (a search engine, a code sandbox) holds up the round.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from asyncrl.envs.base import Finish, Observation, Turn
from asyncrl.wire.schema import PromptGroup

Messages = list[dict[str, str]]


def continuation(tok, history: Messages, new: Messages, eos_sampled: bool) -> str:
    """The text that follows the model's last turn (``history[-1]``, an assistant message)
    when ``new`` messages arrive: the template's end of that turn, the new messages and the
    generation prompt."""
    before = tok.apply_chat_template(history, tokenize=False)
    after = tok.apply_chat_template(history + new, tokenize=False, add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError("the chat template renders the conversation differently once new messages follow it; "
                         "the skyrl adapter can only append to the context (use a template that renders earlier "
                         "turns the same way whatever follows them)")
    content = history[-1]["content"]
    at = before.rfind(content) if content else -1
    # what the template writes after the assistant's content (e.g. "<|im_end|>\n"); a template that
    # does not render assistant turns at all has nothing there
    closing = before[at + len(content):] if at >= 0 else ""
    eos = tok.eos_token or ""
    if eos_sampled and eos and closing.startswith(eos):  # the model already sampled it
        closing = closing[len(eos):]
    return closing + after[len(before):]


class SkyRLSession:
    def __init__(self, env, tok, prompt: Messages, reward: Literal["sum", "last"]) -> None:
        self.env, self.tok, self.reward = env, tok, reward
        messages, _info = env.init(copy.deepcopy(prompt))
        if list(messages) != prompt:
            raise ValueError(f"{type(env).__name__}.init rewrote the prompt ({messages!r}); asyncrl renders prompts "
                             "before the episode starts, so the environment must keep them: put the prompt it "
                             "wants into the dataset")
        self.history: Messages = list(prompt)
        self.rewards: list[float] = []
        self.closed = False

    def step(self, turn: Turn) -> Observation | Finish:
        out = self.env.step(turn.text)
        self.rewards.append(float(out["reward"]))
        self.history.append({"role": "assistant", "content": turn.text})
        if out["done"]:
            self.close()
            return Finish(reward=sum(self.rewards) if self.reward == "sum" else self.rewards[-1])
        new = list(out["observations"] or [])
        text = continuation(self.tok, self.history, new, eos_sampled=turn.end == "eos")
        self.history += new
        return Observation(text)

    def tool_output(self, output: str) -> Observation | Finish:
        raise RuntimeError("skyrl-gym environments run their tools inside step(); the pool is never asked")

    def metrics(self) -> dict[str, float]:
        got = self.env.get_metrics() if hasattr(self.env, "get_metrics") else {}
        return {k: float(v) for k, v in got.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.env.close()


class SkyRLEnv:
    """Episodes of the skyrl-gym environment ``env_id`` (any id in ``skyrl_gym.registry``,
    or ``"module:Class"``), one environment object per episode."""

    def __init__(self, env_id: str, tokenizer, env_config: dict[str, Any] | None = None,
                 extras: dict[str, Any] | None = None, stop: tuple[str, ...] = (),
                 reward: Literal["sum", "last"] = "sum") -> None:
        try:
            import skyrl_gym
            from omegaconf import OmegaConf
        except ImportError as e:
            raise ImportError("the skyrl-gym adapter needs skyrl-gym: pip install 'asyncrl[envs]'") from e
        if reward not in ("sum", "last"):
            raise ValueError(f"reward must be 'sum' or 'last', got {reward!r}")
        if env_id not in skyrl_gym.registry and ":" not in env_id:
            raise ValueError(f"no skyrl-gym environment {env_id!r}; registered: {sorted(skyrl_gym.registry)}")
        self._make = skyrl_gym.make
        self.env_id, self.tok, self.reward = env_id, tokenizer, reward
        # skyrl-gym environments read their config as an omegaconf DictConfig (attribute access)
        self.env_config = OmegaConf.create(env_config or {})
        self.extras = dict(extras or {})
        self.stop = tuple(stop)

    def start(self, problem: PromptGroup) -> SkyRLSession:
        extras = {"reward_spec": {"method": "rule", "ground_truth": problem.ground_truth}, "extra_info": {},
                  **copy.deepcopy(self.extras)}
        env = self._make(self.env_id, env_config=self.env_config, extras=extras)
        prompt = [{"role": "user", "content": self.tok.decode(problem.prompt_ids, skip_special_tokens=True)}]
        return SkyRLSession(env, self.tok, prompt, self.reward)
