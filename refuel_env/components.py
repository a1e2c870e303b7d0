"""Building an environment's parts from its keyword arguments (and presets).

Every environment id takes the same keyword arguments (see :class:`EnvConfig`); ``preset``
fills in a named configuration first and explicit arguments override it (through ``gym.make``,
only those that differ from their default: :func:`spec_config`). Models are loaded once
per process and shared by every environment that names the same one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch

from refuel_env import embedded
from refuel_env.backends import OpenAIChatGenerator
from refuel_env.core import DialogueCore
from refuel_env.data import load_items
from refuel_env.generation import (
    SamplingParams,
    TextGenerator,
    TransformersGenerator,
    default_device,
    load_causal_lm,
)
from refuel_env.rewards import TrajectoryReward, TrajectoryRewardModel, load_reward_model
from refuel_env.snapshot import canonical, config_digest
from refuel_env.types import DialogueItem
from refuel_env.users import InstantUser, LLMUser, PresampledUser, UserSimulator

EMBEDDED = "embedded"
#: Base URL of a served simulated user ('openai' backend) when ``user_base_url`` is not given.
USER_BASE_URL_ENV = "REFUEL_USER_BASE_URL"


@dataclass(frozen=True)
class EnvConfig:
    """Keyword arguments of every refuel-gym environment id."""

    dataset: Literal["ultrainteract", "anthropic_hh"] = "ultrainteract"
    """Which dataset starts the dialogues (and, for a pre-sampled user, asks the questions)."""
    data_source: str = "sample"
    """'sample' (the small sample shipped in the package), 'hub' (the full dataset through
    ``datasets.load_dataset``), or a local file or folder in the dataset's schema."""
    split: str = "train"
    """'train' or 'test' (held-out items, for evaluation)."""
    user: Literal["llm", "presampled", "instant"] = "llm"
    """'llm': a language model plays the user (setting one); 'presampled': the dataset's questions
    (setting two); 'instant': a fixed follow-up question, for measuring the environment itself."""
    max_turns: int = 5
    """Longest dialogue H. Without a 'horizon' reset option, H ~ U{1..max_turns}; with a pre-sampled
    user, H is the item's number of questions, capped at max_turns."""
    user_model: str | TextGenerator = EMBEDDED
    """The simulated user's model: 'embedded' (SmolLM2-135M-Instruct), a path / hub id, or a
    ready :class:`TextGenerator` (any backend). With ``user_backend='openai'``: the served model's name."""
    user_backend: Literal["transformers", "openai", "vllm"] = "transformers"
    """How the user's model runs: 'transformers' (loaded in this process), 'vllm' (an in-process
    ``vllm.LLM`` engine with prefix caching; needs the vllm extra, see
    :class:`refuel_env.backends.VLLMGenerator`) or 'openai' (an OpenAI-compatible server such as
    ``vllm serve`` or the OpenAI API, reached over HTTP; the API key comes from $OPENAI_API_KEY, token
    counts are estimated, the context is taken as 8192 tokens; see
    :class:`refuel_env.backends.OpenAIChatGenerator`)."""
    user_tensor_parallel_size: int = 1
    """'vllm' user backend: GPUs the user's model is sharded over."""
    user_vllm_kwargs: dict[str, Any] | None = None
    """'vllm' user backend: further ``vllm.LLM`` options, e.g. ``{"gpu_memory_utilization": 0.45,
    "max_model_len": 8192}``; on the CPU build ``{"kv_cache_memory_bytes": 2**30}`` sizes the KV cache."""
    user_base_url: str | None = None
    """Base URL of the 'openai' user backend, API prefix included (e.g. http://localhost:8000/v1);
    default: $REFUEL_USER_BASE_URL, else $OPENAI_BASE_URL, else https://api.openai.com/v1."""
    user_openai_kwargs: dict[str, Any] | None = None
    """'openai' user backend: further :class:`refuel_env.backends.OpenAIChatGenerator` options, e.g.
    ``{"tokenizer": "/path/to/the/served/model", "max_context": 131072, "max_concurrency": 64}``
    (a local tokenizer makes its token counts exact instead of estimated)."""
    user_prompt_style: Literal["paper", "role-swap"] | None = None
    """'paper' (appendix C.2 prompt) or 'role-swap'; default: role-swap for the embedded model."""
    user_device: str | None = None
    """Device of the user's model (default: cuda if available, else cpu)."""
    user_temperature: float = 0.8
    """Sampling temperature of the simulated user."""
    user_max_new_tokens: int | None = None
    """Longest user message in tokens (default: 64 for the embedded model, 1024 otherwise)."""
    reward_model: str | TrajectoryRewardModel = EMBEDDED
    """'embedded' (all-MiniLM-L6-v2 relevance), 'armorm', 'fsfairx', a path / hub id, or a ready
    :class:`TrajectoryRewardModel`."""
    reward_device: str | None = None
    """Device of the reward model (default: the model's own; ArmoRM, FsfairX or a checkpoint: the current CUDA
    device if there is one, else cpu; the embedded MiniLM: cpu). A trainer puts it on its rank's GPU."""
    kl_coef: float = 0.0
    """KL penalty coefficient gamma of eq. 11 (log-probs come from ``set_logprobs``)."""
    truncation_penalty: float | None = None
    """Reward Gamma given to a dialogue in which a response hit ``max_response_tokens``."""
    tokenizer: str | None = EMBEDDED
    """Tokenizer that counts response and dialogue tokens ('embedded', a path, or None for none;
    None is refused together with ``max_response_tokens``, ``max_dialogue_tokens`` or
    ``truncation_penalty``, which need token counts)."""
    max_response_tokens: int | dict[int, int] | None = None
    """A response of this many tokens or more counts as having hit the generation length limit; a dict
    {H: tokens} gives each dialogue length H its own limit (setting two, UltraInteract)."""
    max_dialogue_tokens: int | None = None
    """A dialogue longer than this ends the episode with truncated=True (the reason in info)."""
    data_filters: dict[str, Any] | None = None
    """Token limits applied to the dataset when it loads, counted with ``tokenizer`` (see refuel_env.data):
    ``max_dialogue_tokens``, ``max_prompt_tokens``, ``max_response_tokens``, each a number or {turns K: number}."""

    def config_id(self) -> str:
        """A short digest of the configuration (:func:`refuel_env.snapshot.config_digest`): equal
        arguments give equal ids (``0`` and ``0.0``, ``np.int64(5)`` and ``5``, dicts in any order);
        model objects count by their ``name``."""
        return config_digest("refuel-gym", vars(self))


