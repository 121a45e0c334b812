"""Evaluation sampling plan and scoring, shared by ``python -m asyncrl.eval`` and the
learner's periodic evaluation (``RolloutHub.evaluate``).

Sampling parameters come per data_source from ``eval``: a source whose name matches a
key of ``eval.temperature_by_source`` (equal to it, or containing it, case-insensitive;
the longest key wins) uses that temperature (AIME / AIME25 at 0.6 by default), the
others ``eval.temperature`` (0 = ``generator.temperature``). Every problem gets
``eval.k`` samples.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from asyncrl.config import Config
from asyncrl.eval.metrics import summarize
from asyncrl.tasks import Problem


@dataclass(frozen=True)
class EvalSampling:
    k: int
    top_p: float
    max_tokens: int


def sampling(cfg: Config) -> EvalSampling:
    e, g = cfg.eval, cfg.generator
    return EvalSampling(k=e.k, top_p=e.top_p or g.top_p, max_tokens=e.max_tokens or g.max_tokens)


def temperature_for(data_source: str, cfg: Config) -> float:
    name = data_source.lower()
    hits = [key for key in cfg.eval.temperature_by_source if key.lower() == name or key.lower() in name]
    if hits:
        return cfg.eval.temperature_by_source[max(hits, key=len)]
    return cfg.eval.temperature or cfg.generator.temperature


def plan(problems: Sequence[Problem], cfg: Config) -> dict[float, list[int]]:
    """Temperature -> indices of the problems sampled at it (in order)."""
    out: dict[float, list[int]] = defaultdict(list)
    for i, p in enumerate(problems):
        out[temperature_for(p.data_source, cfg)].append(i)
    return dict(out)


def summarize_rewards(problems: Sequence[Problem], rewards: Sequence[Sequence[float]], k: int) -> dict:
    """Per-problem sample rewards -> :func:`asyncrl.eval.metrics.summarize` by data_source."""
    by_source: dict[str, list[list[bool]]] = defaultdict(list)
    for p, rs in zip(problems, rewards, strict=True):
        by_source[p.data_source].append([r == 1.0 for r in rs])
    return summarize(by_source, k)


def prompt_ids(p: Problem, tok) -> list[int]:
    return list(p.prompt_ids) if p.prompt_ids else tok(p.prompt)["input_ids"]


def run_eval(engine, tok, problems: Sequence[Problem], cfg: Config, rewards, batch_size: int = 64) -> tuple[dict, list]:
    """Sample and score ``problems`` in process with ``engine`` (the Engine protocol).

    Returns (summary, records): one record per problem with its source, temperature,
    rewards and responses."""
    from asyncrl.generator.engine import SamplingParams

    s = sampling(cfg)
    records: list[dict | None] = [None] * len(problems)
    for temperature, idx in plan(problems, cfg).items():
        params = SamplingParams(n=s.k, max_tokens=s.max_tokens, temperature=temperature, top_p=s.top_p,
                                stop_token_ids=(tok.eos_token_id,))
        for b in range(0, len(idx), batch_size):
            chunk = idx[b : b + batch_size]
            outs = engine.generate([prompt_ids(problems[i], tok) for i in chunk], params)
            for i, comps in zip(chunk, outs):
                texts = [tok.decode(c.token_ids, skip_special_tokens=True) for c in comps]
                p = problems[i]
                scores = rewards.score([(p.data_source, t, p.ground_truth) for t in texts])
                records[i] = {"data_source": p.data_source, "temperature": temperature, "ground_truth": p.ground_truth,
                              "rewards": scores, "responses": texts}
    summary = summarize_rewards(problems, [r["rewards"] for r in records], s.k)
    return summary, records


def hub_metrics(problems: Sequence[Problem], results: Sequence[tuple[int, list[float], list[int]]], k: int) -> dict:
    """Metrics of the learner's periodic evaluation from ``(problem index, sample rewards,
    sample lengths)`` per problem: eval/accuracy, eval/reward_mean, eval/response_length
    over all samples, and mean@k / pass@k per source and averaged."""
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
