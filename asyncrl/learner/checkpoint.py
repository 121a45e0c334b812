"""Export the policy in Hugging Face format (safetensors + config + tokenizer)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from asyncrl.learner.policy import Policy


def _storage(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank
    return t.untyped_storage().data_ptr()


def full_state_dict(policy: Policy) -> dict[str, torch.Tensor]:
    """Unsharded HF-named weights, on rank 0's CPU (a collective: call on every rank).

    A snapshot: nothing returned shares memory with the live parameters. On one CPU rank
    the gather and the CPU offload are no-ops, so the state dict would be the parameters
    themselves, and the weights published for a version (sent without a copy, kept for a
    restarted generator) would change with the next ``opt.step()``. Only tensors that do
    alias are copied, so a sharded or GPU learner pays nothing extra."""
    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    live = {_storage(t) for t in (*policy.parameters(), *policy.buffers())}
    return {k.removeprefix("lm."): v.clone() if _storage(v) in live else v for k, v in sd.items()}


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
