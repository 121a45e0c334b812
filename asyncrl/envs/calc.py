"""``env.type: calc_tool``: the calculator environment of the tool-use demo task
(asyncrl/tasks/calc_tool.py).

A model turn that ends with ``[expression]`` (``]`` is the stop string) is a tool call:
the expression goes to the pool's ``calculator`` tool, and its value comes back as the
observation ``=value`` (``=?`` when the calculator refuses the expression, or answers
with anything but an integer). A turn that ends otherwise (EOS, the token limit)
finishes the episode, and the task's verifier scores that final turn (the answer after
its last ``#``); observations are never scored.

Each session counts its calls and the well-formed ones (:meth:`CalcSession.metrics`):
the tool-call rate and the well-formed-call rate of the demo.
"""

from __future__ import annotations

from asyncrl.envs.base import Finish, Observation, ToolCall, Turn
from asyncrl.tasks.calc_tool import CLOSE, call_stats, call_text, observation
from asyncrl.wire.schema import PromptGroup

TOOL = "calculator"


def parse_value(output: str) -> int | None:
    """The calculator's output as an integer, or None (an error text, a fraction)."""
    text = output.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:  # "155039.0": an integral float is still the value
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() and abs(value) < 2**63 else None


class CalcSession:
    def __init__(self) -> None:
        self.observations: list[str] = []

    def step(self, turn: Turn) -> ToolCall | Finish:
        expr = call_text(turn.text) if turn.end == "stop" else None
        if expr is None:
            return Finish(answer=turn.text)  # the final turn is the answer; observations are never scored
        return ToolCall(TOOL, expr)

    def tool_output(self, output: str) -> Observation:
        obs = observation(parse_value(output))
        self.observations.append(obs)
        return Observation(obs)

    def metrics(self) -> dict[str, float]:
        """Per episode: ``tool_called`` (0/1), ``tool_calls``, ``tool_well_formed`` (1 when
        it made at least one call and the calculator accepted every one)."""
        s = call_stats(self.observations)
        return {"tool_called": float(s.calls > 0), "tool_calls": float(s.calls),
                "tool_well_formed": float(s.calls > 0 and s.well_formed == s.calls)}


class CalcToolEnv:
    stop: tuple[str, ...] = (CLOSE,)

    def start(self, problem: PromptGroup) -> CalcSession:
        return CalcSession()


def evaluate(engine, tok, problems, max_tokens: int, temperature: float, tools, max_turns: int = 3,
             batch_size: int = 64) -> dict[str, float]:
    """Held-out numbers of the demo, in process: one episode per problem through the episode
    runner -> ``accuracy`` and the mean of each per-episode metric (:meth:`CalcSession.metrics`).
    The warm-start's evaluation and the before/after measurement of the README both use it."""
    from asyncrl.envs.runner import EpisodeLimits, run_episodes
    from asyncrl.eval.sampling import prompt_ids
    from asyncrl.generator.engine import SamplingParams
    from asyncrl.tasks.calc_tool import score
    from asyncrl.wire.schema import PromptGroup

    env, totals, n = CalcToolEnv(), {}, 0
    params = SamplingParams(n=1, max_tokens=max_tokens, temperature=temperature)
    for b in range(0, len(problems), batch_size):
        chunk = problems[b : b + batch_size]
        groups = [PromptGroup(group_id=-1 - b - i, prompt_ids=prompt_ids(p, tok), ground_truth=p.ground_truth,
                              data_source=p.data_source) for i, p in enumerate(chunk)]
        for [e] in run_episodes(engine, tok, env, groups, params, EpisodeLimits(max_turns=max_turns), tools=tools):
            answer = e.answer if e.answer is not None else tok.decode(e.token_ids, skip_special_tokens=True)
            reward = e.reward if e.reward is not None else score(answer, e.group.ground_truth)
            for k, v in {"accuracy": float(reward == 1.0), **e.session.metrics()}.items():
                totals[k] = totals.get(k, 0.0) + v
            n += 1
    return {k: v / n for k, v in totals.items()}


def main(argv: list[str] | None = None) -> None:
    """``python -m asyncrl.envs.calc MODEL [--config calc_tool] [--size N]``: the held-out
    accuracy and tool-call rates of a model (a checkpoint directory or builtin:NAME) as
    the config samples them (its held-out split, temperature, budget and turn limit)."""
    import argparse
    import json

    import torch

    from asyncrl.config import load_config
    from asyncrl.data import build_eval_problems
    from asyncrl.generator.hf import HFEngine
    from asyncrl.models import load_model, load_tokenizer
    from asyncrl.tools import ToolPool

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("model")
    ap.add_argument("--config", default="calc_tool")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"task.eval_size={args.size}", f"model.path={args.model}"])
    tok = load_tokenizer(args.model)
    problems = build_eval_problems(cfg, tok)
    engine = HFEngine(load_model(args.model).eval(), pad_id=tok.pad_token_id, seed=args.seed)
    e = cfg.env
    with ToolPool(processes=1, timeout_s=e.tool_timeout_s, max_output_chars=e.max_output_chars) as pool:
        got = evaluate(engine, tok, problems, cfg.eval.max_tokens or cfg.generator.max_tokens,
                       cfg.eval.temperature or cfg.generator.temperature, pool, e.max_turns)
    print(json.dumps({"model": args.model, "problems": len(problems), **got}))


if __name__ == "__main__":
    main()
