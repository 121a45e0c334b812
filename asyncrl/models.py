"""Model directories: resolve, build the tiny built-in Qwen3, load, and save in HF format."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Qwen3Config

from asyncrl.kernels.rms_norm import fuse_rms_norms

ASSETS = Path(__file__).parent / "assets"
log = logging.getLogger(__name__)


def resolve_model_path(path: str) -> Path:
    if path.startswith("builtin:"):
        p = ASSETS / path.removeprefix("builtin:")
        if not p.exists():
            known = sorted(d.name for d in ASSETS.iterdir()) if ASSETS.exists() else []
            raise FileNotFoundError(
                f"no built-in model {path!r} (known: {known}); create it with `python -m asyncrl.warmstart`"
            )
        return p
    p = Path(path)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"model.path {path}: no config.json there (need a Hugging Face model directory)")
    return p


def tiny_qwen3_config(vocab_size: int, eos_id: int, pad_id: int) -> Qwen3Config:
    """About 0.8M parameters: enough for multi-digit arithmetic, fast on 2 CPU cores."""
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )


def load_model(path: str, dtype: str = "float32") -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(path), dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    fuse_rms_norms(model)  # the same norm in one autograd function (float32/float64 only)
    return model


def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(resolve_model_path(path))


def save_hf(model: PreTrainedModel, tokenizer, out: str | Path, state_dict: dict | None = None) -> None:
    """Write safetensors + config + tokenizer so transformers, vLLM and SGLang can load it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out)
