"""What is resident where, and when: the device of every model a rank holds, and the phases of an iteration.

Placement. :func:`placement` decides, once per process and before anything is loaded, where each
model goes: the policy, pi_0, the reward model, a transformers user and the vLLM policy replica
all go to the rank's own device, ``cuda:LOCAL_RANK`` (LOCAL_RANK from the launcher: torchrun,
``deepspeed`` or ``accelerate launch``; 0 without one), and it makes that device current with
``torch.cuda.set_device``. A LOCAL_RANK (or a launcher's processes per node) beyond the GPUs this
process sees is an error that says what to launch instead. An explicit ``device`` of the
environment (``reward_device``, ``user_device``) is kept.

Under ZeRO-3 the policy and pi_0 are built sharded (:func:`sharded_loading`: DeepSpeed's
``zero.Init`` through transformers' DeepSpeed integration), so no rank ever holds a full copy of
either outside a gather; pi_0 then lives in a parameter-only ZeRO-3 engine
(:meth:`refuel_agents.engine.TrainEngine.match_precision`).

Phases, and what is resident on a training GPU in each (W ranks, ZeRO-3; the trainer records the
measured bytes in :attr:`Residency.resident`, phase -> item -> bytes):

* ``collection``: the policy shard, its gradient and optimizer partitions (they live as long as
  the engine), the pi_0 shard and the reward model. With the vLLM replica the replica is awake
  and the policy stays a shard (the replica holds the weights it plays with); with the
  transformers backend the policy's full weights are gathered for the whole collection (ranks
  generate different numbers of times). A KL penalty in the environment needs pi_t and pi_0
  forwards during collection: then both are gathered.
* ``scoring``: the replica sleeps first (its memory freed, ``empty_cache``); pi_t is scored
  inside the policy's gather, then, with that released, pi_0 inside its own: at most one full
  copy at a time.
* ``training``: the replica asleep; shards, gradients, optimizer state, activations; the pi_0
  shard; the reward model.
* ``evaluation``: as collection (the held-out dialogues are played with the rollout policy).

Without ZeRO-3 (one GPU, or ZeRO-2) the policy and pi_0 are full copies on the rank's device.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: The phases of an iteration, in the order they run (evaluation after the iteration's training).
PHASES = ("collection", "scoring", "training", "evaluation")
#: What :attr:`Residency.resident` counts per phase (an absent item is omitted).
ITEMS = ("policy", "gradients", "optimizer", "reference", "gathered", "reward", "replica", "activations")


@dataclass(frozen=True)
class Placement:
    """Where this process puts each model it holds (``None``: the process holds no such model)."""

    local_rank: int
    """This process's rank on its node (LOCAL_RANK)."""
    gpus: int
    """CUDA devices this process sees (0 without CUDA)."""
    policy: torch.device
    """The trained policy (and its DeepSpeed shards)."""
    reference: torch.device
    """pi_0, the frozen initial policy."""
    reward: torch.device | None
    """The environment's reward model, when the environment loads it from a name (not a ready object)."""
    user: torch.device | None
    """The simulated user's model, when it runs in this process on transformers."""
    replica: torch.device | None
    """The vLLM policy replica, with ``policy_backend='vllm'``."""

    def env_kwargs(self) -> dict[str, str]:
        """Device arguments to add to the environment's so that its models land where decided (on CUDA only:
        on a CPU the environment's defaults already are the CPU)."""
        out = {}
        if self.reward is not None and self.reward.type == "cuda":
            out["reward_device"] = str(self.reward)
        if self.user is not None and self.user.type == "cuda":
            out["user_device"] = str(self.user)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(self).items()}


def _local(environ: Mapping[str, str]) -> tuple[int, int]:
    """(LOCAL_RANK, processes on this node) from the launcher's environment (torchrun: LOCAL_WORLD_SIZE,
    the deepspeed launcher: LOCAL_SIZE); (0, 1) without a launcher."""
    rank = int(environ.get("LOCAL_RANK", "0"))
    size = int(environ.get("LOCAL_WORLD_SIZE", environ.get("LOCAL_SIZE", str(rank + 1))))
    return rank, size


