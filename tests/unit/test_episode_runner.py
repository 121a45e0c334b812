"""The episode runner (asyncrl/envs) with a scripted engine: exact token ids, model mask,
log-probs and per-token versions of multi-turn episodes; several prompts and n > 1 in
flight; a weight update between turns (through the worker's real poll/handle path) or
within one; the turn limit and the token budget; tool calls batched through the pool.

The scripted engine answers each context from a table (context text -> replies, one per
occurrence of that context in the call, so the n copies of a prompt can differ), stops
at any stop token or at the row's limit, calls ``between_steps`` before every decode
step but the first (as the hf engine does) and labels each token with the version
loaded when it was sampled."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch

from asyncrl.envs import EpisodeLimits, Finish, Observation, ToolEnv, ToolSyntax, build_env, episode_limits, run_episodes
from asyncrl.generator.engine import Completion, GenerationInterrupted, SamplingParams
from asyncrl.generator.worker import Worker, run_prompts
from asyncrl.tasks.tokenizer import ASCII, build_char_tokenizer
from asyncrl.wire.codec import trajectory_arrays, weight_frames
from asyncrl.wire.schema import PromptGroup, Prompts

TOK = build_char_tokenizer(ASCII)
EOS = TOK.eos_token_id
CALC = ToolEnv((ToolSyntax("calculator", "(", ")"),), output_template="={output};")


def ids(text: str) -> list[int]:
    """Token ids of a script string; ``$`` stands for EOS."""
    return [EOS if ch == "$" else TOK.convert_tokens_to_ids(ch) for ch in text]


def lp(token: int, step: int) -> float:
    return -0.01 * token - 0.001 * step  # distinct per token and position: the test sees where each came from


class ScriptedEngine:
    def __init__(self, script: dict[str, list[str]], version: int = 0) -> None:
        self.script, self.version = script, version
        self.calls: list[SamplingParams] = []
        self.step = 0  # decode steps of the current call

    def generate(self, prompts, params, between_steps=None) -> list[list[Completion]]:
        params.check(len(prompts))
        seen: Counter = Counter()
        rows = []
        for i, p in enumerate(prompts):
            for _ in range(params.n):
                text = TOK.decode(p)
                rows.append((ids(self.script[text][seen[text]]), params.limit(i)))
                seen[text] += 1
        out = [Completion([], [], [], "length") for _ in rows]
        live = set(range(len(rows)))
        for self.step in range(max(len(r) for r, _ in rows)):
            if self.step and between_steps is not None:
                between_steps()
            for j in sorted(live):
                tok = rows[j][0][self.step]
                c = out[j]
                c.token_ids.append(tok), c.logprobs.append(lp(tok, self.step)), c.versions.append(self.version)
                if tok in params.stop_token_ids:
                    c.finish_reason = "stop"
                    live.discard(j)
                elif len(c.token_ids) == rows[j][1]:
                    live.discard(j)
            if not live:
                break
        self.calls.append(params)
        return [out[k : k + params.n] for k in range(0, len(out), params.n)]

    def load_weights(self, named, version: int) -> None:
        list(named)
        self.version = version


class FakeTools:
    """The tool pool: evaluates calculator input; records each batch it is given."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, str]]] = []

    def run(self, calls):
        self.batches.append(list(calls))
        return [str(eval(text, {"__builtins__": {}})) if name == "calculator" else "error: no such tool"
                for name, text in calls]


def group(i: int, prompt: str) -> PromptGroup:
    return PromptGroup(group_id=i, prompt_ids=TOK.encode(prompt, add_special_tokens=False), ground_truth="12",
                       data_source="asyncrl/arith")


# prompt "P:" -> (1+2) -> =3; -> (3*4) -> =12; -> #12<eos>, or its second copy: answer directly
THREE_TURNS = {"P:": ["x(1+2)", "#7$"], "P:x(1+2)=3;": ["y(3*4)"], "P:x(1+2)=3;y(3*4)=12;": ["#12$"]}
TURNS = ["x(1+2)", "y(3*4)", "#12$"]
OBS = ["=3;", "=12;"]


def expected(versions: tuple[int, int, int]):
    """The response of THREE_TURNS' first episode, its mask, log-probs and versions."""
    tok, mask, lps, vers = [], [], [], []
    for k, turn in enumerate(TURNS):
        t = ids(turn)
        tok += t
        mask += [1] * len(t)
        lps += [lp(x, s) for s, x in enumerate(t)]
        vers += [versions[k]] * len(t)
        if k < len(OBS):
            o = ids(OBS[k])
            tok, mask, lps, vers = tok + o, mask + [0] * len(o), lps + [0.0] * len(o), vers + [-1] * len(o)
    return tok, mask, lps, vers


