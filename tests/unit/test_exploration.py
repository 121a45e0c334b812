"""asyncrl.learner.exploration and the spark registry: hand-built batches with known
sampled-token probabilities give exact fractions; spark matches split by advantage
sign exactly as counted by hand; real groups through build_batch and the char
tokenizer; nothing is decoded where no source defines sparks."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from asyncrl.kernels import IGNORE_INDEX
from asyncrl.learner.batch import Batch, build_batch
from asyncrl.learner.exploration import (Answer, answer_texts, eval_spark_metrics, exploration_metrics, spark_metrics,
                                         token_metrics)
from asyncrl.learner.hub import Group
from asyncrl.tasks.base import find_sparks, register_sparks, register_sparks_prefix
from asyncrl.tasks.tokenizer import ASCII, build_char_tokenizer
from asyncrl.wire.codec import SampleArrays
from asyncrl.wire.schema import SampleMeta, TrajectoryGroup


def hand_batch() -> Batch:
    """Two rows: a prompt position and padding around the responses, each holding a
    log-prob that would change every statistic if it were counted."""
    probs = [[None, 0.005, 0.02, 0.5], [None, 0.07, 0.9, None]]
    lp = torch.tensor([[math.log(p) if p else -9.0 for p in row] for row in probs])
    tgt = torch.tensor([[IGNORE_INDEX if p is None else 5 for p in row] for row in probs])
    return Batch(input_ids=torch.zeros((2, 4), dtype=torch.long), targets=tgt, behaviour_logprobs=lp,
                 versions=torch.zeros((2, 4), dtype=torch.long), advantages=torch.tensor([1.0, -1.0]),
                 rewards=torch.tensor([1.0, 0.0]))


def test_token_metrics_exact_fractions_over_model_tokens_only():
    m = token_metrics(hand_batch())
    p = [0.005, 0.02, 0.5, 0.07, 0.9]
    assert m["explore/sampled_frac_below_1pct"] == 1 / 5
    assert m["explore/sampled_frac_below_5pct"] == 2 / 5
    assert m["explore/sampled_frac_below_10pct"] == 3 / 5
    assert m["explore/sampled_prob_mean"] == pytest.approx(sum(p) / 5, rel=1e-6)
    assert m["explore/sampled_token_nll"] == pytest.approx(sum(-math.log(x) for x in p) / 5, rel=1e-6)


def test_token_metrics_threshold_is_strict_and_empty_batch_is_empty():
    b = hand_batch()
    b.behaviour_logprobs[0, 1] = math.log(0.01)  # exactly at the threshold: not below it
    assert token_metrics(b)["explore/sampled_frac_below_1pct"] == 0.0
    b.targets[:] = IGNORE_INDEX
    assert token_metrics(b) == {}


def test_sampled_token_nll_estimates_the_entropy_of_the_sampling_distribution():
    """E_{y~p}[-log p(y)] = H(p): tokens drawn from a known distribution at temperature
    0.7 (the behaviour log-prob is after temperature) give its entropy."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(50, generator=g, dtype=torch.float64) / 0.7, -1)
    y = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp = p.log()[y].float()[None]
    b = Batch(torch.zeros_like(lp, dtype=torch.long), torch.ones_like(lp, dtype=torch.long), lp,
              torch.zeros_like(lp, dtype=torch.long), torch.zeros(1), torch.zeros(1))
    entropy = float(-(p * p.log()).sum())
    assert token_metrics(b)["explore/sampled_token_nll"] == pytest.approx(entropy, abs=0.01)
    assert token_metrics(b)["explore/sampled_frac_below_1pct"] == pytest.approx(float(p[p < 0.01].sum()), abs=0.003)


SPARKS = {"S": {"wait": re.compile(r"\bwait\b"), "check": re.compile("check")}, "U": {"wait": re.compile("WAIT")}}


def test_spark_metrics_split_by_advantage_sign_by_hand():
    answers = [
        Answer("wait, check, wait", "S", 1.2, 10),  # wait x2, check x1, advantage > 0
        Answer("no spark here", "S", -0.5, 20),
        Answer("check this", "S", -1.0, 5),  # check x1
        Answer("wait", "S", 0.0, 5),  # wait x1, advantage 0
        Answer("await", "S", 1e-7, 10),  # not \bwait\b; advantage within ZERO_ADVANTAGE: zero
        Answer("WAIT wait", "U", -2.0, 50),  # U's own pattern: one WAIT
        Answer("wait wait check", "T", 3.0, 100),  # T defines no sparks: counted nowhere
    ]
    m = spark_metrics(answers, find=lambda src: SPARKS.get(src, {}))
    # wait: over S and U (6 answers, 100 tokens); contains: a1, a4, a6
    assert m["explore/spark/wait/frac"] == 3 / 6
    assert m["explore/spark/wait/frac_adv_pos"] == 1 / 1  # a1
    assert m["explore/spark/wait/frac_adv_neg"] == 1 / 3  # a2, a3, a6
    assert m["explore/spark/wait/frac_adv_zero"] == 1 / 2  # a4, a5
    assert m["explore/spark/wait/per_1k_tokens"] == 1000 * 4 / 100
    # check: S only (5 answers, 50 tokens); contains: a1, a3
    assert m["explore/spark/check/frac"] == 2 / 5
    assert (m["explore/spark/check/frac_adv_pos"], m["explore/spark/check/frac_adv_neg"],
            m["explore/spark/check/frac_adv_zero"]) == (1.0, 1 / 2, 0.0)
    assert m["explore/spark/check/per_1k_tokens"] == 1000 * 2 / 50
    assert len(m) == 10


