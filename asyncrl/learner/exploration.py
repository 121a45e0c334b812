"""Exploration instrumentation of one rollout batch, logged every step under ``explore/``.

Pure functions of the batch the learner trains on (``asyncrl.learner.batch.Batch``),
its trajectory groups and the tokenizer; nothing here runs the model. Token statistics
count model tokens only (``Batch.mask``: response positions, environment tokens of a
multi-turn episode excluded).

Sampled-token statistics come from the behaviour log-probs, i.e. from the *sampling
distribution* of the engine that drew each token: the policy at ``generator.temperature``
(training refuses ``generator.top_p < 1``, so there is no nucleus truncation), with the
weights of the version that sampled it (older than the learner's when
``learner.max_staleness > 0``):

- ``explore/sampled_token_nll``: mean of ``-log p(y_t)`` over sampled tokens, the
  "surprisal" estimate of the entropy. ``E_{y ~ p}[-log p(y)] = H(p)`` at every position,
  so this is an unbiased Monte Carlo estimate of the mean entropy of the sampling
  distribution at the visited positions, independent of the learner.
- ``explore/sampled_prob_mean``: mean ``p(y_t)``.
- ``explore/sampled_frac_below_1pct`` / ``_5pct`` / ``_10pct``: fraction of sampled
  tokens with ``p(y_t) < 0.01`` / ``0.05`` / ``0.10`` (the low-probability tokens that
  Lp-Reg protects; compared as ``log p < log threshold``).

The learner's own ``train/entropy`` (asyncrl/learner/train.py) is the exact entropy
of the full vocabulary distribution of pi_old (the learner's weights before this
step's update) at ``generator.temperature``, at the same positions, averaged over the
batch's tokens on all ranks. The two agree in expectation when the engine's numerics
match the learner's and the samples are fresh (``mismatch/kl`` says how far they are
apart). pi_old's probabilities of the sampled tokens are not reported: train_on_batch
does not return them (they would need an extra pass, or a change to train.py).

Spark moves: a task designates them per data_source with
``asyncrl.tasks.base.register_sparks(data_source, {name: regex})`` (or
``register_sparks_prefix(prefix, {...})``) at import time of its module, like a
verifier. Each sampled answer is decoded once (model tokens only,
``skip_special_tokens=True``; the turns of a multi-turn episode are joined without a
separator) and searched with its own data_source's patterns. For every spark name:

- ``explore/spark/<name>/frac``: fraction of the answers (of the sources that define
  ``<name>``) in which ``pattern.search`` finds it;
- ``explore/spark/<name>/frac_adv_pos`` / ``frac_adv_neg`` / ``frac_adv_zero``: the same
  among the answers whose advantage is > 0 / < 0 / = 0 (``|A| <= ZERO_ADVANTAGE``: a
  group whose rewards are all equal); a key is absent on a step with no such answer;
- ``explore/spark/<name>/per_1k_tokens``: non-overlapping matches (``finditer``) per
  1000 model tokens of those answers.

Nothing is decoded on a step whose sources define no sparks, so tasks without sparks
pay nothing for them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from asyncrl.learner.batch import Batch
from asyncrl.learner.hub import Group
from asyncrl.tasks.base import find_sparks

# (threshold on the sampled token's probability, metric name suffix)
PROB_THRESHOLDS: tuple[tuple[float, str], ...] = ((0.01, "1pct"), (0.05, "5pct"), (0.10, "10pct"))
# advantages within this of 0 count as zero: float32 group normalisation of equal rewards
ZERO_ADVANTAGE = 1e-6


def token_metrics(batch: Batch) -> dict[str, float]:
    """Sampled-token statistics of the batch's model tokens ({} if it has none)."""
    raw = batch.behaviour_logprobs[batch.mask]
    if raw.numel() == 0:
        return {}
    lp = raw.double()  # float64 sums: a step has up to millions of tokens
    out = {"explore/sampled_token_nll": float(-lp.mean()), "explore/sampled_prob_mean": float(lp.exp().mean())}
    for threshold, name in PROB_THRESHOLDS:
        # compared in the log-probs' own dtype: a token sampled at exactly the threshold is not below it
        out[f"explore/sampled_frac_below_{name}"] = float((raw < math.log(threshold)).double().mean())
    return out


