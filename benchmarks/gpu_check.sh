#!/usr/bin/env bash
# One-command GPU check of asyncrl.kernels (issue #4), < 6 min on one H100:
#   1. correctness of the Triton kernels vs the float64 oracle (tests/gpu, bf16 + fp32);
#   2. fwd+bwd time / peak memory at D=1536 and D=3584, V=151936, N=16384 beside
#      dense PyTorch and a cuBLAS GEMM of the same shape (JSON to $OUT if set);
#   3. a real learner training step (Qwen2.5-0.5B-sized random Qwen3, GRPO and Lp-Reg).
# Stops at the first error with a message saying which step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
fail() { echo "gpu_check.sh: FAILED at step: $*" >&2; exit 1; }

python -c 'import torch, triton, numpy' 2>/dev/null || pip install torch triton numpy || fail "pip install torch triton numpy"
python -c 'import pytest' 2>/dev/null || pip install pytest || fail "pip install pytest"
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")' \
  || fail "CUDA check (is this a GPU machine with a CUDA build of torch?)"
python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'

echo "== 1/3 correctness: pytest tests/gpu"
python -m pytest -q -x -p no:cacheprovider tests/gpu/ || fail "correctness (pytest tests/gpu)"

echo "== 2/3 performance: benchmarks/gpu_kernels.py"
python benchmarks/gpu_kernels.py ${OUT:+--json "$OUT/gpu_kernels.json"} || fail "benchmark (benchmarks/gpu_kernels.py)"
echo "== 3/3 a real learner step: benchmarks/gpu_train_step.py (FSDP2, bf16, Triton kernels, GRPO + Lp-Reg)"
python -c 'import msgspec, zmq' 2>/dev/null || pip install msgspec pyzmq || fail "pip install msgspec pyzmq"
python benchmarks/gpu_train_step.py ${OUT:+--json "$OUT/gpu_train_step.json"} || fail "training step (benchmarks/gpu_train_step.py)"
echo "gpu_check.sh: OK"
