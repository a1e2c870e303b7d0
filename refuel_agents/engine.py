"""The training engine shared by REFUEL and its baselines: AdamW, warm-up + cosine schedule,
gradient accumulation and clipping, checkpoints, on one device or sharded with DeepSpeed ZeRO.

Two paths behind one interface (:class:`TrainEngine`):

* **plain PyTorch** (``deepspeed_config=None``): one process on a CPU or one GPU, torch
  ``AdamW`` and ``LambdaLR(lr_lambda)``. On CUDA the weights stay fp32 and the forward runs
  under bf16 autocast (``bf16=None`` picks bf16 on CUDA, fp32 on a CPU).
* **DeepSpeed** (``deepspeed_config=`` a JSON file or dict): ZeRO-2 or ZeRO-3 across the
  processes of a launcher, multi-GPU and multi-node, or on CPUs with the gloo backend. The
  optimizer is still torch ``AdamW`` from :class:`OptimConfig` (no DeepSpeed op needs to be
  built) and the schedule is the same ``lr_lambda``; the config must not carry an
  ``optimizer`` or ``scheduler`` section. ``"auto"`` values are filled in by
  :func:`resolve_deepspeed_config`. With bf16 enabled DeepSpeed keeps bf16 weights and fp32
  master weights in the optimizer.

The shipped configs are ``refuel_agents/configs/deepspeed_zero3.json`` (the paper's
setting-one configuration: ZeRO-3, bf16, 8 GPUs) and ``deepspeed_zero2.json``.

Launch commands (``scripts/train_agent.py`` builds a :class:`TrainEngine` and passes its
``--deepspeed`` file here; each process must see the same model, config and seed)::

    # one CPU or one GPU, no DeepSpeed
    python scripts/train_agent.py --agent refuel ...

    # one node, 8 GPUs, ZeRO-3 (the deepspeed launcher also passes --local_rank=N)
    deepspeed --num_gpus 8 scripts/train_agent.py --agent refuel ... \\
        --deepspeed refuel_agents/configs/deepspeed_zero3.json
    torchrun --nproc_per_node 8 scripts/train_agent.py --agent refuel ... \\
        --deepspeed refuel_agents/configs/deepspeed_zero3.json

    # two nodes of 8 GPUs: run on every node, NODE_RANK = 0 on the node at MASTER_ADDR
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 8 \\
        --master_addr $MASTER_ADDR --master_port 29500 \\
        scripts/train_agent.py --agent refuel ... \\
        --deepspeed refuel_agents/configs/deepspeed_zero3.json
    # or from one node with passwordless ssh and a hostfile of "hostname slots=8" lines
    deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 --master_addr $MASTER_ADDR \\
        scripts/train_agent.py --agent refuel ... \\
        --deepspeed refuel_agents/configs/deepspeed_zero3.json

    # two CPU processes with gloo (how the distributed path is tested)
    torchrun --nproc_per_node 2 scripts/train_agent.py ... \\
        --deepspeed refuel_agents/configs/deepspeed_zero3.json

Checkpoints of several nodes must be written to a filesystem that all nodes share. A DeepSpeed
checkpoint is resumed with the same number of processes and the same ZeRO stage.

Log-probabilities of bf16 models should be computed from ``logits.float()``: the logits
come out of the model in bf16 on both paths.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: The decays after the warm-up that :func:`lr_lambda` offers.
LR_SCHEDULES = ("cosine", "linear")

_STATE_FILE = "engine.pt"
_META_FILE = "engine.json"
_DS_TAG = "engine"


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay; the defaults are the paper's setting one."""

    lr: float = 3e-7
    """Peak learning rate of AdamW (the paper: 3e-7 in setting one, 1e-7 to 3e-7 in setting two)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW coefficients of the running averages of the gradient and its square."""
    eps: float = 1e-8
    """AdamW term added to the denominator for numerical stability."""
    weight_decay: float = 1e-6
    """AdamW decoupled weight decay, applied to every trainable parameter."""
    warmup_ratio: float = 0.1
    """Fraction of the optimizer steps spent warming the learning rate up linearly (rounded)."""
    schedule: str = "cosine"
    """The decay after the warm-up, to 0 at the last step: 'cosine' or 'linear'."""
    max_grad_norm: float = 1.0
    """Clip the global gradient 2-norm to this value before each optimizer step; 0 disables clipping."""
    grad_accum_steps: int = 1
    """Micro-batches (backward calls) per optimizer step, per process."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"schedule must be one of {list(LR_SCHEDULES)}, got {self.schedule!r}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}")
        if not (isinstance(self.grad_accum_steps, int) and self.grad_accum_steps >= 1):
            raise ValueError(f"grad_accum_steps must be an integer >= 1, got {self.grad_accum_steps!r}")

    def warmup_steps(self, total_steps: int) -> int:
        """The number of warm-up steps among ``total_steps`` optimizer steps."""
        return round(self.warmup_ratio * total_steps)


def lr_lambda(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine") -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps``, so that
    no step has a zero learning rate, then a cosine (``schedule="cosine"``) or a straight line
    (``"linear"``) from 1 at ``step = warmup_steps`` to 0 at ``step = total_steps`` (and 0 after it).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= total_steps:
        return 0.0
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    if schedule == "linear":
        return 1.0 - progress
    if schedule != "cosine":
        raise ValueError(f"schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a Hugging Face decoder model (``model.model.layers`` for
    Llama, ``transformer.h`` for GPT-2, ...): the ``ModuleList`` holding the most parameters
    inside ``model.get_decoder()``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    lists = [m for m in decoder.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__}: no nn.ModuleList inside "
            f"{type(decoder).__name__}; train all parameters (last_k_layers=None) instead"
        )
    return max(lists, key=lambda m: sum(int(getattr(p, "ds_numel", p.numel())) for p in m.parameters()))  # ZeRO-3: full size


def _final_norms(model: nn.Module) -> list[nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return [m for m in decoder.children() if "norm" in type(m).__name__.lower()]


def trainable_parameters(model: nn.Module, last_k_layers: int | None) -> list[nn.Parameter]:
    """Make exactly the trained parameters require gradients and return them, in model order.

    ``None`` trains every parameter. ``k`` trains the last ``k`` decoder layers, the final
    norm and the output embedding (``lm_head``) and freezes the rest (the paper's setting
    two, ``k = 4``). The input embedding is always frozen: when ``lm_head`` is tied to it,
    that shared matrix stays frozen too, as in the original release (training it would
    change the input of the frozen bottom layers).
    """
    if hasattr(model, "peft_config"):  # a LoRA policy (refuel_agents.lora.wrap chose its adapters and layers)
        return [p for p in model.parameters() if p.requires_grad]
    if last_k_layers is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())
    layers = decoder_layers(model)
    if not (isinstance(last_k_layers, int) and 1 <= last_k_layers <= len(layers)):
        raise ValueError(
            f"last_k_layers must be an integer in [1, {len(layers)}] for this {len(layers)}-layer model "
            f"(or None to train everything), got {last_k_layers!r}"
        )
    norms = _final_norms(model)
    if not norms:
        raise ValueError(
            f"cannot find the final norm of {type(model).__name__} (a direct child of the decoder "
            "whose class name contains 'Norm'); train all parameters (last_k_layers=None) instead"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) to train")
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    frozen = {id(p) for p in inputs.parameters()} if inputs is not None else set()
    trained = {id(p) for m in [*layers[-last_k_layers:], *norms, head] for p in m.parameters()} - frozen
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    return [p for p in model.parameters() if p.requires_grad]


def resolve_deepspeed_config(
    config: str | os.PathLike | dict,
    optim: OptimConfig,
    *,
    world_size: int,
    bf16: bool,
    micro_batch_size: int = 1,
    hidden_size: int | None = None,
) -> dict:
    """A DeepSpeed config with its ``"auto"`` values filled in from the engine's settings.

    ``gradient_accumulation_steps`` and ``gradient_clipping`` come from ``optim``,
    ``train_micro_batch_size_per_gpu`` from ``micro_batch_size`` (DeepSpeed's bookkeeping
    only; the loss is whatever the caller feeds to ``backward``), ``train_batch_size`` is
    their product with ``world_size``, ``bf16.enabled`` is ``bf16``, and the ZeRO bucket
    sizes follow the model's ``hidden_size`` (h*h, 0.9*h*h, 10*h, as in transformers).
    Explicit values that contradict these raise an error, as do ``optimizer``/``scheduler``
    sections (the engine supplies torch AdamW and ``lr_lambda``) and fp16.
    """
    if not (isinstance(micro_batch_size, int) and micro_batch_size >= 1):
        raise ValueError(f"micro_batch_size must be an integer >= 1, got {micro_batch_size!r}")
    if isinstance(config, dict):
        cfg = copy.deepcopy(config)
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config {path} does not exist")
        cfg = json.loads(path.read_text())
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ValueError(
                f"the DeepSpeed config has a {section!r} section; remove it: the engine builds torch AdamW "
                "and the warm-up + cosine schedule from OptimConfig"
            )
    if cfg.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise ValueError("fp16 is not supported by the engine: set fp16.enabled to false and use bf16")
    cfg.pop("fp16", None)

    def fill(holder: dict, key: str, value: Any, what: str) -> None:
        current = holder.get(key, "auto")
        if current == "auto":
            holder[key] = value
        elif current != value:
            raise ValueError(f"DeepSpeed config sets {key}={current!r} but {what} gives {value!r}; use \"auto\"")

    gas = optim.grad_accum_steps
    fill(cfg, "train_micro_batch_size_per_gpu", micro_batch_size, "micro_batch_size")
    fill(cfg, "gradient_accumulation_steps", gas, "OptimConfig.grad_accum_steps")
    fill(cfg, "train_batch_size", micro_batch_size * gas * world_size, "micro batch x accumulation x world size")
    fill(cfg, "gradient_clipping", optim.max_grad_norm, "OptimConfig.max_grad_norm")
    cfg.setdefault("bf16", {})
    fill(cfg["bf16"], "enabled", bf16, "the engine's bf16 setting (pass bf16= to match)")
    zero = cfg.setdefault("zero_optimization", {})
    sizes = {"reduce_bucket_size": 1.0, "stage3_prefetch_bucket_size": 0.9}
    for key, value in zero.items():
        if value != "auto":
            continue
        if hidden_size is None:
            raise ValueError(f"zero_optimization.{key} is \"auto\" but the model has no config.hidden_size; set a number")
        if key in sizes:
            zero[key] = int(sizes[key] * hidden_size * hidden_size)
        elif key == "stage3_param_persistence_threshold":
            zero[key] = 10 * hidden_size
        else:
            raise ValueError(f"zero_optimization.{key} cannot be \"auto\"; set a value")
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    leftover = _auto_keys(cfg)
    if leftover:
        raise ValueError(f"DeepSpeed config keys left at \"auto\" that the engine cannot fill: {leftover}")
    return cfg


def _auto_keys(cfg: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items():
        if isinstance(value, dict):
            keys += _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            keys.append(prefix + key)
    return keys


def _enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers' API)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # gradient_checkpointing_enable is its deprecated alias
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; pass gradient_checkpointing=False")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """Rendezvous variables for a DeepSpeed run started without a launcher (one process)."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is kept as ``.<name>.old`` until then."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    new.rename(target)
    if old.exists():
        shutil.rmtree(old)


