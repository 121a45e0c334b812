"""The Triton kernels under TRITON_INTERPRET=1 against the float64 oracle (CPU).

TRITON_INTERPRET must be set before the kernels are defined, so when this
module is collected in a process without it, its one test re-runs this file
in a fresh subprocess with the variable set (robust inside a whole-suite
pytest run). Cases are small (the interpreter is slow) and float32 only: the
interpreter's bf16 dot is wrong. Tolerances are the oracle module's (1e-5).
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = pathlib.Path(__file__).resolve()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERP:

    def test_triton_interpreter_suite():
        env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
        repo = str(HERE.parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE)],
            cwd=repo, env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, f"interpreter suite failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"

else:
    import torch

    from asyncrl.kernels import IGNORE_INDEX, token_logprobs, triton_impl

    _spec = importlib.util.spec_from_file_location("_kernel_oracle", HERE.parent / "test_kernels.py")
    oracle = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(oracle)

    torch.set_num_threads(1)

    @pytest.fixture(autouse=True)
    def small_tiles(monkeypatch):
        # 16x64 tiles, 2 vocab splits and 256-column grad chunks: V=1001 exercises
        # the padded last tile, the split merge and a ragged last chunk.
        monkeypatch.setattr(triton_impl, "SPLITS_OVERRIDE", 2)
        monkeypatch.setattr(triton_impl, "CHUNK_OVERRIDE", 256)

    @pytest.mark.parametrize("name,case,temperature", oracle.LOGPROB_CASES, ids=[c[0] for c in oracle.LOGPROB_CASES])
    def test_triton_logprobs_entropy_and_grads(name, case, temperature):
        oracle.check_against_oracle("triton", *oracle.make_case(**case), temperature=temperature)

    def test_triton_without_entropy():
        oracle.check_against_oracle("triton", *oracle.make_case(n=20, v=500), with_entropy=False)

    def test_triton_odd_hidden_dim():
        oracle.check_against_oracle("triton", *oracle.make_case(n=9, d=37, v=130), temperature=1.3)

    @pytest.mark.parametrize("name,kappa,temperature", oracle.PROXY_CASES, ids=[c[0] for c in oracle.PROXY_CASES])
    def test_triton_proxy(name, kappa, temperature):
        h, w, t = oracle.proxy_case(kappa)
        out, _ = oracle.check_proxy("triton", h, w, t, kappa=kappa, temperature=temperature)
        assert out[1] == 0 and t[1] == IGNORE_INDEX

    def test_triton_proxy_all_negative():
        oracle.check_proxy("triton", *oracle.make_case(negative=True), kappa=0.1)

    def test_triton_agrees_with_twin():
        h, w, t = oracle.make_case(n=8, v=200)
        lp_tri, ent_tri = token_logprobs(h, w, t, with_entropy=True, impl="triton")
        lp_ref, ent_ref = token_logprobs(h, w, t, with_entropy=True, impl="torch")
        torch.testing.assert_close(lp_tri, lp_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent_tri, ent_ref, rtol=1e-5, atol=1e-5)