def test_three_turn_episode_exact_tokens_mask_logprobs_versions():
    engine, tools = ScriptedEngine(THREE_TURNS, version=4), FakeTools()
    params = SamplingParams(n=2, max_tokens=64)
    [[first, second]] = run_episodes(engine, TOK, CALC, [group(0, "P:")], params, EpisodeLimits(max_turns=3),
                                     tools=tools)
    tok, mask, lps, vers = expected((4, 4, 4))
    assert first.token_ids == tok and first.mask == mask and first.versions == vers
    assert first.logprobs == pytest.approx(lps, abs=0) and first.turns == 3
    assert (first.finish_reason, first.reward, first.answer) == ("stop", None, "#12")  # the verifier scores turn 3
    assert second.token_ids == ids("#7$") and second.mask == [1, 1, 1] and second.turns == 1
    assert tools.batches == [[("calculator", "1+2")], [("calculator", "3*4")]]
    # round one: both copies of the prompt, the same budget; the stop tokens: EOS and ')'
    assert engine.calls[0].stop_token_ids == (EOS, ids(")")[0]) and not engine.calls[0].limits
    assert engine.calls[1].max_tokens == 64 - len(ids("x(1+2)=3;"))


def test_many_prompts_in_flight_one_engine_call_and_one_pool_batch_per_round():
    script = {
        "A:": ["(1+1)", "(2+2)"], "A:(1+1)=2;": ["#2$"], "A:(2+2)=4;": ["(4*4)"], "A:(2+2)=4;(4*4)=16;": ["#16$"],
        "B:": ["#0$", "(9-3)"], "B:(9-3)=6;": ["#6$"],
    }
    engine, tools = ScriptedEngine(script), FakeTools()
    groups = run_episodes(engine, TOK, CALC, [group(0, "A:"), group(1, "B:")], SamplingParams(n=2, max_tokens=40),
                          EpisodeLimits(max_turns=4), tools=tools)
    text = [[TOK.decode(e.token_ids, skip_special_tokens=True) for e in eps] for eps in groups]
    assert text == [["(1+1)=2;#2", "(2+2)=4;(4*4)=16;#16"], ["#0", "(9-3)=6;#6"]]
    assert [[e.turns for e in eps] for eps in groups] == [[2, 3], [1, 2]]
    assert len(engine.calls) == 3  # one engine call per round over every episode still running
    assert tools.batches == [[("calculator", "1+1"), ("calculator", "2+2"), ("calculator", "9-3")],
                             [("calculator", "4*4")]]
    for eps in groups:
        for e in eps:  # observations ("=N;") are environment tokens, everything else the model's
            env_text = TOK.decode([t for t, m in zip(e.token_ids, e.mask) if m == 0])
            assert env_text == "".join(re.findall(r"=\d+;", TOK.decode(e.token_ids)))
            assert all((m == 0) == (v == -1) == (p == 0.0) for m, v, p in zip(e.mask, e.versions, e.logprobs))
            assert e.mask[0] == 1


class ScriptedLink:
    """The worker's link: delivers ``msg`` at the first poll where ``when()`` holds."""

    def __init__(self, msg, when) -> None:
        self.msg, self.when, self.sent = msg, when, False

    def recv(self, timeout_s: float):
        if not self.sent and self.when():
            self.sent = True
            return self.msg
        return None


def _worker(engine, when, version: int = 9) -> Worker:
    update = weight_frames([("w", torch.zeros(2))], version=version)
    worker = Worker(engine, TOK, ScriptedLink(update, when), worker_id=0, seed=1)
    worker.env, worker.limits, worker.tools = CALC, EpisodeLimits(max_turns=3), FakeTools()
    return worker


MSG = Prompts(groups=[group(5, "P:")], min_version=0, n=2, temperature=1.0, top_p=1.0, max_tokens=64)


def _samples(results):
    return [(list(a.token_ids), list(a.mask), list(a.versions), list(a.logprobs))
            for header, frames in results for a in trajectory_arrays(header, frames)]


def test_weight_update_between_turns_gives_later_turns_the_new_version():
    engine = ScriptedEngine(THREE_TURNS, version=4)
    worker = _worker(engine, when=lambda: len(engine.calls) == 1)  # the poll between round one and two
    [(tok, mask, vers, lps), second] = _samples(worker.generate(MSG))
    e_tok, e_mask, e_lps, e_vers = expected((4, 9, 9))
    assert (tok, mask, vers) == (e_tok, e_mask, e_vers) and lps == pytest.approx(e_lps, abs=1e-7)
    assert second[2] == [4, 4, 4] and worker.engine.version == 9 and worker.resampled == 0


