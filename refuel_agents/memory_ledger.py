"""What each training GPU holds in each phase of a REFUEL iteration, in bytes: pure arithmetic.

No model is built and no weight is read: the figures come from a model's ``config.json``
(:class:`ModelShape`) and the run's :class:`~refuel_agents.refuel_config.RefuelConfig`, with the
dtypes the run really uses (bf16 weights on CUDA, fp32 on a CPU) and DeepSpeed ZeRO-3's own
byte accounting (deepspeed/runtime/zero/stage3.py, 0.19):

* ``policy``: the 16-bit (or fp32) parameter partition, ``ceil(numel / W)`` elements of every
  parameter, plus the whole of each parameter at or under ``stage3_param_persistence_threshold``;
* ``gradients``: the gradient partition (``grad_partitions_flat_buffer``, the model's dtype) and
  the reduce bucket (``reduce_bucket_size`` elements);
* ``optimizer``: the fp32 master partition (none when the weights are fp32 already: DeepSpeed
  reuses them) and AdamW's fp32 ``exp_avg`` and ``exp_avg_sq``;
* ``activations`` in training: the larger of the backward pass's working set and the optimizer
  step's, where DeepSpeed casts one sub-group's gradients to fp32 (``sub_group_size`` elements
  at most, plus the parameter that crossed it) and torch's AdamW takes a square root of the same size.

The phases are those of :mod:`refuel_agents.residency`: ``collection`` (the vLLM replica awake,
the policy a shard), ``scoring`` (the replica asleep; pi_t, then pi_0, gathered one at a time),
``training`` (the replica asleep) and ``evaluation`` (as collection). ``scripts/memory_plan.py``
prints the plan; docs/scaling.md is its output.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from refuel_agents.refuel_config import RefuelConfig

GB = 10**9
PHASES = ("collection", "scoring", "training", "evaluation")
ITEMS = ("policy", "gradients", "optimizer", "reference", "gathered", "reward", "replica", "activations")
MODEL_CONFIGS = Path(__file__).resolve().parent / "configs" / "models"
"""Shipped ``config.json`` files of the models setting one names (shapes only, no weights)."""
SHIPPED = {
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-8b-instruct.json",
    "RLHFlow/ArmoRM-Llama3-8B-v0.1": "armorm-llama3-8b.json",
    "armorm": "armorm-llama3-8b.json",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3.1-70b-instruct.json",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct.json",
    "embedded": "smollm2-135m-instruct.json",
}
DEFAULT_ALLOWANCE_GB = 3.0
"""Per GPU, outside any tensor: the CUDA context and kernels (about 0.5-1 GB), NCCL's buffers, and the
caching allocator's fragmentation. An assumption, not a measurement."""
VLLM_WORKSPACE_GB = 2.0
"""The replica's own activation peak and CUDA graphs, inside its gpu_memory_utilization budget (assumed)."""
VLLM_MAX_UTILIZATION = 0.9


def shipped_config(name: str) -> Path:
    """The shipped ``config.json`` of a model named as the presets name it."""
    if name not in SHIPPED:
        raise KeyError(f"no shipped config.json for {name!r}; shipped: {sorted(SHIPPED)}. Pass the model's config.json path")
    return MODEL_CONFIGS / SHIPPED[name]


