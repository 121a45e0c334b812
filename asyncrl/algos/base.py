"""The contract between the learner and an RL algorithm (a loss plus an optional
global token selection).

The learner owns the data flow; an algorithm only says what per-token quantities it
needs and turns them into a scalar loss. Per optimisation mini-batch the learner:

1. (once per rollout batch) computes ``old_logprobs`` and, if ``needs_proxy``, the
   min-p ``proxy_logprobs`` under pi_old in a no-grad pass;
2. if ``needs_selection``, runs a no-grad pass with the *current* weights over the
   whole mini-batch on this rank and calls :meth:`Algorithm.select` once, with the
   valid tokens of this rank flattened in row-major order and an ``all_gather``
   that concatenates 1-D tensors across ranks in rank order. Rank r holds the
   contiguous slice r of the mini-batch, so concatenation order is the global
   token order (used to break ties deterministically);
3. splits the mini-batch into micro-batches and calls :meth:`Algorithm.loss` on
   each, with ``num_tokens`` / ``num_seqs`` of the *whole* mini-batch (all
   micro-batches, all ranks) and ``max_len`` (the run's max response length, for
   ``seq-mean-token-sum-norm``), sums ``loss.backward()`` over micro-batches and
   all-reduces gradients with a SUM (each rank's loss is already its share of the
   global loss: with FSDP2 set ``set_gradient_divide_factor(1.0)``).

``asyncrl.algos.minibatch.run_minibatch`` implements steps 2-3 for one rank.

Because normalisers and selection are global, the gradient does not depend on the
micro-batch size or the world size. Every metric returned by ``loss`` must be
additive over micro-batches and ranks (the learner sums them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from torch import Tensor

AllGather = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class SelectInputs:
    """Valid tokens of this rank's share of one mini-batch, flattened row-major, no grad."""

    logprobs: Tensor  # [N] current policy log-prob of the sampled token
    old_logprobs: Tensor  # [N] pi_old
    advantages: Tensor  # [N]
    entropy: Tensor | None  # [N] current-policy entropy, if needs_entropy
    proxy_logprobs: Tensor | None  # [N] -inf where filtered, if needs_proxy
    rank: int = 0  # this rank's position in all_gather's concatenation order
    seed: int = 0  # of this mini-batch, for random selections (Clip-Cov): the same on every rank


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch. All tensors are [B, T] float32 (mask bool)."""

    logprobs: Tensor  # current policy, carries gradient
    old_logprobs: Tensor  # pi_old, no gradient
    advantages: Tensor  # per token (sample advantage broadcast over its tokens)
    mask: Tensor  # bool, valid response tokens
    num_tokens: float  # valid tokens in the whole mini-batch (all micro-batches, ranks)
    num_seqs: float  # sequences in the whole mini-batch
    max_len: float = 0.0  # max response length of the run (a constant), for seq-mean-token-sum-norm
    entropy: Tensor | None = None  # with gradient, if needs_entropy
    proxy_logprobs: Tensor | None = None  # -inf where filtered, if needs_proxy
    selected: Tensor | None = None  # int8 codes from Algorithm.select, reshaped to [B, T]
    is_weights: Tensor | None = None  # truncated importance weights, no gradient


class Algorithm(Protocol):
    needs_entropy: bool  # compute per-token entropy (with gradient in the loss pass)
    needs_proxy: bool  # compute the min-p proxy log-probs under pi_old
    needs_selection: bool  # call select() once per mini-batch before the loss

    def select(self, x: SelectInputs, all_gather: AllGather) -> Tensor:
        """Return int8 codes [N] for this rank's valid tokens (0 = not selected)."""
        ...

    def loss(self, x: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss of the micro-batch (already divided by global normalisers)."""
        ...
