"""generator.on_weight_update: with ``restart`` new weights arriving mid-batch abandon
it and it is sampled again from scratch, so every token carries the new version and
the batch equals one that started after the update; with ``continue`` (the default)
the samples switch version at the update point."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from asyncrl.generator.hf import HFEngine
from asyncrl.generator.worker import Worker
from asyncrl.models import load_tokenizer
from asyncrl.wire.codec import trajectory_arrays
from asyncrl.wire.schema import PromptGroup, Prompts

MSG = Prompts(groups=[PromptGroup(group_id=10 + i, prompt_ids=[3, 4, 5 + i], ground_truth="7",
                                  data_source="asyncrl/arith") for i in range(3)],
              min_version=0, n=2, temperature=1.0, top_p=1.0, max_tokens=12)


def _worker(model_dir, version: int, weights=None) -> Worker:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if weights is not None:
        model.load_state_dict(weights)
    tok = load_tokenizer(str(model_dir))
    return Worker(HFEngine(model, pad_id=tok.pad_token_id, version=version), tok, link=None, worker_id=0, seed=5)


def _samples(results):
    return [(list(s.token_ids), list(s.versions)) for header, frames in results
            for s in trajectory_arrays(header, frames)]


def _new_weights(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.state_dict()


def _update_at(worker: Worker, weights, call: int) -> None:
    calls = []

    def poll():  # stands in for the link: the new weights arrive before decode step `call`
        calls.append(1)
        if len(calls) == call + 1:  # call 1 is the worker's own poll before the attempt (token 0)
            worker.engine.load_weights(list(weights.items()), version=8)

    worker.poll = poll


def test_restart_resamples_the_batch_with_the_new_weights(tiny_model_dir):
    new = _new_weights(tiny_model_dir)
    worker = _worker(tiny_model_dir, version=7)
    worker.max_resamples = 2  # generator.on_weight_update: restart
    _update_at(worker, new, call=4)
    got = _samples(worker.generate(MSG))
    assert worker.resampled == 1
    assert all(v == [8] * len(ids) for ids, v in got)
    fresh = _worker(tiny_model_dir, version=8, weights=new)  # a batch that started after the update
    fresh.poll = lambda: None
    assert got == _samples(fresh.generate(MSG))


def test_continue_switches_version_mid_sample(tiny_model_dir):
    worker = _worker(tiny_model_dir, version=7)
    _update_at(worker, _new_weights(tiny_model_dir), call=4)
    got = _samples(worker.generate(MSG))
    assert worker.resampled == 0
    spanning = [v for ids, v in got if len(ids) > 4]
    assert spanning and all(v == [7] * 4 + [8] * (len(v) - 4) for v in spanning)


def test_resamples_are_bounded_then_updates_apply_mid_batch(tiny_model_dir):
    """generator.max_resamples=1: the first update restarts the batch, the second one
    (during the resampled attempt) is applied between decode steps instead."""
    first, second = _new_weights(tiny_model_dir), _new_weights(tiny_model_dir)
    worker = _worker(tiny_model_dir, version=7)
    worker.max_resamples = 1
    calls = []

    def poll():  # each attempt polls once before its first token, then before every decode step
        calls.append(1)
        if len(calls) == 1 + 3:  # attempt 1, before decode step 3: v8 -> restart
            worker.engine.load_weights(list(first.items()), version=8)
        elif len(calls) == 4 + 1 + 5:  # attempt 2, before decode step 5: v9 -> applied mid-batch
            worker.engine.load_weights(list(second.items()), version=9)

    worker.poll = poll
    got = _samples(worker.generate(MSG))
    assert worker.resampled == 1
    spanning = [v for ids, v in got if len(ids) > 5]
    assert spanning and all(v == [8] * 5 + [9] * (len(v) - 5) for v in spanning)