@dataclass(frozen=True)
class ModelShape:
    """A decoder's shape, read from its ``config.json``: enough to count its parameters and its KV cache."""

    name: str
    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    lm_head: bool = True
    """False for a reward model whose head replaces the output embedding (ArmoRM)."""
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    head_numels: tuple[int, ...] = ()
    """Parameters of a reward model's own heads, in module order."""
    dtype: str = "bfloat16"
    """The checkpoint's dtype (``torch_dtype``)."""

    @classmethod
    def from_config(cls, config: str | os.PathLike | dict | Any, name: str | None = None) -> ModelShape:
        """From a ``config.json`` path (or a folder holding one), a dict, or a transformers config."""
        if isinstance(config, str | os.PathLike):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            name = name or (path.parent.name if path.name == "config.json" else path.stem)
            config = json.loads(path.read_text())
        elif not isinstance(config, dict):
            config = config.to_dict()
        c = dict(config)
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                               "intermediate_size") if k not in c]
        if missing:
            raise ValueError(f"config of {name or 'the model'} lacks {missing}: not a Llama-style decoder config")
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        architectures = c.get("architectures") or []
        reward_head = any("Reward" in a or "SequenceClassification" in a for a in architectures)
        heads_numels: tuple[int, ...] = ()
        if "num_objectives" in c:  # ArmoRM: a regression layer and a gating MLP, no lm_head
            k, g, n = int(c["num_objectives"]), int(c.get("gating_hidden_dim", 1024)), int(c.get("gating_n_hidden", 3))
            gating, width = [], hidden
            for _ in range(n):
                gating += [width * g, g]
                width = g
            heads_numels = (hidden * k, *gating, width * k, k)
        elif reward_head:
            heads_numels = (hidden * int(c.get("num_labels", 1)),)
        dtype = str(c.get("torch_dtype") or c.get("dtype") or "float32")
        return cls(
            name=name or str(c.get("_name_or_path") or c.get("model_type", "model")),
            layers=int(c["num_hidden_layers"]), hidden_size=hidden, intermediate_size=int(c["intermediate_size"]),
            heads=heads, kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or hidden // heads), vocab_size=int(c["vocab_size"]),
            tied_embeddings=bool(c.get("tie_word_embeddings", False)) and not reward_head, lm_head=not reward_head,
            qkv_bias=bool(c.get("attention_bias", False)) or c.get("model_type") == "qwen2",
            o_bias=bool(c.get("attention_bias", False)), mlp_bias=bool(c.get("mlp_bias", False)),
            head_numels=heads_numels, dtype=dtype,
        )

    def layer_numels(self) -> list[int]:
        """One decoder layer's parameters in module order: q, k, v, o, gate, up, down, the two norms."""
        h, q, kv, i = self.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate_size
        out = [h * q] + ([q] if self.qkv_bias else []) + [h * kv] + ([kv] if self.qkv_bias else [])
        out += [h * kv] + ([kv] if self.qkv_bias else []) + [q * h] + ([h] if self.o_bias else [])
        for fan_in, fan_out in ((h, i), (h, i), (i, h)):
            out += [fan_in * fan_out] + ([fan_out] if self.mlp_bias else [])
        return out + [h, h]

    def parameter_numels(self) -> list[int]:
        """Every parameter's element count in ``model.parameters()`` order (a tied matrix once)."""
        out = [self.vocab_size * self.hidden_size]
        for _ in range(self.layers):
            out += self.layer_numels()
        out.append(self.hidden_size)
        if self.lm_head and not self.tied_embeddings:
            out.append(self.vocab_size * self.hidden_size)
        return out + list(self.head_numels)

    def trainable_numels(self, last_k_layers: int | None) -> list[int]:
        """The trained parameters' element counts (``engine.trainable_parameters``): all, or the last k layers,
        the final norm and an untied lm_head."""
        if last_k_layers is None:
            return self.parameter_numels()
        if not 1 <= last_k_layers <= self.layers:
            raise ValueError(f"last_k_layers must be in [1, {self.layers}] for {self.name}, got {last_k_layers}")
        head = [self.vocab_size * self.hidden_size] if self.lm_head and not self.tied_embeddings else []
        return self.layer_numels() * last_k_layers + [self.hidden_size] + head

    @property
    def parameters(self) -> int:
        return sum(self.parameter_numels())

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


@dataclass
class Row:
    """One line of the ledger: which item it adds to, what it is, its arithmetic and its bytes."""

    item: str
    what: str
    arithmetic: str
    bytes: int


