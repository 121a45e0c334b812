"""The ``hf`` engine drops finished rows from the decoder's batch: the samples are those
of decoding the full batch (same tokens, log-probs to float rounding), also across a
weight update that lands after rows have left, and the batch really shrinks."""

from __future__ import annotations

import pytest
import torch

from asyncrl.generator.engine import SamplingParams
from asyncrl.generator.hf import HFEngine
from asyncrl.models import load_model, load_tokenizer

from testkit import make_tiny_model

PROMPTS = ["1+2=", "417+385+296=", "9=", "12+345="]  # different lengths: left padding is exercised


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Peaked random models (init 0.3): at temperature 1.5 some answers stop early, some run to the limit."""
    return [make_tiny_model(tmp_path_factory.mktemp(f"m{s}") / "model", seed=s, initializer_range=0.3) for s in (0, 1)]


def input_shapes(engine: HFEngine) -> list[tuple[int, int]]:
    """(rows, positions) of every decoder forward of ``engine`` (recorded by a hook)."""
    shapes: list[tuple[int, int]] = []
    engine.model.register_forward_pre_hook(lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    return shapes


def flat(outs):
    return [c for comps in outs for c in comps]


def assert_same_samples(a, b) -> None:
    for x, y in zip(flat(a), flat(b), strict=True):
        assert (x.token_ids, x.versions, x.finish_reason) == (y.token_ids, y.versions, y.finish_reason)
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_dropping_finished_rows_keeps_the_samples(model_dirs, top_p):
    tok = load_tokenizer(str(model_dirs[0]))
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(n=16, max_tokens=24, temperature=1.5, top_p=top_p, stop_token_ids=(tok.eos_token_id,))
    full = HFEngine(load_model(str(model_dirs[0])), pad_id=tok.pad_token_id, seed=4, drop_finished=False)
    lean = HFEngine(load_model(str(model_dirs[0])), pad_id=tok.pad_token_id, seed=4)
    shapes = input_shapes(lean)
    a, b = full.generate(prompts, params), lean.generate(prompts, params)
    assert_same_samples(a, b)
    lengths = [len(c.token_ids) for c in flat(b)]
    assert min(lengths) * 3 < max(lengths), f"rows should finish at different steps: {lengths}"
    assert min(r for r, _ in shapes) < len(prompts) * params.n / 2, f"the batch never shrank: {shapes}"


def test_weight_update_after_rows_left(model_dirs):
    """New weights mid-batch rebuild the cache of the rows still decoding only, and the
    tokens after the update are the new weights' (the same as without dropping)."""
    tok = load_tokenizer(str(model_dirs[0]))
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(n=16, max_tokens=24, temperature=1.5, stop_token_ids=(tok.eos_token_id,))
    new = list(load_model(str(model_dirs[1])).state_dict().items())
    outs, shapes = [], None
    for drop in (False, True):
        engine = HFEngine(load_model(str(model_dirs[0])), pad_id=tok.pad_token_id, seed=7, version=1,
                          drop_finished=drop)
        shapes = input_shapes(engine)
        steps = []

        def between_steps(engine=engine, steps=steps):
            steps.append(1)
            if len(steps) == 12:
                engine.load_weights(new, version=2)

        outs.append(engine.generate(prompts, params, between_steps=between_steps))
    assert_same_samples(*outs)
    assert any(c.versions[-1] == 2 for c in flat(outs[1])), "no sample ran across the update"
    # forward 12 (after the 12th between_steps) re-encodes prompt + 12 tokens, for the rows
    # still in the batch only: every row still decoding, not all of them
    rows, positions = shapes[12]
    decoding = sum(len(c.token_ids) > 12 for c in flat(outs[1]))
    assert positions == max(map(len, prompts)) + 12 and decoding <= rows < len(prompts) * params.n, shapes


def test_prefill_runs_each_prompt_once(model_dirs):
    """The prefill computes each distinct prompt once (its rows copy its cache): the first
    forward has one row per prompt, both for n samples of a prompt and for the same
    prompt passed n times with n = 1 (how the episode runner passes a group's episodes:
    before, that prefilled every row), and the samples are the same, left padding
    included. Distinct prompts are each prefilled."""
    tok = load_tokenizer(str(model_dirs[0]))
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    grouped = SamplingParams(n=6, max_tokens=16, temperature=1.2, stop_token_ids=(tok.eos_token_id,))
    single = SamplingParams(n=1, max_tokens=16, temperature=1.2, stop_token_ids=(tok.eos_token_id,))
    once = HFEngine(load_model(str(model_dirs[0])), pad_id=tok.pad_token_id, seed=3)
    repeated = HFEngine(load_model(str(model_dirs[0])), pad_id=tok.pad_token_id, seed=3)
    shapes_once, shapes_repeated = input_shapes(once), input_shapes(repeated)
    a = once.generate(prompts, grouped)
    b = repeated.generate([p for p in prompts for _ in range(6)], single)
    assert shapes_once[0] == (len(prompts), max(map(len, prompts))) == shapes_repeated[0]
    assert shapes_once[1][0] == 6 * len(prompts) == shapes_repeated[1][0]  # then every row decodes
    assert_same_samples(a, b)
    start = len(shapes_repeated)
    repeated.generate(prompts + prompts[:1], single)  # distinct ones each, a repeat anywhere once
    assert shapes_repeated[start][0] == len(prompts) and shapes_repeated[start + 1][0] == len(prompts) + 1
    assert len({tuple(c.token_ids) for c in flat(a)}) > len(prompts)  # the rows of a prompt sample apart