def rank_device(requested: str | None, environ: Mapping[str, str] | None = None) -> tuple[torch.device, int, int]:
    """(this rank's device, LOCAL_RANK, GPUs seen) for ``requested`` (the config's ``device``), checked.

    None: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. ``'cuda'``: ``cuda:LOCAL_RANK``.
    ``'cuda:N'`` names one GPU for a single process on its node; with several it is refused (every rank
    would load onto GPU N).
    """
    environ = os.environ if environ is None else environ
    local_rank, local_size = _local(environ)
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device={requested!r} is not a device ({err}); pass 'cpu', 'cuda' or None") from None
    if device.type != "cuda":
        return device, local_rank, 0
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"{gpus} CUDA device(s)" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
    if gpus == 0:
        raise ValueError(f"device={requested!r}, but this machine has no CUDA device; pass --device cpu or leave it unset")
    if device.index is not None:
        if local_size > 1:
            raise ValueError(
                f"device={requested!r} would put all {local_size} processes of this node on one GPU; pass "
                "--device cuda (each rank takes cuda:LOCAL_RANK) and choose the GPUs with CUDA_VISIBLE_DEVICES")
        index = device.index
    else:
        index = local_rank
    if index >= gpus or local_size > gpus:
        what = f"GPU index {index}" + (" (LOCAL_RANK)" if device.index is None else "")
        raise ValueError(
            f"{what} with {local_size} process(es) on this node, but this process sees {seen}, "
            f"cuda:0..cuda:{gpus - 1}; launch at most {gpus} process(es) per node (--nproc_per_node / --num_gpus "
            f"{gpus}) or make more GPUs visible")
    return torch.device("cuda", index), local_rank, gpus


def placement(device: str | None, env_config: Any = None, *, vllm: bool = False,
              environ: Mapping[str, str] | None = None) -> Placement:
    """Decide where every model of this process goes, and make the rank's GPU current (before anything loads).

    ``device``: the config's device (see :func:`rank_device`). ``env_config``: the environment's
    :class:`refuel_env.components.EnvConfig` (its own ``reward_device`` / ``user_device`` are kept,
    ``'cuda'`` without an index meaning the rank's GPU). ``vllm``: the policy plays through a vLLM replica
    (vLLM's external launcher puts it on ``cuda:LOCAL_RANK`` too).
    """
    rank_dev, local_rank, gpus = rank_device(device, environ)
    if rank_dev.type == "cuda":
        torch.cuda.set_device(rank_dev.index)
    reward = user = None
    if env_config is not None:
        if isinstance(env_config.reward_model, str):
            reward = _env_device(env_config.reward_device, rank_dev, local_rank)
        if (env_config.user == "llm" and env_config.user_backend == "transformers"
                and isinstance(env_config.user_model, str)):
            user = _env_device(env_config.user_device, rank_dev, local_rank)
    return Placement(local_rank=local_rank, gpus=gpus, policy=rank_dev, reference=rank_dev, reward=reward, user=user,
                     replica=rank_dev if vllm else None)


def _env_device(given: str | None, rank_dev: torch.device, local_rank: int) -> torch.device:
    if given is None:
        return rank_dev
    device = torch.device(given)
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


# ------------------------------------------------------------------------------ sharded loading


