"""Evaluation sampling plan and scoring, shared by ``python -m asyncrl.eval`` and the
learner's periodic evaluation (``RolloutHub.evaluate``): both sample every problem with
the :class:`Sampling` that :func:`plan` gives it, so the two report the same numbers.

Sampling parameters come per data_source from ``eval``: a source whose name matches a
key of ``eval.temperature_by_source`` (equal to it, or containing it, case-insensitive;
the longest key wins) uses that temperature (AIME / AIME25 at 0.6 by default), the
others ``eval.temperature`` (0 = ``generator.temperature``). Every problem gets
``eval.k`` samples of at most ``eval.max_tokens`` tokens at ``eval.top_p``.

``eval.preset: lpreg_paper`` is the Lp-Reg paper's protocol instead: sources matching
``aime`` (AIME24, AIME25) or ``amc`` sampled at temperature 0.6, every other source
decoded greedily (temperature 0), one sample each.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from asyncrl.config import Config
from asyncrl.eval.metrics import summarize
from asyncrl.tasks import Problem

GREEDY = 0.0
# eval.preset -> (temperature by data_source key, temperature of the other sources, samples per problem)
PRESETS: dict[str, tuple[Mapping[str, float], float, int]] = {
    "lpreg_paper": ({"aime": 0.6, "amc": 0.6}, GREEDY, 1),
}


@dataclass(frozen=True)
class Sampling:
    """How a set of problems is sampled: the fields of a ``Prompts`` request (temperature 0 = greedy)."""

    n: int
    temperature: float
    top_p: float
    max_tokens: int


def samples_per_problem(cfg: Config) -> int:
    """k of mean@k / pass@k: ``eval.k``, or the preset's."""
    return PRESETS[cfg.eval.preset][2] if cfg.eval.preset != "none" else cfg.eval.k


def temperature_for(data_source: str, cfg: Config) -> float:
    if cfg.eval.preset != "none":
        by_source, default, _ = PRESETS[cfg.eval.preset]
    else:
        by_source, default = cfg.eval.temperature_by_source, cfg.eval.temperature or cfg.generator.temperature
    name = data_source.lower()
    hits = [key for key in by_source if key.lower() == name or key.lower() in name]
    return by_source[max(hits, key=len)] if hits else default


def plan(problems: Sequence[Problem], cfg: Config) -> dict[Sampling, list[int]]:
    """Sampling parameters -> indices of the problems sampled with them (in order)."""
    e, g = cfg.eval, cfg.generator
    out: dict[Sampling, list[int]] = defaultdict(list)
    for i, p in enumerate(problems):
        s = Sampling(n=samples_per_problem(cfg), temperature=temperature_for(p.data_source, cfg),
                     top_p=e.top_p or g.top_p, max_tokens=e.max_tokens or g.max_tokens)
        out[s].append(i)
    return dict(out)


def summarize_rewards(problems: Sequence[Problem], rewards: Sequence[Sequence[float]], k: int) -> dict:
    """Per-problem sample rewards -> :func:`asyncrl.eval.metrics.summarize` by data_source."""
    by_source: dict[str, list[list[bool]]] = defaultdict(list)
    for p, rs in zip(problems, rewards, strict=True):
        by_source[p.data_source].append([r == 1.0 for r in rs])
    return summarize(by_source, k)


def prompt_ids(p: Problem, tok) -> list[int]:
    return list(p.prompt_ids) if p.prompt_ids else tok(p.prompt)["input_ids"]


def run_eval(engine, tok, problems: Sequence[Problem], cfg: Config, rewards, batch_size: int = 64,
             tools=None, env=None) -> tuple[dict, list]:
    """Sample and score ``problems`` in process with ``engine`` (the Engine protocol), as
    episodes of ``cfg.env`` (single-turn: one answer per sample; with tools, turns and tool
    outputs interleaved, ``tools`` the pool that runs them; ``env``: the caller's, else
    built from ``cfg``) through the generators' own episode runner and rewards, so
    multi-turn tasks score here as in training.

    Returns (summary, records): one record per problem with its source, temperature,
    rewards and responses (each episode's tokens, tool outputs included, as text)."""
    from asyncrl.envs import build_env, episode_limits, run_episodes
    from asyncrl.generator.engine import SamplingParams
    from asyncrl.generator.worker import episode_rewards
    from asyncrl.wire.schema import PromptGroup

    env, limits = env if env is not None else build_env(cfg), episode_limits(cfg)
    records: list[dict | None] = [None] * len(problems)
    for s, idx in plan(problems, cfg).items():
        params = SamplingParams(n=s.n, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p)
        for b in range(0, len(idx), batch_size):
            chunk = idx[b : b + batch_size]
            groups = [PromptGroup(group_id=i, prompt_ids=prompt_ids(problems[i], tok), ground_truth=problems[i].ground_truth,
                                  data_source=problems[i].data_source) for i in chunk]
            episodes = run_episodes(engine, tok, env, groups, params, limits, tools=tools)
            scores = iter(episode_rewards([e for eps in episodes for e in eps], tok, rewards, s.max_tokens, train=False))
            for i, eps in zip(chunk, episodes):
                p = problems[i]
                records[i] = {"data_source": p.data_source, "temperature": s.temperature, "ground_truth": p.ground_truth,
                              "rewards": [next(scores) for _ in eps],
                              "responses": [tok.decode(e.token_ids, skip_special_tokens=True) for e in eps]}
    summary = summarize_rewards(problems, [r["rewards"] for r in records], samples_per_problem(cfg))
    return summary, records


def hub_metrics(problems: Sequence[Problem], results: Sequence[tuple[int, list[float], list[int]]], k: int) -> dict:
    """Metrics of the learner's periodic evaluation from ``(problem index, sample rewards,
    sample lengths)`` per problem: eval/accuracy, eval/reward_mean, eval/response_length
    over all samples, and mean@k and pass@j (j = 1, 2, 4, ... up to k, and k:
    ``asyncrl.eval.metrics.pass_ks``) per source and averaged."""
    from asyncrl.eval.metrics import flat_metrics

    rewards: list[list[float]] = [[] for _ in problems]
    lengths: list[int] = []
    for i, rs, ls in results:
        rewards[i] = rs
        lengths += ls
    flat = [r for rs in rewards for r in rs]
    n = max(len(flat), 1)
    return {"eval/accuracy": sum(r == 1.0 for r in flat) / n, "eval/reward_mean": sum(flat) / n,
            "eval/response_length": sum(lengths) / max(len(lengths), 1)} | flat_metrics(
        summarize_rewards(problems, rewards, k))
