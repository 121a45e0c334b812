"""The ``Engine`` protocol: what a generator worker needs from an inference engine.

Backends (``hf``, ``vllm``, ``sglang``) live in their own modules and are chosen by
``generator.engine``; only the chosen backend's module is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    n: int  # samples per prompt
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()  # generation of a sample ends after any of these
    # ends a sample after the token that completes any of these (kept in the output);
    # engines that cannot (hf, sglang) refuse a non-empty tuple
    stop_strings: tuple[str, ...] = ()
    # per prompt, the most tokens to sample (each <= max_tokens); () = max_tokens for all.
    # Multi-turn rounds continue episodes with different budgets left (asyncrl.envs.runner)
    limits: tuple[int, ...] = ()

    def limit(self, i: int) -> int:
        """The token limit of prompt ``i``."""
        return self.limits[i] if self.limits else self.max_tokens

    def check(self, num_prompts: int) -> None:
        """Refuse limits that do not fit the call (engines run this first)."""
        if self.limits and (len(self.limits) != num_prompts or not 1 <= min(self.limits) <= max(self.limits)
                            <= self.max_tokens):
            raise ValueError(f"SamplingParams.limits: {len(self.limits)} limits for {num_prompts} prompts, each "
                             f"in [1, max_tokens={self.max_tokens}], got {self.limits[:8]}")


@dataclass
class Completion:
    """One sampled answer. ``logprobs[i]`` is log p(token_ids[i]) under the sampling
    distribution (after temperature and top-p), ``versions[i]`` the policy version
    of the weights that sampled token i."""

    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str  # "stop" (a stop token or string) | "length" (its token limit)


class GenerationInterrupted(Exception):
    """Raised by ``between_steps`` to abandon the batch in flight (the worker resubmits
    it: ``generator.on_weight_update: restart``). Engines release the batch's requests
    and let it propagate."""


class Engine(Protocol):
    version: int  # policy version of the weights currently loaded

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, between_steps: Callable[[], None] | None = None
    ) -> list[list[Completion]]:
        """For each prompt (token ids), ``params.n`` completions, of at most
        ``params.limit(i)`` tokens for prompt ``i``. ``between_steps`` (if given) is
        called between decode steps where the engine can pause; it may call
        ``load_weights``, after which tokens are sampled with the new weights, or raise
        :class:`GenerationInterrupted` to abandon the batch. A multi-turn episode calls
        this once per turn with its whole context (``asyncrl.envs.runner``): engines
        with a prefix cache continue it without recomputing the shared prefix."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        """Replace the weights in place (HF parameter names) and clear any caches."""
        ...

    def shutdown(self) -> None: ...