def zero3_config(deepspeed_config: str | os.PathLike | dict | None, world: int, model_path: str) -> dict | None:
    """The DeepSpeed config to build models under ``zero.Init`` with, or None when it is not ZeRO-3.

    Only the ZeRO and precision sections matter to ``zero.Init``; the batch sizes are filled in
    for DeepSpeed's checks (the engine resolves the config again with the real ones).
    """
    if deepspeed_config is None:
        return None
    if not isinstance(deepspeed_config, dict) and not Path(deepspeed_config).is_file():
        raise FileNotFoundError(f"DeepSpeed config {deepspeed_config} does not exist")
    raw = deepspeed_config if isinstance(deepspeed_config, dict) else json.loads(Path(deepspeed_config).read_text())
    if raw.get("zero_optimization", {}).get("stage") != 3:
        return None
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoConfig

    from refuel_agents.engine import OptimConfig, resolve_deepspeed_config

    bf16 = get_accelerator().device_name() == "cuda"  # as TrainEngine decides: bf16 on CUDA
    hidden = getattr(AutoConfig.from_pretrained(model_path), "hidden_size", None)
    return resolve_deepspeed_config(raw, OptimConfig(), world_size=world, bf16=bf16, hidden_size=hidden)


@contextmanager
def sharded_loading(ds_config: dict | None) -> Iterator[bool]:
    """Models built from ``from_pretrained`` inside this context are partitioned as they are built
    (transformers' DeepSpeed integration told that ZeRO-3 is on, so ``from_pretrained`` enters ``deepspeed.zero.Init``;
    rank 0 reads the checkpoint, each rank keeps its shard). Yields whether it is on (``ds_config`` not None).

    Only inside: left on, transformers would also partition the user's and the reward model's
    weights, and ``generate`` would synchronise ranks that generate different numbers of times.
    """
    if ds_config is None:
        yield False
        return
    import deepspeed
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    deepspeed.init_distributed()
    keep = _Zero3Config(ds_config)  # transformers holds only a weak reference: kept alive here
    set_hf_deepspeed_config(keep)
    try:
        yield True
    finally:
        unset_hf_deepspeed_config()
        del keep


class _Zero3Config:
    """What transformers reads of its ``HfDeepSpeedConfig`` (``is_deepspeed_zero3_enabled()``, ``deepspeed_config()``):
    the config and that it is ZeRO-3. ``HfDeepSpeedConfig`` itself also insists on accelerate being installed."""

    def __init__(self, config: dict):
        self.config = config

    def is_zero3(self) -> bool:
        return True


def load_policy(path: str, deepspeed_config: Any, world: int, device: torch.device, *,
                reference: bool) -> tuple[Any, Any, Any]:
    """(policy, tokenizer, pi_0 or None): a private copy of the policy, and under ZeRO-3 both built sharded.

    Private: the process-wide model cache may hold the same checkpoint for the simulated user (the
    embedded default uses SmolLM2 for both), which training must not change. Under ZeRO-3 the policy
    and, with ``reference``, pi_0 are built inside :func:`sharded_loading` in the engine's dtype, so each
    rank keeps its partition of each; elsewhere pi_0 is None here (the trainer copies the policy).
    """
    from refuel_env.generation import load_causal_lm

    zero3 = zero3_config(deepspeed_config, world, path)
    dtype = "auto" if zero3 is None else "bfloat16" if zero3["bf16"]["enabled"] else "float32"  # (the engine's)
    with sharded_loading(zero3) as sharded:
        model, tokenizer = load_causal_lm.__wrapped__(path, str(device), dtype)
        pi_0 = load_causal_lm.__wrapped__(path, str(device), dtype)[0] if sharded and reference else None
    return model, tokenizer, pi_0


def env_reward_model(env_config: Any) -> Any:
    """The environment's reward model object (the process-wide cached one when it is named by a string)."""
    if not isinstance(env_config.reward_model, str):
        return env_config.reward_model
    from refuel_env.components import _reward_model

    return _reward_model(env_config.reward_model, env_config.reward_device)