def test_weight_update_within_a_turn_switches_at_that_token():
    engine = ScriptedEngine(THREE_TURNS, version=4)
    worker = _worker(engine, when=lambda: len(engine.calls) == 1 and engine.step == 2)  # turn 2, before its 3rd token
    [(tok, mask, vers, _), _] = _samples(worker.generate(MSG))
    t1, t2, t3 = (len(ids(t)) for t in TURNS)
    o1, o2 = (len(ids(o)) for o in OBS)
    assert vers == [4] * t1 + [-1] * o1 + [4, 4] + [9] * (t2 - 2) + [-1] * o2 + [9] * t3


def test_restart_between_turns_resamples_every_episode_with_the_new_weights():
    engine = ScriptedEngine(THREE_TURNS, version=4)
    worker = _worker(engine, when=lambda: len(engine.calls) == 1)
    worker.max_resamples = 1  # generator.on_weight_update: restart
    got = _samples(worker.generate(MSG))
    assert worker.resampled == 1 and len(engine.calls) == 1 + 3  # the abandoned round, then three rounds
    e_tok, e_mask, _, e_vers = expected((9, 9, 9))
    assert got[0][:3] == (e_tok, e_mask, e_vers) and got[1][2] == [9, 9, 9]


def test_turn_limit_ends_the_episode_with_finish_reason_turns():
    [[e, _]] = run_episodes(ScriptedEngine(THREE_TURNS), TOK, CALC, [group(0, "P:")],
                            SamplingParams(n=2, max_tokens=64), EpisodeLimits(max_turns=2), tools=FakeTools())
    assert e.finish_reason == "turns" and e.turns == 2
    assert e.token_ids == ids("x(1+2)") + ids("=3;") + ids("y(3*4)")  # the last call is not run


@pytest.mark.parametrize("extra, reason, response", [
    (3, "length", "x(1+2)=3;y(3"),  # turn 2 gets the 3 tokens left and is cut: the verifier scores it
    (0, "length", "x(1+2)"),  # the observation would use the last token: not appended
    (20, "stop", "x(1+2)=3;y(3*4)=12;#12$"),
])
def test_token_budget_counts_every_response_token(extra, reason, response):
    budget = len(ids("x(1+2)=3;")) + extra
    engine = ScriptedEngine(THREE_TURNS)
    [[e, _]] = run_episodes(engine, TOK, CALC, [group(0, "P:")], SamplingParams(n=2, max_tokens=budget),
                            EpisodeLimits(max_turns=5), tools=FakeTools())
    assert (e.finish_reason, e.token_ids) == (reason, ids(response)) and len(e.token_ids) <= budget
    if extra == 3:  # round two: one limit per prompt would be 3 here, and the whole budget is what remains
        assert engine.calls[1].max_tokens == 3


def test_per_turn_cap_and_per_prompt_limits():
    script = {"A:": ["(1+1)", "#12345678$"], "A:(1+1)=2;": ["#2$"]}
    engine = ScriptedEngine(script)
    [[a, b]] = run_episodes(engine, TOK, CALC, [group(0, "A:")], SamplingParams(n=2, max_tokens=40),
                            EpisodeLimits(max_turns=4, max_turn_tokens=6), tools=FakeTools())
    assert (a.finish_reason, b.finish_reason) == ("stop", "length")
    assert b.token_ids == ids("#12345") and b.answer == "#12345"  # cut at 6 tokens, scored as it is


def test_environment_reward_and_observation_text_without_tools():
    class Count:  # an environment of its own: says "go on" twice, then rewards the number of turns
        stop = (")",)

        def start(self, problem):
            return self

        def step(self, turn):
            return Observation("=3;") if turn.index < 2 else Finish(reward=float(turn.index + 1))

        def tool_output(self, output):
            raise AssertionError

    engine = ScriptedEngine({"P:": ["x(1+2)"], "P:x(1+2)=3;": ["y(3*4)"], "P:x(1+2)=3;y(3*4)=3;": ["#12$"]})
    results = run_prompts(engine, TOK, Prompts(groups=[group(0, "P:")], min_version=0, n=1, temperature=1.0,
                                                 top_p=1.0, max_tokens=64),
                          worker_id=0, env=Count(), limits=EpisodeLimits(max_turns=3))
    [(header, frames)] = results
    [arr] = trajectory_arrays(header, frames)
    assert header.samples[0].reward == 3.0 and header.samples[0].finish_reason == "stop"
    assert header.samples[0].num_tokens == len(arr.token_ids) == len(ids("x(1+2)=3;y(3*4)=3;#12$"))
    assert arr.mask.dtype == np.uint8 and int(arr.mask.sum()) == len(ids("x(1+2)y(3*4)#12$"))


