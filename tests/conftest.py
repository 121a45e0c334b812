"""Shared fixtures: a tiny random Qwen3 with the char tokenizer, saved in HF format."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from testkit import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Path of a random tiny Qwen3 + char tokenizer directory (session-wide, read-only)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model")


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture
def one_torch_thread():
    """torch at one intra-op thread for the test, the previous count restored after it
    (engine tests: deterministic kernels, and no oversubscription beside other workers)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