PRESETS: dict[str, dict[str, Any]] = {
    "embedded": {},
    "paper-setting-one": {
        "dataset": "ultrainteract",
        "data_source": "hub",
        "user": "llm",
        # The 70 B user is served once (`vllm serve`, tensor parallel 4, its own GPUs) and every
        # rank calls it: scripts/launch_paper_setting_one.py starts both. URL: user_base_url or
        # $REFUEL_USER_BASE_URL. The local tokenizer makes its token counts exact.
        "user_model": "meta-llama/Llama-3.1-70B-Instruct",
        "user_backend": "openai",
        "user_openai_kwargs": {"tokenizer": "meta-llama/Llama-3.1-70B-Instruct", "max_context": 8192,
                               "max_concurrency": 64},
        "user_prompt_style": "paper",
        "user_temperature": 0.8,
        "user_max_new_tokens": 1024,
        "reward_model": "armorm",
        "tokenizer": "meta-llama/Meta-Llama-3-8B-Instruct",
        "max_response_tokens": 1024,
        "max_dialogue_tokens": 2048,
        "data_filters": {"max_dialogue_tokens": 2048},
    },
    "paper-setting-two-hh": {
        "dataset": "anthropic_hh",
        "data_source": "hub",
        "user": "presampled",
        "reward_model": "fsfairx",
        "tokenizer": "meta-llama/Meta-Llama-3-8B-Instruct",
        "kl_coef": 0.05,
        "truncation_penalty": -10.0,
        "max_response_tokens": 512,
        "data_filters": {"max_prompt_tokens": 128, "max_response_tokens": 512},
    },
    "paper-setting-two-ultrainteract": {
        "dataset": "ultrainteract",
        "data_source": "hub",
        "user": "presampled",
        "reward_model": "fsfairx",
        "tokenizer": "meta-llama/Meta-Llama-3-8B-Instruct",
        "kl_coef": 0.0,
        "truncation_penalty": -4.0,
        "max_response_tokens": {1: 1024, 2: 768, 3: 512, 4: 512, 5: 512},
        "max_dialogue_tokens": 3200,
        "data_filters": {"max_prompt_tokens": {1: 1024, 2: 768, 3: 512, 4: 256, 5: 128},
                         "max_response_tokens": {1: 1024, 2: 768, 3: 512, 4: 512, 5: 512}},
    },
}