class TrainEngine:
    """Optimizer, schedule, accumulation, clipping and checkpoints around a causal LM.

    The caller runs ``out = engine.model(**batch)``, ``engine.backward(loss)`` and
    ``engine.step()`` for every micro-batch; ``step`` updates the weights every
    ``optim.grad_accum_steps`` calls and then returns ``{"lr", "grad_norm"}`` (the learning
    rate of that update and the gradient norm before clipping). It raises
    ``FloatingPointError`` on a non-finite gradient norm (before the update on the plain
    path; DeepSpeed has already applied it). The model is put in training mode; without bf16
    its weights are converted to fp32, and the plain path keeps fp32 weights under bf16
    autocast (bf16 weights would lose AdamW updates of a 3e-7 learning rate).

    Args:
        model: a Hugging Face causal LM (any ``nn.Module`` when ``last_k_layers`` is None and
            no gradient checkpointing is asked for).
        optim: the optimizer settings.
        total_steps: the number of optimizer steps of the schedule (the cosine reaches 0 there).
        deepspeed_config: ``None`` for the plain path, else a DeepSpeed config (path or dict).
        gradient_checkpointing: recompute activations in the backward pass (transformers'
            activation/gradient checkpointing with ``use_reentrant=False``).
        bf16: bf16 weights (DeepSpeed) or autocast (plain); ``None`` = on CUDA only.
        last_k_layers: train only the last k decoder layers, final norm and lm_head.
        micro_batch_size: sequences per micro-batch, for DeepSpeed's batch-size bookkeeping.
        device: plain path only; default ``cuda`` when available, else ``cpu``.
    """

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        total_steps: int,
        *,
        deepspeed_config: str | os.PathLike | dict | None = None,
        gradient_checkpointing: bool = False,
        bf16: bool | None = None,
        last_k_layers: int | None = None,
        micro_batch_size: int = 1,
        device: str | torch.device | None = None,
    ) -> None:
        if not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        self.optim = optim
        self.total_steps = total_steps
        self.warmup_steps = optim.warmup_steps(total_steps)
        self._window = (0, 0, total_steps)  # (first optimizer step, its place in the schedule, schedule length)
        params = trainable_parameters(model, last_k_layers)
        if gradient_checkpointing:
            _enable_checkpointing(model)
        model.train()
        self._params = params
        self._micro_steps = 0
        self._optimizer_steps = 0
        self._deepspeed = deepspeed_config is not None
        self.frozen_engines: dict[int, Any] = {}  # id(module) -> the parameter-only ZeRO-3 engine of a frozen copy
        if deepspeed_config is None:
            self._init_plain(model, params, bf16, device)
        else:
            if device is not None:
                raise ValueError("device= applies to the plain path only; DeepSpeed places each rank on its own device")
            self._init_deepspeed(model, params, deepspeed_config, bf16, micro_batch_size)

    # -- set-up ---------------------------------------------------------------------------

    def _schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_multiplier(step))

    def lr_multiplier(self, step: int) -> float:
        """The schedule's multiplier of the learning rate at optimizer step ``step`` (see :meth:`set_schedule`)."""
        first, offset, total = self._window
        return lr_lambda(max(0, offset + step - first), total, self.optim.warmup_steps(total), self.optim.schedule)

    def set_schedule(self, first_step: int, offset: int, total: int) -> None:
        """From optimizer step ``first_step`` on, follow the schedule of ``total`` steps (warm-up
        and decay) from its step ``offset``: one iteration's window of a run-long schedule, or a
        schedule of its own (``offset=0``). The learning rate of the next update follows at once.
        Call it again after a resume; the window is not part of a checkpoint."""
        if not (0 <= offset < total and first_step >= 0):
            raise ValueError(f"need 0 <= offset < total and first_step >= 0, got {first_step=}, {offset=}, {total=}")
        self._window = (first_step, offset, total)
        scheduler = self.model.lr_scheduler if self.is_deepspeed else self._scheduler
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * self.lr_multiplier(scheduler.last_epoch)

    def reset_optimizer_state(self) -> None:
        """Forget AdamW's moment estimates and step counts, as a new run would start."""
        optimizer = self.model.optimizer if self.is_deepspeed else self._optimizer
        base = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO optimizer wraps torch AdamW
        base.state.clear()

    def match_precision(self, module: nn.Module) -> nn.Module:
        """Put a frozen copy of the policy (pi_0) in the trained model's precision: the same weight
        dtype and device, and on the plain path the same bf16 autocast, so that its log-probs and
        the trained model's agree where the weights do.

        Under ZeRO-3 a copy built sharded (``refuel_agents.residency.sharded_loading``) goes into a
        parameter-only ZeRO-3 engine of its own, with no optimizer: it stays a shard on every rank,
        gathered layer by layer in a forward pass, or whole in ``distributed.full_weights(engine,
        module=...)``. The module itself is returned; :attr:`frozen_engines` keeps its engine."""
        if self.zero_stage == 3 and any(hasattr(p, "ds_id") for p in module.parameters()):
            import deepspeed

            frozen, _, _, _ = deepspeed.initialize(model=module.requires_grad_(False), config=self.deepspeed_config)
            frozen.eval()
            self.frozen_engines[id(frozen.module)] = frozen
            return frozen.module
        dtype = next(self._module.parameters()).dtype
        module.to(self.device, dtype=dtype)
        if not self.is_deepspeed and self.bf16:
            module.forward = torch.autocast(self.device.type, dtype=torch.bfloat16)(module.forward)
        return module

    def _adamw(self, params: list[nn.Parameter]) -> torch.optim.AdamW:
        o = self.optim
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)

    def _init_plain(
        self, model: nn.Module, params: list[nn.Parameter], bf16: bool | None, device: str | torch.device | None
    ) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            raise RuntimeError(
                f"{world} processes were launched but no DeepSpeed config was given: pass "
                "deepspeed_config (e.g. refuel_agents/configs/deepspeed_zero3.json), or start one process"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.bf16 = self.device.type == "cuda" if bf16 is None else bf16
        self.rank, self.world_size, self.zero_stage = 0, 1, 0
        model.to(self.device, dtype=torch.float32)
        if self.bf16:  # (a LoRA policy: on the transformers module inside, which its generator calls too)
            inner = model.get_base_model() if hasattr(model, "peft_config") else model
            inner.forward = torch.autocast(self.device.type, dtype=torch.bfloat16)(inner.forward)
        self.model = model
        self._module = model
        self._optimizer = self._adamw(params)
        self._scheduler = self._schedule(self._optimizer)

    def _init_deepspeed(
        self, model: nn.Module, params: list[nn.Parameter], config: str | os.PathLike | dict, bf16: bool | None,
        micro_batch_size: int,
    ) -> None:
        try:
            import deepspeed
            from deepspeed.accelerator import get_accelerator
        except ImportError as e:
            raise ImportError(
                "deepspeed_config needs DeepSpeed: pip install 'refuel-gym[deepspeed]' (DS_BUILD_OPS=0 is enough)"
            ) from e
        _single_process_env()
        deepspeed.init_distributed()
        world = torch.distributed.get_world_size()
        on_cuda = get_accelerator().device_name() == "cuda"
        self.bf16 = on_cuda if bf16 is None else bf16
        if not self.bf16:
            model.to(dtype=torch.float32)
        resolved = resolve_deepspeed_config(
            config, self.optim, world_size=world, bf16=self.bf16, micro_batch_size=micro_batch_size,
            hidden_size=getattr(getattr(model, "config", None), "hidden_size", None),
        )
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=self._adamw(params), lr_scheduler=self._schedule, config=resolved
        )
        self.model = engine
        self._module = engine.module
        self.device = engine.device
        self.rank, self.world_size = torch.distributed.get_rank(), world
        self.zero_stage = engine.zero_optimization_stage()
        self.deepspeed_config = resolved

    # -- properties -----------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes files (global rank 0)."""
        return self.rank == 0

    @property
    def is_deepspeed(self) -> bool:
        """True on the DeepSpeed path."""
        return self._deepspeed

    @property
    def unwrapped(self) -> nn.Module:
        """The underlying model (for ``generate``; under ZeRO-3 pass ``synced_gpus=True``)."""
        return self._module

    @property
    def optimizer_steps(self) -> int:
        """Optimizer updates applied so far."""
        return self._optimizer_steps

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer update will use."""
        if self.is_deepspeed:
            return float(self.model.get_lr()[0])
        return float(self._optimizer.param_groups[0]["lr"])

    # -- training -------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of ``loss / grad_accum_steps``."""
        if self.is_deepspeed:
            self.model.backward(loss)
        else:
            (loss / self.optim.grad_accum_steps).backward()

    def step(self) -> dict[str, float] | None:
        """End a micro-step; at an accumulation boundary clip, update, advance the schedule and
        zero the gradients, and return ``{"lr", "grad_norm"}``; otherwise return ``None``."""
        lr = self.lr
        self._micro_steps += 1
        if self.is_deepspeed:
            boundary = self.model.is_gradient_accumulation_boundary()
            self.model.step()
            if not boundary:
                return None
            norm = self.model.get_global_grad_norm()
            norm = float("nan") if norm is None else float(norm)
        else:
            if self._micro_steps % self.optim.grad_accum_steps:
                return None
            max_norm = self.optim.max_grad_norm or float("inf")
            norm = float(torch.nn.utils.clip_grad_norm_(self._params, max_norm))
            if math.isfinite(norm):
                self._optimizer.step()
                self._scheduler.step()
            self._optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(norm):
            raise FloatingPointError(
                f"gradient norm is {norm} at optimizer step {self._optimizer_steps}: the loss or its inputs "
                "are not finite" + ("" if self.is_deepspeed else "; the update was skipped")
            )
        self._optimizer_steps += 1
        return {"lr": lr, "grad_norm": norm}

    def all_reduce_mean(self, value: float) -> float:
        """The mean of ``value`` over all processes (for logging)."""
        if self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.item() / self.world_size

    def all_reduce_means(self, values: dict[str, float]) -> dict[str, float]:
        """Each value's mean over all processes, in one all-reduce (every process passes the same keys)."""
        if self.world_size == 1:
            return {k: float(v) for k, v in values.items()}
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return {k: x / self.world_size for k, x in zip(values, t.tolist())}

    def barrier(self) -> None:
        """Wait for every process (no-op on the plain path)."""
        if self.world_size > 1:
            torch.distributed.barrier()

    # -- state ----------------------------------------------------------------------------

    def _counters(self) -> dict[str, int]:
        return {"micro_steps": self._micro_steps, "optimizer_steps": self._optimizer_steps}

    def _require_plain(self, what: str) -> None:
        if self.is_deepspeed:
            raise RuntimeError(
                f"{what} is for the plain path: under DeepSpeed the optimizer state is partitioned over "
                "the ranks; use save(directory) / load(directory)"
            )

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler and step counters (plain path; the weights are not included)."""
        self._require_plain("state_dict()")
        return {
            "optimizer": self._optimizer.state_dict(),
            "scheduler": self._scheduler.state_dict(),
            **self._counters(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._require_plain("load_state_dict()")
        missing = {"optimizer", "scheduler", "micro_steps", "optimizer_steps"} - set(state)
        if missing:
            raise ValueError(f"engine state lacks {sorted(missing)}: was it written by TrainEngine.state_dict()?")
        self._optimizer.load_state_dict(state["optimizer"])
        self._scheduler.load_state_dict(state["scheduler"])
        self._micro_steps = int(state["micro_steps"])
        self._optimizer_steps = int(state["optimizer_steps"])

    def _meta(self) -> dict[str, Any]:
        return {
            "format": "refuel-train-engine-1",
            "deepspeed": self.is_deepspeed,
            "zero_stage": self.zero_stage,
            "world_size": self.world_size,
            "total_steps": self.total_steps,
            "optim": asdict(self.optim),
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write the optimizer, schedule and counters to ``directory``, replacing it only once
        the new checkpoint is complete. The plain path leaves the weights to
        ``save_pretrained(state_dict=unwrapped_model_state())``; DeepSpeed's checkpoint holds
        them too (with the fp32 master weights). Under DeepSpeed every rank must call it with
        the same ``directory``."""
        target = Path(directory)
        tmp = target.with_name(f".{target.name}.tmp")
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.barrier()
        if self.is_deepspeed:
            self.model.save_checkpoint(str(tmp), tag=_DS_TAG, client_state=self._counters(), save_latest=False)
        else:
            torch.save(self.state_dict(), tmp / _STATE_FILE)
        self.barrier()
        if self.is_main:
            (tmp / _META_FILE).write_text(json.dumps(self._meta(), indent=2))
            _replace_dir(tmp, target)
        self.barrier()

    def load(self, directory: str | os.PathLike) -> None:
        """Resume from a checkpoint written by :meth:`save` with the same kind of engine (on the
        plain path, load the weights into the model first). Under ZeRO-3 call it on a freshly
        built engine, before any step."""
        directory = Path(directory)
        meta_path = directory / _META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not an engine checkpoint (no {_META_FILE})")
        meta = json.loads(meta_path.read_text())
        for key in ("deepspeed", "zero_stage", "world_size"):
            if meta[key] != self._meta()[key]:
                raise ValueError(
                    f"checkpoint {directory} was written with {key}={meta[key]!r} but this engine has "
                    f"{key}={self._meta()[key]!r}; resume with the same launch settings"
                )
        if self.is_deepspeed:
            path, client_state = self.model.load_checkpoint(str(directory), tag=_DS_TAG)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
            self._micro_steps = int(client_state["micro_steps"])
            self._optimizer_steps = int(client_state["optimizer_steps"])
        else:
            self.load_state_dict(torch.load(directory / _STATE_FILE, map_location=self.device, weights_only=True))

    def unwrapped_model_state(self) -> dict[str, torch.Tensor] | None:
        """The full model state dict on the CPU, on the main rank (``None`` on the others), for
        ``save_pretrained(state_dict=...)``. Under ZeRO-3 the shards are gathered layer by
        layer; every rank must call it."""
        if self.zero_stage == 3:
            return self.model._zero3_consolidated_16bit_state_dict()
        if not self.is_main:
            return None
        return {k: v.detach().cpu() for k, v in self._module.state_dict().items()}
