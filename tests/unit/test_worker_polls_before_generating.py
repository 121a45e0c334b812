"""A batch's first token is never sampled with superseded weights (issue 13, bug 7).

Weights that arrive while a batch waits its turn (behind another batch, or the worker's
``debug.generator_batch_delay_s``) sit in the link. The engine calls ``between_steps``
only after the first token, so the worker must drain the link before each generation
attempt; otherwise token 0 (and the batch's seed) uses the old version."""

from __future__ import annotations

from collections import deque

import torch
from transformers import AutoModelForCausalLM

from asyncrl.generator.hf import HFEngine
from asyncrl.generator.worker import Worker
from asyncrl.models import load_tokenizer
from asyncrl.wire.codec import trajectory_arrays, weight_frames
from asyncrl.wire.schema import PromptGroup, Prompts

MSG = Prompts(groups=[PromptGroup(group_id=i, prompt_ids=[3, 4, 5 + i], ground_truth="7",
                                  data_source="asyncrl/arith") for i in range(2)],
              min_version=0, n=2, temperature=1.0, top_p=1.0, max_tokens=6)


class ScriptedLink:
    """The generator's endpoint, replaying queued messages; nothing is ever sent."""

    def __init__(self, messages) -> None:
        self.queue = deque(messages)

    def recv(self, timeout_s: float):
        return self.queue.popleft() if self.queue else None


def test_weights_waiting_in_the_link_are_loaded_before_the_first_token(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = load_tokenizer(str(tiny_model_dir))
    new = [(k, v + 0.1) for k, v in model.state_dict().items() if k != "lm_head.weight"]  # tied
    notice, frames = weight_frames(new, version=3)
    link = ScriptedLink([(notice, frames)])  # v3 arrived after the batch was queued, before it started
    worker = Worker(HFEngine(model, pad_id=tok.pad_token_id, version=2), tok, link, worker_id=0, seed=1)

    results = worker.generate(MSG)
    versions = [list(s.versions) for header, f in results for s in trajectory_arrays(header, f)]
    assert worker.engine.version == 3 and not link.queue
    assert versions and all(v == [3] * len(v) for v in versions), versions