def make_config(preset: str | None = None, **kwargs: Any) -> EnvConfig:
    """An :class:`EnvConfig` from a preset name and keyword arguments: every argument given wins over
    the preset, except that a preset whose ``dataset`` or ``user`` differs from the one given is refused."""
    names = {f.name for f in fields(EnvConfig)}
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(f"unknown environment argument(s) {sorted(unknown)}; valid: {sorted(names)}")
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    preset_values = PRESETS.get(preset or "embedded", {})
    for key in ("dataset", "user"):  # an id's dataset and user come in as arguments
        if key in preset_values and key in kwargs and kwargs[key] != preset_values[key]:
            from refuel_env import ENV_IDS

            matching = [
                env_id
                for env_id, spec in ENV_IDS.items()
                if all(spec[k] == preset_values[k] for k in ("dataset", "user") if k in preset_values)
            ]
            raise ValueError(
                f"preset {preset!r} is for {key}={preset_values[key]!r}, but the environment has {key}="
                f"{kwargs[key]!r}; make the preset with an id whose dataset and user match it ({matching}), "
                "or leave preset out"
            )
    config = replace(EnvConfig(), **{**preset_values, **kwargs})
    validate_config(config)
    return config


def spec_config(preset: str | None = None, **kwargs: Any) -> EnvConfig:
    """The :class:`EnvConfig` of an environment made by ``gym.make(id, preset=..., **kwargs)``.

    The registered ids hold every argument (``gym.spec(id).kwargs`` shows them) and Gymnasium passes
    them all, so the environment cannot tell an argument given from one left at its default: with a
    preset, an argument equal to its default takes the preset's value. :func:`preset_kwargs` resolves
    a preset without that ambiguity, for ``gym.make`` without ``preset``.
    """
    if preset is not None and preset in PRESETS:
        defaults = {f.name: f.default for f in fields(EnvConfig)}
        kwargs = {
            k: v for k, v in kwargs.items()
            if k in ("dataset", "user") or k not in PRESETS[preset] or k not in defaults
            or canonical(v) != canonical(defaults[k])
        }
    return make_config(preset, **kwargs)