def test_interrupt_mid_turn_propagates():
    engine = ScriptedEngine(THREE_TURNS)

    def between_steps():
        if engine.calls:
            raise GenerationInterrupted

    with pytest.raises(GenerationInterrupted):
        run_episodes(engine, TOK, CALC, [group(0, "P:")], SamplingParams(n=2, max_tokens=64),
                     EpisodeLimits(max_turns=3), between_steps, tools=FakeTools())


def test_a_tool_call_without_a_pool_is_refused():
    with pytest.raises(RuntimeError, match="no tool pool"):
        run_episodes(ScriptedEngine(THREE_TURNS), TOK, CALC, [group(0, "P:")], SamplingParams(n=2, max_tokens=64),
                     EpisodeLimits(max_turns=3))


def test_tool_calls_through_the_real_tool_pool():
    from asyncrl.config import load_config
    from asyncrl.envs import build_env, build_tools

    cfg = load_config("quickstart", ["env.type=tools", "env.tools=[{name: calculator, start: '(', end: ')'}]",
                                     "env.output_template={output};", "env.tool_processes=2"])
    env, pool = build_env(cfg), build_tools(cfg)
    refusal = pool.run([("calculator", "1/0")])[0]  # the calculator's own wording of its refusal
    script = {"P:": ["x(1+2)", "(2**5)"], "P:x(1+2)3;": ["(1/0)"], "P:(2**5)32;": ["#32$"],
              f"P:x(1+2)3;(1/0){refusal};": ["#0$"]}
    try:
        [[a, b]] = run_episodes(ScriptedEngine(script), TOK, env, [group(0, "P:")],
                                SamplingParams(n=2, max_tokens=200), EpisodeLimits(max_turns=3), tools=pool)
    finally:
        pool.close()
    assert TOK.decode(b.token_ids, skip_special_tokens=True) == "(2**5)32;#32"
    # the calculator's refusal comes back as an observation like any output
    assert "zero" in refusal and TOK.decode(a.token_ids, skip_special_tokens=True) == f"x(1+2)3;(1/0){refusal};#0"
    assert (a.finish_reason, a.turns, b.turns) == ("stop", 3, 2)
    with pytest.raises(ValueError, match="unknown tool"):
        build_tools(load_config("quickstart", ["env.type=tools", "env.tools=[{name: abacus, start: '(', end: ')'}]"]))


def test_standalone_eval_runs_tool_episodes_as_the_in_training_eval_does():
    """``python -m asyncrl.eval``'s ``run_eval`` on a tools task: the same episodes (tool
    outputs in the response) and rewards as the generators' path the in-training
    evaluation takes (``run_prompts`` of an eval request). Before, it sampled one answer
    per sample and scored the first turn: here 0/2 instead of 1/2."""
    from asyncrl.config import load_config
    from asyncrl.eval.sampling import run_eval
    from asyncrl.rewards import RewardPool
    from asyncrl.tasks import Problem

    cfg = load_config("quickstart", ["env.type=tools", "env.tools=[{name: calculator, start: '(', end: ')'}]",
                                     "env.output_template=={output};", "env.max_turns=3", "eval.k=2",
                                     "eval.temperature=1.0", "eval.max_tokens=64"])
    pool = FakeTools()
    g = group(-1, "P:")
    problem = Problem(prompt="", ground_truth=g.ground_truth, data_source=g.data_source, prompt_ids=tuple(g.prompt_ids))
    summary, [record] = run_eval(ScriptedEngine(THREE_TURNS), TOK, [problem], cfg, RewardPool(0), tools=pool)
    assert record["rewards"] == [1.0, 0.0]
    assert record["responses"] == ["".join(a + b for a, b in zip(TURNS, [*OBS, ""])).replace("$", ""), "#7"]
    assert summary["average"]["mean@2"] == 0.5

    msg = Prompts(groups=[g], min_version=0, n=2, temperature=1.0, top_p=1.0, max_tokens=64, purpose="eval")
    [(header, frames)] = run_prompts(ScriptedEngine(THREE_TURNS), TOK, msg, 0, env=build_env(cfg),
                                     limits=episode_limits(cfg), tools=pool)
    assert [s.reward for s in header.samples] == record["rewards"]
    arrays = trajectory_arrays(header, [bytes(f) for f in frames])
    assert [TOK.decode(a.token_ids, skip_special_tokens=True) for a in arrays] == record["responses"]