def test_spark_sign_without_answers_is_absent_not_zero():
    m = spark_metrics([Answer("check", "S", 1.0, 4)], find=lambda src: SPARKS.get(src, {}))
    assert m["explore/spark/check/frac_adv_pos"] == 1.0
    assert "explore/spark/check/frac_adv_neg" not in m and "explore/spark/check/frac_adv_zero" not in m
    assert spark_metrics([Answer("check", "T", 1.0, 4)], find=lambda src: {}) == {}


def test_spark_registry_exact_prefix_and_errors():
    register_sparks("test-explore/exact", {"back": r"(?i)backtrack"})
    register_sparks_prefix("test-explore/", {"chk": "check"})
    assert list(find_sparks("test-explore/exact")) == ["back"]  # an exact entry wins over the prefix
    assert find_sparks("test-explore/exact")["back"].search("BACKTRACK")
    assert list(find_sparks("test-explore/other")) == ["chk"]
    assert find_sparks("nobody/registered") == {}
    with pytest.raises(ValueError, match="twice"):
        register_sparks("test-explore/exact", {"x": "x"})
    with pytest.raises(ValueError, match="twice"):
        register_sparks_prefix("test-explore/", {"x": "x"})
    with pytest.raises(ValueError, match="empty string"):
        register_sparks("test-explore/empty", {"x": "a*"})
    with pytest.raises(ValueError, match="metric name"):
        register_sparks("test-explore/name", {"a/b": "x"})
    with pytest.raises(re.error):
        register_sparks("test-explore/bad", {"x": "("})


TOK = build_char_tokenizer(ASCII)


def group(gid: int, source: str, texts: list[str], rewards: list[float], masks=None) -> Group:
    samples = []
    for i, t in enumerate(texts):
        ids = np.array(TOK(t)["input_ids"] + [TOK.eos_token_id], dtype=np.int32)
        mask = None if masks is None else np.array(masks[i], dtype=np.uint8)
        samples.append(SampleArrays(ids, np.full(len(ids), -0.5, np.float32), np.zeros(len(ids), np.int32), mask))
    msg = TrajectoryGroup(group_id=gid, worker_id=0, data_source=source, prompt_ids=TOK("1+1=")["input_ids"],
                          samples=[SampleMeta(num_tokens=len(s.token_ids), reward=r, finish_reason="stop")
                                   for s, r in zip(samples, rewards)])
    return Group(msg, samples)


def test_exploration_metrics_on_real_groups():
    """Decoded with the real tokenizer, advantages from build_batch: group 0 (rewards
    1, 0) has advantages +/-0.707, group 1 (both 0) advantages exactly 0."""
    register_sparks("test-explore/groups", {"retry": "retry"})
    groups = [group(0, "test-explore/groups", ["retry 2", "2"], [1.0, 0.0]),
              group(1, "test-explore/groups", ["retry retry", "7"], [0.0, 0.0])]
    batch = build_batch(groups, TOK.pad_token_id, scale_advantages=True)
    m = exploration_metrics(batch, groups, TOK)
    assert m["explore/spark/retry/frac"] == 2 / 4
    assert m["explore/spark/retry/frac_adv_pos"] == 1.0 and m["explore/spark/retry/frac_adv_neg"] == 0.0
    assert m["explore/spark/retry/frac_adv_zero"] == 1 / 2
    tokens = (8 + 2) + (12 + 2)  # characters + <eos> per answer
    assert batch.mask.sum() == tokens
    assert m["explore/spark/retry/per_1k_tokens"] == pytest.approx(1000 * 3 / tokens)
    assert m["explore/sampled_token_nll"] == pytest.approx(0.5)


class NoDecode:
    def batch_decode(self, *a, **k):
        raise AssertionError("decoded although no source defines sparks")


def test_nothing_is_decoded_without_sparks():
    groups = [group(0, "test-no-sparks/none", ["retry", "x"], [1.0, 0.0])]
    m = exploration_metrics(build_batch(groups, TOK.pad_token_id, True), groups, NoDecode())
    assert not any(k.startswith("explore/spark/") for k in m) and "explore/sampled_token_nll" in m


def test_answer_texts_keep_model_tokens_only():
    """A multi-turn sample: its environment tokens (mask 0) never reach the spark counter."""
    g = group(0, "x", ["ab[retry]cd", "ok"], [1.0, 0.0], masks=[[1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1], [1, 1, 1]])
    assert answer_texts([g], TOK) == ["abcd", "ok"]


def test_eval_spark_metrics_count_held_out_answers_without_a_sign_split():
    register_sparks("test-explore/eval", {"retry": "retry"})
    groups = [group(-1, "test-explore/eval", ["retry 2", "2"], [1.0, 0.0]),
              group(-2, "test-explore/eval", ["retry retry", "7"], [0.0, 0.0])]
    m = eval_spark_metrics(groups, TOK)
    assert m["eval/spark/retry/frac"] == 2 / 4
    assert m["eval/spark/retry/per_1k_tokens"] == pytest.approx(1000 * 3 / ((8 + 2) + (12 + 2)))
    assert not any("adv" in k for k in m) and not any(k.startswith("explore/") for k in m)
    assert eval_spark_metrics([group(-3, "test-no-sparks/none", ["retry"], [1.0])], NoDecode()) == {}
