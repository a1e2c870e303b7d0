"""LoRA policies through ``peft``: pi_t and pi_0 from one module, adapters saved, merged weights for vLLM.

    python scripts/train_agent.py --agent refuel --lora-r 16 --lora-alpha 32

:func:`wrap` injects LoRA adapters into the loaded policy (in place: the transformers module the
generator holds samples with the adapters on) and returns the :class:`peft.PeftModel` that the
engine trains, only the adapter weights requiring gradients. LoRA's B starts at zero, so the
wrapped policy is exactly the loaded one. Then:

* pi_t is the module itself, adapters on, scored under ``torch.no_grad`` (frozen for the pass);
* pi_0 is :class:`AdaptersOff`: the same module called with its adapters switched off, which is
  exactly the loaded model, so no frozen copy of the weights is kept;
* checkpoints and ``final_model`` hold the adapter (``save_pretrained`` of the PEFT model), which
  loads with ``PeftModel.from_pretrained(base, path)``; :func:`load_adapter` reads it back on resume;
* the vLLM policy replica serves the base model's architecture, so it is given merged weights
  ``W + scaling * B A`` under the base model's names (:class:`MergedReplica`), one decoder layer
  group at a time as ``distributed.push_weights`` gathers them.

With ``last_k_layers=k`` the adapters go into the target modules of the last k decoder layers
only; the final norm and ``lm_head`` stay frozen (the full-weight path trains them).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER = "default"  # peft's name of the one adapter


def _peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise ImportError("--lora-r needs peft: pip install 'refuel-gym[lora]'") from e
    return peft


def target_names(model: nn.Module, targets: str) -> list[str]:
    """The ``target_modules`` for peft: the comma-separated names, each checked against the model's linear
    layers (a name matches a module whose dotted path ends in it), or for 'all-linear' the names of every
    linear layer but the output embedding (``lm_head``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if targets.strip() == "all-linear":
        return sorted({n.rsplit(".", 1)[-1] for n, m in linear.items() if m is not head})
    names = [t.strip() for t in targets.split(",") if t.strip()]
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing or not names:
        short = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(f"lora_target_modules: {missing or targets!r} name no linear layer of {type(model).__name__}; "
                         f"its linear layers are {short} (or pass 'all-linear')")
    return names


def wrap(model: nn.Module, r: int, alpha: float, targets: str, last_k_layers: int | None = None) -> Any:
    """``model`` with LoRA adapters of rank ``r`` and scaling ``alpha / r`` in ``targets`` (a PeftModel).

    ``last_k_layers=k`` puts them into the last k decoder layers only. Dropout is 0: pi_t is scored
    once before the updates and eq. 1 compares it with pi in training, which dropout would make noisy.
    """
    from refuel_agents.engine import decoder_layers

    peft = _peft()
    if not (isinstance(r, int) and r > 0) or not alpha > 0:
        raise ValueError(f"LoRA needs lora_r > 0 and lora_alpha > 0, got r={r!r}, alpha={alpha!r}")
    layers = None
    if last_k_layers is not None:
        n = len(decoder_layers(model))
        if not (isinstance(last_k_layers, int) and 1 <= last_k_layers <= n):
            raise ValueError(f"last_k_layers must be an integer in [1, {n}] for this {n}-layer model "
                             f"(or None for adapters in every layer), got {last_k_layers!r}")
        layers = list(range(n - last_k_layers, n))
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_names(model, targets),
                             layers_to_transform=layers, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def apply(model: nn.Module, config: Any) -> Any:
    """The policy a run trains: ``model`` wrapped by :func:`wrap` when ``config.lora_r`` > 0, else ``model``."""
    if not config.lora_r:
        return model
    return wrap(model, config.lora_r, config.lora_alpha, config.lora_target_modules, config.last_k_layers)


def initial_policy(model: Any) -> Any:
    """pi_0 for scoring: a LoRA policy with its adapters off (:class:`AdaptersOff`), else a frozen copy."""
    return AdaptersOff(model) if is_lora(model) else copy.deepcopy(model).eval().requires_grad_(False)


def merged_replica(model: Any, replica: Any) -> Any:
    """The vLLM replica of ``model``: a :class:`MergedReplica` for a LoRA policy, else ``replica`` itself."""
    return MergedReplica(replica, model) if is_lora(model) else replica


def is_lora(model: Any) -> bool:
    """True for a model :func:`wrap` returned (a PEFT model)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class AdaptersOff:
    """pi_0 of a LoRA policy: the trained module called with its adapters switched off.

    It stands where the frozen copy of the full-weight path stands (``RefuelTrainer.reference``):
    calling it runs the shared module under ``disable_adapter()``; every other attribute is the
    module's. ``to`` does nothing: the module is already where the engine put it.
    """

    def __init__(self, model: Any):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> AdaptersOff:
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def load_adapter(model: Any, model_dir: Path) -> None:
    """Load a checkpoint's adapter (``adapter_model.safetensors``) into the wrapped ``model`` in place."""
    from safetensors.torch import load_file

    file = Path(model_dir) / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{model_dir} holds no LoRA adapter (adapter_model.safetensors): it was written by a "
                                "run without --lora-r, or is incomplete; resume with the run's own LoRA settings")
    state = load_file(str(file))
    result = _peft().set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing or not state:
        raise RuntimeError(f"adapter {file} does not match the policy's adapters: missing {missing[:5]}, unexpected "
                           f"{sorted(result.unexpected_keys)[:5]}; resume with the same --lora-r and --lora-target-modules")


def merged(model: Any, named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The PEFT model's (name, tensor) pairs as the base model's: LoRA layers merged (``W + scaling * B A``),
    adapter tensors dropped, names without ``base_model.model.`` and ``.base_layer``. Under ZeRO-3 call it
    while the named parameters are gathered."""
    out = []
    for name, tensor in named:
        if ".lora_" in name:
            continue
        base = name.removeprefix("base_model.model.")
        if ".base_layer." in base:
            owner = model.get_submodule(name.rsplit(".base_layer.", 1)[0])
            base = base.replace(".base_layer.", ".")
            if name.endswith(".weight") and ADAPTER in getattr(owner, "lora_A", {}):
                delta = owner.get_delta_weight(ADAPTER)
                tensor = (tensor.float() + delta.float()).to(tensor.dtype)
        out.append((base, tensor))
    return out


class MergedReplica:
    """A vLLM policy replica that takes a LoRA policy's weights merged: ``update_weights`` receives the
    PEFT model's parameters (as ``distributed.push_weights`` sends them) and loads :func:`merged` ones.
    Everything else is the replica's."""

    def __init__(self, replica: Any, model: Any):
        self.replica, self.model = replica, model

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], **kwargs: Any) -> None:
        self.replica.update_weights(merged(self.model, named_tensors), **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.replica, name)