def is_sharded(module: torch.nn.Module) -> bool:
    """True when ``module``'s parameters are ZeRO-3 partitions."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


# ------------------------------------------------------------------------------ residency


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def parameter_bytes(module: torch.nn.Module | None) -> tuple[int, int]:
    """(bytes this rank keeps of ``module``'s parameters at all times, bytes of full weights gathered now).

    A ZeRO-3 parameter keeps its partition (``ds_tensor``; a parameter below the persistence threshold
    keeps its full copy); a gathered one holds its full data too. Other parameters are full copies.
    """
    if module is None:
        return 0, 0
    kept = gathered = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            kept += _nbytes(p.ds_tensor)
            if getattr(p, "ds_persist", False):
                kept += _nbytes(p.data)
            else:
                gathered += _nbytes(p.data)
        else:
            kept += _nbytes(p.data)
    return kept, gathered


def optimizer_bytes(engine: Any) -> tuple[int, int]:
    """(gradient bytes, optimizer-state bytes) that ``engine`` (a :class:`TrainEngine`) keeps on this rank.

    ZeRO-3: the gradient partitions and the reduce bucket, and the fp32 master partitions (none apart from
    fp32 weights) plus AdamW's moments. Plain
    path: the parameters' ``.grad`` and AdamW's moments (the weights are the master copy).
    """
    if engine is None:
        return 0, 0
    if engine.is_deepspeed:
        zero = engine.model.optimizer
        if engine.zero_stage == 3:
            grads = _nbytes(getattr(zero, "grad_partitions_flat_buffer", None))
            grads += sum(_nbytes(getattr(b, "buffer", None)) for b in getattr(zero, "ipg_buckets", {}).values())
            weights = {t.data_ptr() for t in getattr(zero, "fp16_partitioned_groups_flat", [])}
            # fp32 weights are their own master copy (DeepSpeed shares the storage): counted once, as the policy
            masters = sum(_nbytes(t) for t in getattr(zero, "fp32_partitioned_groups_flat", [])
                          if t.data_ptr() not in weights)
        else:
            grads = sum(_nbytes(g) for g in getattr(zero, "averaged_gradients", {}).values() if isinstance(g, torch.Tensor))
            grads += sum(_nbytes(p.grad) for p in getattr(zero, "single_partition_of_fp32_groups", []))
            masters = sum(_nbytes(p) for p in getattr(zero, "single_partition_of_fp32_groups", []))
        state = zero.optimizer.state
    else:
        grads = sum(_nbytes(p.grad) for p in engine.unwrapped.parameters())
        masters, state = 0, engine._optimizer.state
    moments = sum(_nbytes(v) for s in state.values() for k, v in s.items() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return grads, masters + moments


class Residency:
    """The placement of one process and the bytes resident on it per phase (:attr:`resident`).

    :meth:`record` measures what is resident at a point of a phase; a phase keeps its largest
    measurement (its peak: inside a gather where there is one).
    """

    def __init__(self, placement: Placement):
        self.placement = placement
        self.resident: dict[str, dict[str, int]] = {}

    def measure(self, *, policy: torch.nn.Module, engine: Any = None, reference: torch.nn.Module | None = None,
                reward: Any = None, replica_asleep: bool | None = None) -> dict[str, int]:
        """Bytes of every item resident on this rank now (see the module docstring for the items)."""
        kept, gathered = parameter_bytes(policy)
        ref_kept, ref_gathered = parameter_bytes(reference)
        grads, optim = optimizer_bytes(engine)
        items = {"policy": kept, "gradients": grads, "optimizer": optim, "reference": ref_kept,
                 "gathered": gathered + ref_gathered}
        reward_module = getattr(reward, "model", None)
        if isinstance(reward_module, torch.nn.Module):
            items["reward"] = parameter_bytes(reward_module)[0]
        if replica_asleep:
            items["replica"] = 0  # (awake, the replica's memory is vLLM's own: not measured here)
        return {k: v for k, v in items.items() if v or k == "replica"}

    def record(self, phase: str, items: dict[str, int]) -> None:
        """Keep ``items`` as ``phase``'s residency when it is the phase's largest so far."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if sum(items.values()) >= sum(self.resident.get(phase, {}).values()):
            self.resident[phase] = dict(items)


def empty_cache() -> None:
    """Return cached, unused blocks of the CUDA allocator to the device (before a vLLM wake-up, after a sleep)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