def preset_kwargs(env_id: str, preset: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every keyword argument of ``env_id`` with ``preset`` applied and each of ``kwargs`` winning over
    it, even one equal to its default: ``gym.make(env_id, **preset_kwargs(env_id, preset, kwargs))``.
    Without a preset, ``kwargs`` unchanged."""
    if preset is None:
        return dict(kwargs)
    from refuel_env import ENV_IDS

    config = make_config(preset, **{**ENV_IDS.get(env_id, {}), **kwargs})
    return {f.name: getattr(config, f.name) for f in fields(EnvConfig)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


_CHOICES: dict[str, tuple[Any, ...]] = {
    "dataset": ("ultrainteract", "anthropic_hh"),
    "split": ("train", "test", "all"),
    "user": ("llm", "presampled", "instant"),
    "user_backend": ("transformers", "openai", "vllm"),
    "user_prompt_style": (None, "paper", "role-swap"),
}


def validate_config(config: EnvConfig) -> None:
    """Raise a ``ValueError`` (``TypeError`` for a wrong type) naming the argument, its value and what
    to pass, for any argument that is invalid or that would silently do nothing."""
    for name, choices in _CHOICES.items():
        value = getattr(config, name)
        if not isinstance(value, str | None) or value not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {type(value).__name__} {value!r:.80}")
    if not isinstance(config.data_source, str | os.PathLike):
        raise TypeError(f"data_source must be 'sample', 'hub' or a path, got {config.data_source!r:.80}")
    for name in ("max_turns", "user_tensor_parallel_size"):
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r:.80}; e.g. {name}=3")
    limits = config.max_response_tokens
    if isinstance(limits, dict):
        if not limits or not all(str(H).isdigit() and int(H) >= 1 and _is_int(n) and n >= 1 for H, n in limits.items()):
            raise ValueError(f"max_response_tokens as a dict must map dialogue lengths H >= 1 to ints >= 1, got {limits!r:.120}; "
                             "e.g. {1: 1024, 2: 768}")
    _check_data_filters(config.data_filters)
    for name, none in (
        ("user_max_new_tokens", "the default: 64 for the embedded user, else 1024"),
        ("max_response_tokens", "no limit"),
        ("max_dialogue_tokens", "no limit"),
    ):
        value = getattr(config, name)
        if name == "max_response_tokens" and isinstance(value, dict):
            continue
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 or None ({none}), got {type(value).__name__} {value!r:.80}")
    for name in ("user_temperature", "kl_coef"):
        value = getattr(config, name)
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {type(value).__name__} {value!r:.80}")
    penalty = config.truncation_penalty
    if penalty is not None and (not _is_number(penalty) or not math.isfinite(penalty)):
        raise ValueError(f"truncation_penalty must be a finite number or None, got {type(penalty).__name__} {penalty!r:.80}")
    for name in ("user_vllm_kwargs", "user_openai_kwargs"):
        if getattr(config, name) is not None and not isinstance(getattr(config, name), dict):
            raise TypeError(f"{name} must be a dict or None, got {getattr(config, name)!r:.80}")
    if not isinstance(config.user_base_url, str | None):
        raise TypeError(f"user_base_url must be a URL str or None, got {config.user_base_url!r:.80}")
    if not isinstance(config.user_model, str | TextGenerator):
        raise TypeError(
            f"user_model must be 'embedded', a model path or hub id, or a TextGenerator, got "
            f"{type(config.user_model).__name__} {config.user_model!r:.80}"
        )
    if not isinstance(config.reward_model, str | TrajectoryRewardModel):
        raise TypeError(
            f"reward_model must be 'embedded', 'armorm', 'fsfairx', a model path or hub id, or a "
            f"TrajectoryRewardModel, got {type(config.reward_model).__name__} {config.reward_model!r:.80}"
        )
    if not isinstance(config.tokenizer, str | None):
        raise TypeError(
            f"tokenizer must be 'embedded', a tokenizer path or hub id, or None, got "
            f"{type(config.tokenizer).__name__} {config.tokenizer!r:.80}"
        )
    if config.tokenizer is None:
        needing = [
            f"{name}={getattr(config, name)!r}"
            for name in ("max_response_tokens", "max_dialogue_tokens", "truncation_penalty", "data_filters")
            if getattr(config, name)
        ]
        if needing:
            raise ValueError(
                f"{' and '.join(needing)} {'needs' if len(needing) == 1 else 'need'} token counts, but "
                "tokenizer=None counts none, so the limit would do nothing; pass tokenizer='embedded' or a "
                "tokenizer path, or leave them unset"
            )
    uses_user_device = config.user == "llm" and config.user_backend == "transformers" and isinstance(config.user_model, str)
    _check_device("user_device", config.user_device, uses_user_device)
    _check_device("reward_device", config.reward_device, isinstance(config.reward_model, str))


_DATA_FILTERS = ("max_dialogue_tokens", "max_prompt_tokens", "max_response_tokens")


def _check_data_filters(filters: Any) -> None:
    if filters is None:
        return
    if not isinstance(filters, dict):
        raise TypeError(f"data_filters must be a dict or None, got {type(filters).__name__} {filters!r:.80}")
    unknown = sorted(set(filters) - set(_DATA_FILTERS))
    if unknown:
        raise ValueError(f"data_filters has unknown limit(s) {unknown}; the limits are {list(_DATA_FILTERS)}")
    for name, limit in filters.items():
        values = limit.values() if isinstance(limit, dict) else [limit]
        keys_ok = not isinstance(limit, dict) or all(str(k).isdigit() and int(k) >= 1 for k in limit)
        if not (keys_ok and all(_is_int(v) and v >= 1 for v in values)) or (isinstance(limit, dict) and not limit):
            raise ValueError(f"data_filters[{name!r}] must be an int >= 1 or a dict {{turns K: int >= 1}}, got {limit!r:.80}")


def _check_device(name: str, value: Any, used: bool) -> None:
    """A device name torch understands and, where it is used, one this machine has."""
    if value is None:
        return
    if not isinstance(value, str | torch.device):
        raise TypeError(f"{name} must be a device name such as 'cpu' or 'cuda:0', or None, got {value!r:.80}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{name}={value!r} is not a device ({err}); pass 'cpu', 'cuda', 'cuda:N' or None") from None
    if not used:
        return
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name}={value!r}, but this machine has no CUDA device; pass 'cpu' or None")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"{name}={value!r}, but this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}; "
                "pass one of them, 'cpu' or None"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={value!r}, but MPS is not available on this machine; pass 'cpu' or None")


def _hashable(value: Any) -> Any:
    return tuple(sorted((k, _hashable(v)) for k, v in value.items())) if isinstance(value, dict) else value


@lru_cache(maxsize=8)
def _items(dataset: str, source: str, split: str, max_turns: int, filters: tuple = (),
           tokenizer: str | None = None) -> tuple[DialogueItem, ...]:
    limits = {name: dict(v) if isinstance(v, tuple) else v for name, v in filters}
    if limits and tokenizer is None:
        raise ValueError(f"data_filters {sorted(limits)} count tokens: pass tokenizer= (a path or 'embedded')")
    counter = _token_counter(tokenizer) if limits else None
    return tuple(load_items(dataset, source=source, split=split, max_turns=max_turns, count_tokens=counter, **limits))


def _model_path(name: str) -> str:
    return str(embedded.smollm2_path()) if name == EMBEDDED else name


@lru_cache(maxsize=2)
def _vllm_engine(model: str, tensor_parallel_size: int, options: tuple[tuple[str, Any], ...]) -> TextGenerator:
    """One in-process vLLM engine per model and settings, shared by every environment that names it.

    Its prompts hold the policy's actions: special tokens' text in them is read as text (``literal_content``).
    """
    from refuel_env.backends.vllm_backend import VLLMGenerator

    return VLLMGenerator(model, tensor_parallel_size=tensor_parallel_size, literal_content=True, **dict(options))


def user_generator(config: EnvConfig) -> TextGenerator:
    if isinstance(config.user_model, TextGenerator):
        return config.user_model
    if config.user_backend == "openai":
        if config.user_model == EMBEDDED:
            raise ValueError("user_backend='openai' needs user_model set to the served model's name")
        base_url = config.user_base_url or os.environ.get(USER_BASE_URL_ENV)
        return OpenAIChatGenerator(config.user_model, base_url=base_url, **(config.user_openai_kwargs or {}))
    if config.user_backend == "vllm":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            raise ValueError(
                f"user_backend='vllm' would start one in-process engine of {config.user_model} in each of the {world} "
                "training ranks. Serve the user once instead (`vllm serve MODEL --tensor-parallel-size N` on GPUs of its "
                "own; scripts/launch_paper_setting_one.py does it) and pass user_backend='openai', user_model='<served "
                f"name>' and user_base_url='http://HOST:PORT/v1' (or set ${USER_BASE_URL_ENV})")
        options = tuple(sorted((config.user_vllm_kwargs or {}).items()))
        return _vllm_engine(_model_path(config.user_model), config.user_tensor_parallel_size, options)
    if config.user_backend != "transformers":
        raise ValueError(f"unknown user_backend {config.user_backend!r}; use 'transformers', 'vllm' or 'openai'")
    return _transformers_user(_model_path(config.user_model), config.user_device or default_device(), config.user_model)


@lru_cache(maxsize=4)
def _transformers_user(path: str, device: str, name: str) -> TransformersGenerator:
    """One transformers user generator per model and device, shared by every environment of the process.

    Collection steps each turn's dialogues in a vector environment of the size it needs, so a
    dialogue moves between environments; with one generator its KV kept between calls (the
    user's rendering of the dialogue grows turn by turn) follows it. User requests are seeded, so
    sharing changes no text. Special tokens' text in the dialogue (the policy's actions) is read
    as text (``literal_content``): an action cannot open or close a turn of the user's prompt.
    """
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise OSError(
            f"user_model={name!r} is a folder without a model: it holds {sorted(os.listdir(path))[:8]!r:.200} "
            "and no config.json; pass 'embedded', a folder written by save_pretrained (config.json, weights and "
            "a tokenizer with a chat template), a hub id in the local cache, or a TextGenerator"
        )
    model, tokenizer = load_causal_lm(path, device, "auto")  # a GenerationError naming the model otherwise
    return TransformersGenerator(model, tokenizer, name=name, literal_content=True)


def build_user(config: EnvConfig) -> UserSimulator:
    if config.user == "presampled":
        return PresampledUser()
    if config.user == "instant":
        return InstantUser()
    if config.user != "llm":
        raise ValueError(f"unknown user {config.user!r}; use 'llm', 'presampled' or 'instant'")
    is_embedded = config.user_model == EMBEDDED
    style = config.user_prompt_style or ("role-swap" if is_embedded else "paper")
    max_new = config.user_max_new_tokens if config.user_max_new_tokens is not None else (64 if is_embedded else 1024)
    sampling = SamplingParams(max_new_tokens=max_new, temperature=config.user_temperature)
    return LLMUser(user_generator(config), style=style, sampling=sampling)


@lru_cache(maxsize=4)
def _reward_model(name: str, device: str | None) -> TrajectoryRewardModel:
    kwargs = {"device": device} if device else {}
    return load_reward_model(name, **kwargs)


@lru_cache(maxsize=4)
def _token_counter(name: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(_model_path(name))
    except Exception as err:  # a missing path, a hub id without network, a broken folder
        raise OSError(
            f"tokenizer={name!r} cannot be loaded ({type(err).__name__}: {str(err)[:300]}); pass 'embedded' "
            "(SmolLM2's tokenizer), a local tokenizer directory or a hub id in the local cache, or None to "
            "count no tokens"
        ) from err
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: call the Rust tokenizer directly (about 2x faster)

        def count(text: str) -> int:
            return len(backend.encode(text, add_special_tokens=False).ids)

    else:

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


def build_core(config: EnvConfig) -> DialogueCore:
    items = _items(config.dataset, config.data_source, config.split, config.max_turns,
                   _hashable(config.data_filters or {}), config.tokenizer)
    model = config.reward_model
    reward = TrajectoryReward(
        model if isinstance(model, TrajectoryRewardModel) else _reward_model(model, config.reward_device),
        kl_coef=config.kl_coef,
        truncation_penalty=config.truncation_penalty,
    )
    return DialogueCore(
        items=items,
        user=build_user(config),
        reward=reward,
        max_turns=config.max_turns,
        count_tokens=_token_counter(config.tokenizer) if config.tokenizer else None,
        max_response_tokens=({int(H): n for H, n in config.max_response_tokens.items()}
                             if isinstance(config.max_response_tokens, dict) else config.max_response_tokens),
        max_dialogue_tokens=config.max_dialogue_tokens,
        config_id=config.config_id(),
    )