@dataclass(frozen=True)
class Answer:
    """One sampled answer as the spark counter sees it."""

    text: str
    data_source: str
    advantage: float
    num_tokens: int  # model tokens


def advantage_sign(a: float) -> str:
    return "zero" if abs(a) <= ZERO_ADVANTAGE else ("pos" if a > 0 else "neg")


def spark_metrics(answers: Sequence[Answer],
                  find: Callable[[str], dict[str, re.Pattern]] = find_sparks) -> dict[str, float]:
    """Spark frequencies over ``answers`` (see the module docstring for the names)."""
    # name -> [(contains, occurrences, sign, tokens)] over the answers whose source defines it
    seen: dict[str, list[tuple[bool, int, str, int]]] = {}
    for a in answers:
        for name, rx in find(a.data_source).items():
            hits = sum(1 for _ in rx.finditer(a.text))
            seen.setdefault(name, []).append((hits > 0, hits, advantage_sign(a.advantage), a.num_tokens))
    out: dict[str, float] = {}
    for name, rows in sorted(seen.items()):
        key = f"explore/spark/{name}"
        out[f"{key}/frac"] = sum(c for c, _, _, _ in rows) / len(rows)
        for sign in ("pos", "neg", "zero"):
            part = [c for c, _, s, _ in rows if s == sign]
            if part:
                out[f"{key}/frac_adv_{sign}"] = sum(part) / len(part)
        tokens = sum(t for _, _, _, t in rows)
        if tokens:
            out[f"{key}/per_1k_tokens"] = 1000.0 * sum(h for _, h, _, _ in rows) / tokens
    return out


def answer_texts(groups: Sequence[Group], tok) -> list[str]:
    """Every sample's model tokens decoded, in the batch's row order (group by group)."""
    ids = [s.token_ids[s.model_mask()].tolist() for g in groups for s in g.samples]
    return tok.batch_decode(ids, skip_special_tokens=True)


def exploration_metrics(batch: Batch, groups: Sequence[Group], tok,
                        find: Callable[[str], dict[str, re.Pattern]] = find_sparks) -> dict[str, float]:
    """All ``explore/*`` metrics of one step's batch (built from ``groups`` by build_batch)."""
    out = token_metrics(batch)
    sources = [g.msg.data_source for g in groups for _ in g.samples]
    if len(sources) != batch.advantages.shape[0]:
        raise ValueError(f"{len(sources)} samples in the groups, {batch.advantages.shape[0]} rows in the batch")
    if not any(find(src) for src in set(sources)):
        return out  # no sparks defined: nothing to decode
    tokens = batch.mask.sum(-1).tolist()
    advantages = batch.advantages.to(torch.float64).tolist()
    answers = [Answer(t, src, a, n) for t, src, a, n in zip(answer_texts(groups, tok), sources, advantages, tokens)]
    return out | spark_metrics(answers, find)


def eval_spark_metrics(groups: Sequence[Group], tok,
                       find: Callable[[str], dict[str, re.Pattern]] = find_sparks) -> dict[str, float]:
    """Spark frequencies in held-out answers: ``eval/spark/<name>/frac`` and ``per_1k_tokens``
    (no advantage there, so no split by sign); {} when no source defines sparks."""
    sources = [g.msg.data_source for g in groups for _ in g.samples]
    if not any(find(src) for src in set(sources)):
        return {}
    tokens = [int(s.model_mask().sum()) for g in groups for s in g.samples]
    answers = [Answer(t, src, 0.0, n) for t, src, n in zip(answer_texts(groups, tok), sources, tokens)]
    return {k.replace("explore/spark/", "eval/spark/", 1): v for k, v in spark_metrics(answers, find).items()
            if not k.endswith(("/frac_adv_zero", "/frac_adv_pos", "/frac_adv_neg"))}