@dataclass
class MemoryPlan:
    """Bytes per training GPU, phase -> rows; ``phases`` sums them per item (the names of ``residency``)."""

    world: int
    gpu_memory_bytes: int
    allowance_bytes: int
    rows: dict[str, list[Row]]
    vllm_gpu_memory_utilization: float | None
    assumptions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)
    """Phases that cannot run whatever their bytes (e.g. a replica with no room for one dialogue), and why."""

    @property
    def phases(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for phase, rows in self.rows.items():
            items: dict[str, int] = {}
            for row in rows:
                items[row.item] = items.get(row.item, 0) + row.bytes
            out[phase] = items
        return out

    def tensors(self, phase: str) -> int:
        """The phase's tensor bytes (every item, no allowance)."""
        return sum(self.phases[phase].values())

    def peak(self, phase: str) -> int:
        """The phase's peak on one training GPU: its tensors plus the fixed allowance."""
        return self.tensors(phase) + self.allowance_bytes

    def failing(self) -> list[str]:
        """The phases whose peak exceeds the GPU's memory, or that have a problem."""
        return [p for p in self.rows if self.peak(p) > self.gpu_memory_bytes or p in self.problems]

    def fits(self) -> bool:
        return not self.failing()

    def to_dict(self) -> dict:
        return {"world": self.world, "gpu_memory_bytes": self.gpu_memory_bytes, "allowance_bytes": self.allowance_bytes,
                "vllm_gpu_memory_utilization": self.vllm_gpu_memory_utilization, "fits": self.fits(),
                "phases": {p: {"items": self.phases[p], "peak": self.peak(p), "rows": [asdict(r) for r in rows]}
                           for p, rows in self.rows.items()},
                "assumptions": self.assumptions, "notes": self.notes, "problems": self.problems}


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def _zero_config(deepspeed: str | os.PathLike | dict | None) -> dict:
    if deepspeed is None:
        return {}
    cfg = deepspeed if isinstance(deepspeed, dict) else json.loads(Path(deepspeed).read_text())
    return cfg.get("zero_optimization", {})


def _number(zero: dict, key: str, auto: int, default: int) -> int:
    value = zero.get(key, default)
    return auto if value == "auto" else int(value)


def _env_limits(config: RefuelConfig) -> tuple[int, float]:
    """(longest dialogue in tokens, KL coefficient) of the configured environment."""
    from refuel_env.components import make_config

    env = make_config(config.env_preset, **config.env_kwargs)
    return int(env.max_dialogue_tokens or config.max_seq_len), float(env.kl_coef or 0.0)


def plan_for(
    config: RefuelConfig,
    *,
    world: int,
    policy: ModelShape,
    reward: ModelShape | None,
    gpu_memory_gb: float,
    device: str = "cuda",
    reward_dtype_bytes: int | None = None,
    allowance_gb: float = DEFAULT_ALLOWANCE_GB,
    vllm_gpu_memory_utilization: float | None = None,
    dialogue_tokens: int | None = None,
    kl_coef: float | None = None,
    generation_sequences: int = 64,
) -> MemoryPlan:
    """The memory of one training GPU (rank) in each phase of a run of ``config`` on ``world`` ranks.

    ``device`` decides the dtypes as the trainer does: bf16 weights on CUDA (DeepSpeed's bf16, a
    plain run's fp32 weights under autocast), fp32 on a CPU. ``reward_dtype_bytes`` defaults to
    2 on CUDA, 4 on a CPU. ``vllm_gpu_memory_utilization`` (or ``config.policy_vllm_kwargs``'s) fixes
    the replica's budget; left out, the plan takes the largest that fits, at most 0.9.
    ``dialogue_tokens`` and ``kl_coef`` default to the environment's (``max_dialogue_tokens``, ``kl_coef``).
    ``generation_sequences``: dialogues generated at once by the transformers backend (its KV cache).
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if gpu_memory_gb <= 0:
        raise ValueError(f"gpu_memory_gb must be > 0, got {gpu_memory_gb}")
    if dialogue_tokens is None or kl_coef is None:
        env_tokens, env_kl = _env_limits(config)
        dialogue_tokens = env_tokens if dialogue_tokens is None else dialogue_tokens
        kl_coef = env_kl if kl_coef is None else kl_coef
    cuda = device.startswith("cuda")
    zero = _zero_config(config.deepspeed)
    stage = int(zero.get("stage", 0)) if config.deepspeed else 0
    offload = str((zero.get("offload_optimizer") or {}).get("device", "none")) in ("cpu", "nvme")
    lp = 2 if cuda else 4  # the trained module's weights: bf16 under DeepSpeed on CUDA, else fp32
    if not config.deepspeed:
        lp = 4  # the plain path keeps fp32 weights (bf16 autocast on CUDA)
    rb = reward_dtype_bytes or (2 if cuda else 4)
    W = world
    h, V = policy.hidden_size, policy.vocab_size
    numels = policy.parameter_numels()
    trainable = policy.trainable_numels(config.last_k_layers)
    P, T = sum(numels), sum(trainable)
    assumptions = [f"allowance per GPU for the CUDA context, NCCL buffers and fragmentation: {allowance_gb:g} GB",
                   f"1 GB = 1e9 bytes; a GPU of {gpu_memory_gb:g} GB holds {gpu_memory_gb * GB:.0f} bytes"]
    notes: list[str] = []
    rows: dict[str, list[Row]] = {}
    problems: dict[str, str] = {}

    # -- persistent items: the same in every phase -----------------------------------------------
    persistent: list[Row] = []
    if stage == 3:
        threshold = _number(zero, "stage3_param_persistence_threshold", 10 * h, 10**5)
        part = sum(math.ceil(n / W) for n in numels)
        whole = sum(n for n in numels if n <= threshold)
        persistent.append(Row("policy", "ZeRO-3 parameter partition (+ small parameters kept whole)",
                              f"{part:,} x {lp} B + {whole:,} x {lp} B", (part + whole) * lp))
        grad_part = sum(math.ceil(n / W) for n in trainable)
    else:
        persistent.append(Row("policy", "the whole module's weights", f"{P:,} x {lp} B", P * lp))
        grad_part = math.ceil(T / W) if stage in (1, 2) else T
    bucket = _number(zero, "reduce_bucket_size", h * h, 5 * 10**8) if stage else 0
    gb_ = lp if stage else 4
    optim_dev = "CPU" if offload else "GPU"
    if offload:
        notes.append("offload_optimizer: the fp32 master partition, AdamW's state and the gradient partition live in CPU "
                     "memory, and the optimizer step runs there")
    else:
        persistent.append(Row("gradients", "gradient partition" if stage else "gradients (fp32)",
                              f"{grad_part:,} x {gb_} B", grad_part * gb_))
        if bucket:
            persistent.append(Row("gradients", "reduce bucket", f"{bucket:,} x {lp} B", bucket * lp))
        opt_part = grad_part if stage else T
        master = 4 if (stage and lp == 2) else 0
        persistent.append(Row("optimizer", f"fp32 master ({master} B) + AdamW m, v (8 B) on the {optim_dev}",
                              f"{opt_part:,} x {master + 8} B", opt_part * (master + 8)))
    if config.reference_kl:
        if stage == 3:
            ref = sum(math.ceil(n / W) for n in numels)
            persistent.append(Row("reference", "pi_0, ZeRO-3 partition (parameters only)", f"{ref:,} x {lp} B", ref * lp))
        else:
            persistent.append(Row("reference", "pi_0, a whole copy", f"{P:,} x {lp} B", P * lp))
    if reward is not None:
        persistent.append(Row("reward", f"reward model ({reward.name}), whole", f"{reward.parameters:,} x {rb} B",
                              reward.parameters * rb))

    # -- collection / evaluation ----------------------------------------------------------------
    vllm = config.policy_backend == "vllm"
    gathered_full = Row("gathered", "the policy's full weights, gathered", f"{P:,} x {lp} B", P * lp)
    collect: list[Row] = list(persistent)
    kv_tok = policy.kv_bytes_per_token(2 if cuda else 4)
    if reward is not None:
        reward_tokens = 8 * dialogue_tokens  # ArmoRMReward scores 8 dialogues per forward
        collect.append(Row("activations", "reward forward, 8 dialogues (no grad)",
                           f"8 x {dialogue_tokens} tok x (4 x {reward.hidden_size} + 3 x {reward.intermediate_size}) x {rb} B",
                           reward_tokens * (4 * reward.hidden_size + 3 * reward.intermediate_size) * rb))
    utilization = None
    if vllm:
        push = min(config.policy_vllm_push_bytes, P * lp)
        collect.append(Row("gathered", "weight push: whole decoder layers gathered at a time",
                           f"min(policy_vllm_push_bytes, {P:,} x {lp} B)", push))
        if kl_coef > 0:
            collect.append(gathered_full)
            notes.append("kl_coef > 0: collection needs pi_t / pi_0 forwards, so it runs inside the full-weight gather")
        fixed = sum(r.bytes for r in collect) + int(allowance_gb * GB)
        given = vllm_gpu_memory_utilization
        if given is None:
            given = config.policy_vllm_kwargs.get("gpu_memory_utilization")
        if given is None:
            utilization = min(VLLM_MAX_UTILIZATION, math.floor((gpu_memory_gb * GB - fixed) / (gpu_memory_gb * GB) * 100) / 100)
        else:
            utilization = float(given)
        budget = int(max(utilization, 0.0) * gpu_memory_gb * GB)
        weights = P * 2
        workspace = int(VLLM_WORKSPACE_GB * GB)
        kv = budget - weights - workspace
        seqs = kv / (kv_tok * dialogue_tokens) if kv > 0 else 0.0
        collect.append(Row("replica", f"vLLM replica: gpu_memory_utilization {utilization:.2f} of the GPU",
                           f"{utilization:.2f} x {gpu_memory_gb:g} GB", budget))
        notes.append(f"replica budget {_gb(budget)} = weights {P:,} x 2 B = {_gb(weights)} + workspace {VLLM_WORKSPACE_GB:g} GB "
                     f"+ KV cache {_gb(kv)}: {max(kv, 0) // kv_tok:,} tokens at {kv_tok:,} B/token, {seqs:.1f} dialogues of "
                     f"{dialogue_tokens} tokens at once")
        assumptions.append(f"the vLLM replica's activation peak and CUDA graphs: {VLLM_WORKSPACE_GB:g} GB of its budget")
        if kv < kv_tok * dialogue_tokens:
            problems["collection"] = problems["evaluation"] = (
                f"the vLLM replica's budget ({utilization:.2f} x {gpu_memory_gb:g} GB = {_gb(budget)}) leaves "
                f"{_gb(max(kv, 0))} for its KV cache, less than one {dialogue_tokens}-token dialogue ({_gb(kv_tok * dialogue_tokens)})")
    else:
        if stage == 3 and W > 1:
            collect.append(gathered_full)
        collect.append(Row("activations", f"generate's KV cache, {generation_sequences} dialogues",
                           f"{generation_sequences} x {dialogue_tokens} tok x {kv_tok:,} B",
                           generation_sequences * dialogue_tokens * kv_tok))
    rows["collection"] = collect

    # -- scoring: replica asleep; pi_t gathered, then pi_0 gathered (one at a time) ---------------
    R = min(config.max_new_tokens, config.max_seq_len)
    pair_tokens = (config.max_seq_len + R) if config.shared_prefix else 2 * config.max_seq_len
    ld = 2 if cuda else 4  # logits come out in bf16 on CUDA (both paths), fp32 on a CPU
    score_pairs = 2 * config.micro_batch_size
    scoring = list(persistent)
    if stage == 3:
        scoring.append(gathered_full)
    layer_ws = 4 * h + 3 * policy.intermediate_size
    scoring.append(Row("activations", f"forward of {score_pairs} pairs (no grad): one layer's working set",
                       f"{score_pairs} x {pair_tokens} tok x (4 x {h} + 3 x {policy.intermediate_size}) x {ld} B",
                       score_pairs * pair_tokens * layer_ws * ld))
    scoring.append(Row("activations", "response logits: model output + kept rows, fp32 copy and exp",
                       f"{score_pairs} x 2 x {R} tok x {V:,} x (2 x {ld} + 8) B", score_pairs * 2 * R * V * (2 * ld + 8)))
    rows["scoring"] = scoring

    # -- training: replica asleep; the larger of backward and the optimizer step ------------------
    training = list(persistent)
    mb = config.micro_batch_size
    tokens = mb * pair_tokens
    act = 2 if cuda else 4
    if config.gradient_checkpointing:
        saved = policy.layers * tokens * h * act
        saved_txt = f"{policy.layers} layers x {tokens} tok x {h} x {act} B + one layer recomputed 34 x {tokens} x {h} x {act}/2 B"
        saved += 34 * tokens * h * act // 2
    else:
        saved = policy.layers * 34 * tokens * h * act // 2
        saved_txt = f"{policy.layers} layers x 34 x {tokens} tok x {h} x {act}/2 B"
    logits = mb * 2 * R * V * (3 * ld + 12)
    live = 0
    if stage == 3:
        max_live = _number(zero, "stage3_max_live_parameters", 10**9, 10**9)
        prefetch = _number(zero, "stage3_prefetch_bucket_size", int(0.9 * h * h), 5 * 10**7)
        live = min(P, max_live + prefetch) * lp
    backward = saved + logits + live
    step = 0
    if not offload:
        if stage == 3:
            sub = _number(zero, "sub_group_size", 10**9, 10**9)
            largest = _largest_sub_group([math.ceil(n / W) for n in trainable], sub)
            step = largest * 8  # fp32 gradient of the sub-group + AdamW's sqrt(exp_avg_sq) of the same size
            step_txt = f"largest sub-group {largest:,} x (4 B fp32 grad + 4 B AdamW sqrt)"
        else:
            step = (grad_part if stage else T) * 4
            step_txt = f"{grad_part if stage else T:,} x 4 B (AdamW's sqrt(exp_avg_sq))"
    if backward >= step:
        training.append(Row("activations", f"backward, {mb} pair(s) of {pair_tokens} tokens: checkpointed inputs "
                            f"({_gb(saved)}), response logits ({_gb(logits)}), ZeRO-3 live parameters ({_gb(live)})",
                            f"{saved_txt}; {mb} x 2 x {R} x {V:,} x (3 x {ld} + 12) B; min(P, max_live + prefetch) x {lp} B",
                            backward))
    else:
        training.append(Row("activations", f"optimizer step (larger than the backward's {_gb(backward)})", step_txt, step))
    if not config.deepspeed and cuda:
        training.append(Row("activations", "autocast's bf16 copies of the weights", f"{P:,} x 2 B", P * 2))
    rows["training"] = training
    rows["evaluation"] = [Row(r.item, r.what, r.arithmetic, r.bytes) for r in collect]
    return MemoryPlan(world=W, gpu_memory_bytes=int(gpu_memory_gb * GB), allowance_bytes=int(allowance_gb * GB),
                      rows=rows, vllm_gpu_memory_utilization=utilization, assumptions=assumptions, notes=notes,
                      problems=problems)


def _largest_sub_group(partition_numels: list[int], sub_group_size: int) -> int:
    """DeepSpeed's ``_create_fp16_sub_groups``: a sub-group closes once it reaches ``sub_group_size`` elements."""
    largest = current = 0
    for n in partition_numels:
        current += n
        if current >= sub_group_size:
            largest, current = max(largest, current), 0
    return max(largest, current)
