"""Export the policy in Hugging Face format (safetensors + config + tokenizer)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from asyncrl.learner.policy import Policy


def full_state_dict(policy: Policy) -> dict[str, torch.Tensor]:
    """Unsharded HF-named weights, on rank 0's CPU (a collective: call on every rank)."""
    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("lm."): v for k, v in sd.items()}


def save_hf_checkpoint(policy: Policy, tokenizer, state: dict[str, torch.Tensor], out: Path) -> None:
    """Write to a temporary directory, then rename: a directory named like a
    checkpoint is always complete."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    state = {k: v for k, v in state.items() if k != "lm_head.weight" or not policy.lm.config.tie_word_embeddings}
    policy.lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
