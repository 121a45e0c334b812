"""Methods mixed into vLLM's worker (``worker_extension_cls``) so the ``vllm`` engine
can replace weights in place through ``LLM.collective_rpc``.

vLLM imports this module inside its worker; it imports nothing from vLLM itself.
"""

from __future__ import annotations

from typing import Iterable

import torch


class WeightLoaderExtension:
    """``self`` is vLLM's worker: ``self.model_runner.model`` is the served model."""

    def asyncrl_load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load HF-named tensors (all of the model's weights) into the served model;
        returns how many were loaded.

        vLLM's in-place reload is used: checkpoint names go through the model's own
        ``load_weights`` (q/k/v -> qkv_proj, gate/up -> gate_up_proj), then the same
        post-processing as at start-up (e.g. CPU weight repacking); calling
        ``model.load_weights`` directly fails after that post-processing. The reload
        is layer by layer, and with tied embeddings vLLM's ``lm_head`` is a layer of
        its own sharing ``embed_tokens``' weight, so it must be sent the head too:
        a learner that leaves the tied ``lm_head.weight`` out gets it filled in here.
        """
        weights = list(named_tensors)
        config = self.model_runner.model_config.hf_config
        names = {n for n, _ in weights}
        if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in names:
            embed = dict(weights).get("model.embed_tokens.weight")
            if embed is not None:
                weights.append(("lm_head.weight", embed))
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        return len(weights)

    def asyncrl_get_weight(self, name: str) -> torch.Tensor:
        """A copy of one served parameter (vLLM naming), for tests."""
        return dict(self.model_runner.model.named_parameters())[name].detach().clone()
