"""Model specs: the text that names a model (``embedded``, a checkpoint directory, ``hf:ID``,
``vllm:ID``, ``openai:MODEL[@BASE_URL]``), its checks, and the generator it loads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from refuel_env.generation import TextGenerator, TransformersGenerator

# ------------------------------------------------------------------------------ model specs


class SpecError(ValueError):
    """A model spec that cannot be turned into a generator."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: ``backend`` is 'transformers', 'vllm' or 'openai'."""

    backend: Literal["transformers", "vllm", "openai"]
    model: str
    base_url: str | None = None


SPEC_HELP = """\
Model specs:
  embedded                    SmolLM2-135M-Instruct shipped with the project (transformers)
  PATH                        a local checkpoint directory, e.g. runs/<run>/final_model (transformers)
  hf:ID_OR_PATH               a Hugging Face id already in the local cache, or a path (transformers)
  vllm:ID_OR_PATH             the same model run by an in-process vLLM engine (needs vllm installed)
  openai:MODEL[@BASE_URL]     a model behind an OpenAI-compatible endpoint; BASE_URL includes the
                              API prefix (http://localhost:8000/v1); default $OPENAI_BASE_URL, else
                              https://api.openai.com/v1, which needs $OPENAI_API_KEY"""


def parse_spec(spec: str) -> ModelSpec:
    """Parse a model spec (see :data:`SPEC_HELP`); raises :class:`SpecError` on a bad one."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"empty model spec {spec!r}\n{SPEC_HELP}")
    spec = spec.strip()
    if spec == "embedded":
        return ModelSpec("transformers", "embedded")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ("hf", "vllm", "openai"):
        if not rest:
            raise SpecError(f"model spec {spec!r} names no model after '{prefix}:'\n{SPEC_HELP}")
        if prefix == "openai":
            model, at, url = rest.partition("@")
            if not model or (at and not url):
                raise SpecError(f"model spec {spec!r}: use openai:MODEL or openai:MODEL@BASE_URL")
            if url and not url.startswith(("http://", "https://")):
                raise SpecError(f"model spec {spec!r}: the base URL {url!r} must start with http:// or https://")
            return ModelSpec("openai", model, url or None)
        return ModelSpec("transformers" if prefix == "hf" else "vllm", rest)
    if sep and prefix.isalpha() and len(prefix) > 1 and not Path(spec).exists():
        raise SpecError(f"unknown model spec prefix {prefix!r} in {spec!r}\n{SPEC_HELP}")
    path = Path(spec)
    if not path.is_dir():
        raise SpecError(
            f"model directory {spec!r} does not exist (or is not a directory). Pass a checkpoint directory "
            f"such as runs/<run>/final_model, or 'hf:<id>' for a model in the local Hugging Face cache.\n{SPEC_HELP}"
        )
    if not (path / "config.json").is_file():
        raise SpecError(f"{spec!r} holds no config.json: not a transformers checkpoint directory "
                        "(a training run's model is in runs/<run>/final_model)")
    return ModelSpec("transformers", str(path))


def split_named_spec(text: str) -> tuple[str, str]:
    """``NAME=SPEC`` -> (NAME, SPEC); a plain spec is named by itself."""
    name, sep, spec = text.partition("=")
    if sep and name and not any(ch in name for ch in ":/@"):
        if not spec:
            raise SpecError(f"{text!r}: nothing after '='; use NAME=SPEC")
        return name, spec
    return text, text


def check_spec(spec: str) -> ModelSpec:
    """Parse a spec and check what can be checked without loading it (the API key of the OpenAI API)."""
    from refuel_env.backends.openai_http import API_KEY_ENV, resolve_base_url

    parsed = parse_spec(spec)
    if parsed.backend == "openai":
        base_url = resolve_base_url(parsed.base_url)
        if "api.openai.com" in base_url and not os.environ.get(API_KEY_ENV):
            raise SpecError(
                f"{spec!r} goes to the OpenAI API ({base_url}), which needs a key: set ${API_KEY_ENV}, or give the "
                "base URL of a local OpenAI-compatible server (openai:MODEL@http://localhost:8000/v1)"
            )
    return parsed


def load_generator(spec: str | TextGenerator, *, device: str | None = None, dtype: str | None = None,
                   batch_size: int = 32) -> TextGenerator:
    """A :class:`TextGenerator` from a spec (a ready generator is returned as is)."""
    if isinstance(spec, TextGenerator):
        return spec
    parsed = check_spec(spec)
    if parsed.backend == "transformers":
        path = parsed.model
        if path == "embedded":
            from refuel_env.embedded import smollm2_path

            path = str(smollm2_path())
        generator = TransformersGenerator.from_pretrained(path, device=device, dtype=dtype, batch_size=batch_size)
        generator.name = spec
        return generator
    if parsed.backend == "vllm":
        from refuel_env.backends.vllm_backend import VLLMGenerator

        return VLLMGenerator(parsed.model, name=spec)
    from refuel_env.backends.openai_http import OpenAIChatGenerator

    return OpenAIChatGenerator(parsed.model, base_url=parsed.base_url)
