"""``eval.preset: lpreg_paper`` (the Lp-Reg paper's evaluation protocol) and greedy
decoding in the ``hf`` engine, which the preset needs for every source but AIME / AMC.

- The preset is a typed field checked at start-up: an unknown name, or an ``eval.k`` /
  temperature that the preset would silently override, is a config error naming the key.
- Greedy (temperature 0) in the hf engine picks the argmax at every step, whatever the
  seed, and reports the chosen token's log-prob under the model at temperature 1.
- ``python -m asyncrl.eval`` runs with the preset end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from asyncrl.config import ConfigError, load_config
from asyncrl.eval.sampling import Sampling, plan, samples_per_problem
from asyncrl.generator.engine import SamplingParams
from asyncrl.generator.hf import HFEngine
from asyncrl.tasks import Problem

from testkit import REPO, subprocess_env


def problems(*sources: str) -> list[Problem]:
    return [Problem(prompt="", ground_truth="1", data_source=s, prompt_ids=(3, 4)) for s in sources]


def test_lpreg_paper_samples_aime_and_amc_at_0_6_and_decodes_the_rest_greedily():
    cfg = load_config("quickstart", ["eval.preset=lpreg_paper", "generator.max_tokens=32"])
    got = plan(problems("AIME2024", "math-ai/aime25", "amc23", "HuggingFaceH4/MATH-500", "olympiadbench"), cfg)
    assert got == {Sampling(n=1, temperature=0.6, top_p=1.0, max_tokens=32): [0, 1, 2],
                   Sampling(n=1, temperature=0.0, top_p=1.0, max_tokens=32): [3, 4]}
    assert samples_per_problem(cfg) == 1
    default = load_config("quickstart", ["generator.temperature=0.9"])  # without the preset: nothing greedy
    assert {s.temperature for s in plan(problems("aime24", "amc23", "minerva"), default)} == {0.6, 0.9}


@pytest.mark.parametrize("overrides, key", [
    (["eval.preset=lpreg_paper", "eval.k=4"], "eval.k"),
    (["eval.preset=lpreg_paper", "eval.temperature=0.7"], "eval.temperature"),
    (["eval.preset=lpreg_paper", "eval.temperature_by_source={amc: 1.0}"], "eval.temperature_by_source"),
    (["eval.preset=paper"], "eval.preset"),
])
def test_preset_conflicts_and_unknown_presets_are_start_up_errors(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("quickstart", overrides)


def test_hf_greedy_is_the_argmax_with_temperature_1_logprobs(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [[3, 4, 5, 6], [7, 8]]  # different lengths: left padding
    params = SamplingParams(n=2, max_tokens=10, temperature=0.0, top_p=0.5)
    outs = [HFEngine(model, pad_id=0, seed=seed).generate(prompts, params) for seed in (0, 1)]
    assert [[c.token_ids for c in comps] for comps in outs[0]] == [[c.token_ids for c in comps] for comps in outs[1]]
    for prompt, comps in zip(prompts, outs[0]):
        a, b = comps
        assert a.token_ids == b.token_ids and len(a.token_ids) == 10  # no stop token given: full length
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + a.token_ids])).logits[0, len(prompt) - 1 : -1]
        lp = torch.log_softmax(logits.double(), -1)
        assert a.token_ids == lp.argmax(-1).tolist()
        want = lp.gather(-1, torch.tensor(a.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(a.logprobs, dtype=torch.float64), want, atol=1e-4, rtol=0)
        assert all(x <= 0 for x in a.logprobs)


def test_python_m_asyncrl_eval_with_the_preset(tiny_model_dir, tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "asyncrl.eval", "quickstart", "--checkpoint", str(tiny_model_dir),
                           "--out", str(out), "eval.preset=lpreg_paper", "task.eval_size=3", "generator.max_tokens=4",
                           "generator.threads=1"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["summary"]["k"] == 1
    assert [(r["temperature"], len(r["rewards"])) for r in got["records"]] == [(0.0, 1)] * 3  # arith: greedy
