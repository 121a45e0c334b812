#!/usr/bin/env bash
# One-command GPU check of asyncrl.kernels (issue #4) and the one-GPU weight path (issue #7):
#   1. correctness (tests/gpu): the Triton kernels vs the float64 oracle (bf16 + fp32); weight sync on
#      one GPU: NCCL with learner rank 0 alone, and cuda_ipc with the learner and an hf engine sharing the
#      GPU (two processes, then a 3-step `asyncrl.launch quickstart` run; ~2 min of the total); with 2+
#      GPUs also the bucketed NCCL broadcast learner -> generator (cast to bf16, one packed buffer per
#      dtype per bucket, received a bucket at a time: tests/gpu/test_nccl_weights.py);
#   2. fwd+bwd time / peak memory at D=1536 and D=3584, V=151936, N=16384 beside
#      dense PyTorch and a cuBLAS GEMM of the same shape (JSON to $OUT if set);
#   3. a real learner training step (Qwen2.5-0.5B-sized random Qwen3, GRPO and Lp-Reg), and with
#      responses of 10x varying length, 8 per prompt: padded, packed (learner.packing),
#      packed with each prompt once (learner.share_prompts).
# Stops at the first error with a message saying which step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
fail() { echo "gpu_check.sh: FAILED at step: $*" >&2; exit 1; }

python -c 'import torch, triton, numpy' 2>/dev/null || python -m pip install torch triton numpy || fail "pip install torch triton numpy"
python -c 'import pytest' 2>/dev/null || python -m pip install pytest || fail "pip install pytest"
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")' \
  || fail "CUDA check (is this a GPU machine with a CUDA build of torch?)"
python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
# the weight-sync tests and step 3 need the wire stack; wheels in .whl/ (git-ignored) serve a machine without network
if ! python -c 'import msgspec, zmq' 2>/dev/null; then
  { [ -d .whl ] && python -m pip install --no-index --find-links .whl msgspec pyzmq; } || python -m pip install msgspec pyzmq \
    || fail "pip install msgspec pyzmq"
fi

echo "== 1/3 correctness: pytest tests/gpu (kernels; weight sync: nccl bucketed (2 GPUs for the broadcast), cuda_ipc)"
# -m overrides pyproject's default "not gpu" (which deselected the gpu-marked weight tests); no -x: one run
# on a lent GPU should report every failure, not the first
python -m pytest -q -p no:cacheprovider -rs -m "not vllm" tests/gpu/ || fail "correctness (pytest tests/gpu)"

echo "== 2/3 performance: benchmarks/gpu_kernels.py"
python benchmarks/gpu_kernels.py ${OUT:+--json "$OUT/gpu_kernels.json"} || fail "benchmark (benchmarks/gpu_kernels.py)"
echo "== 3/3 a real learner step: benchmarks/gpu_train_step.py (FSDP2, bf16, Triton kernels, GRPO + Lp-Reg)"
python benchmarks/gpu_train_step.py ${OUT:+--json "$OUT/gpu_train_step.json"} || fail "training step (benchmarks/gpu_train_step.py)"
echo "== 3b/3 the same step with responses of 10x varying length, 8 per prompt: padded, packed, packed with shared prompts"
python benchmarks/gpu_train_step.py --vary --groups 8 ${OUT:+--json "$OUT/gpu_train_step_packing.json"} || fail "packed training step (benchmarks/gpu_train_step.py --vary)"
echo "gpu_check.sh: OK"
