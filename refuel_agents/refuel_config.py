"""REFUEL's settings: one dataclass with a docstring under every field (the CLI's help comes from it).

:class:`~refuel_agents.refuel.RefuelTrainer` runs them; the baselines' configs extend it
(:mod:`refuel_agents.baselines`). The defaults are the embedded model on a CPU; the paper's
settings are presets of ``scripts/train_agent.py`` (their sources: ``docs/training.md``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from refuel_agents.collection import PENALTY_TURNS
from refuel_agents.engine import LR_SCHEDULES
from refuel_agents.losses import LOSS_SCALES
from refuel_agents.tracking import parse_report_to


@dataclass
class RefuelConfig:
    """REFUEL's settings. Defaults: the embedded model on a CPU, a run of a few minutes."""

    env_id: str = "UltraInteractDialogue-v0"
    """Environment id (see refuel_env.ENV_IDS)."""
    env_preset: str | None = None
    """Environment preset (refuel_env.components.PRESETS); env_kwargs override it."""
    env_kwargs: dict[str, Any] = field(default_factory=lambda: {"max_turns": 3, "user_max_new_tokens": 24})
    """Extra environment arguments (EnvConfig fields)."""
    policy_model: str = "embedded"
    """Policy to train: 'embedded' (SmolLM2-135M-Instruct) or a local path / hub id."""
    iterations: int = 2
    """T: collect-then-train iterations; 0 = one pass over the split's prompts (ceil(split size / prompts_per_iteration))."""
    prompts_per_iteration: int = 8
    """Prompts (= tuples) collected per iteration; 0 = the whole dataset split. Iterations walk seeded permutations of
    the split without replacement: a permutation drawn from (seed, pass) each pass, iteration after iteration."""
    eta: float = 1.0
    """eta of eq. 1: the log-ratio difference is divided by it."""
    loss_scale: str = "paper"
    """'paper': eq. 1, ((1/eta) * log-ratio gap - reward gap)^2. 'original': the original release's (log-ratio gap -
    eta * reward gap)^2, eta^2 times larger, for learning rates copied from it (see refuel_agents.losses)."""
    epochs: int = 1
    """Passes over each iteration's tuples."""
    batch_size: int = 4
    """Pairs per optimizer update, over all ranks: each of W ranks trains on batch_size / W of its own pairs."""
    micro_batch_size: int = 2
    """Pairs per forward/backward on one rank; batch_size / (W * micro_batch_size) is the gradient accumulation."""
    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 1e-6
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of the updates spent warming up linearly before the decay."""
    lr_schedule: str = "cosine"
    """Decay after the warm-up: 'cosine' (to 0) or 'linear' (to 0)."""
    schedule_scope: str = "run"
    """'run': one warm-up + decay over all iterations. 'iteration': every iteration restarts AdamW's state and its
    own warm-up + decay (setting one of the original release, which ran each iteration as a new job)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = no clipping, as in the original release)."""
    shared_prefix: bool = True
    """Run each tuple's state s_h once for both responses (one packed row s_h, y, y' whose attention mask keeps
    y and y' apart) instead of two full sequences; the same log-probs, 1.78x less CPU time per step at 400-token
    states and 64-token responses. Needs sdpa or eager attention; off = two sequences per tuple."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    last_k_layers: int | None = None
    """Train only the last k decoder layers (plus final norm and lm_head); None = all."""
    lora_r: int = 0
    """LoRA rank (peft): train rank-r adapters instead of the weights; pi_0 is the same module with its adapters off,
    so reference_kl keeps no frozen copy. Checkpoints and final_model hold the adapter (PeftModel.from_pretrained);
    the vLLM policy replica gets the merged weights. With last_k_layers the adapters go into those layers only. 0 = off."""
    lora_alpha: float = 16.0
    """LoRA alpha: the adapters' output is scaled by lora_alpha / lora_r."""
    lora_target_modules: str = "all-linear"
    """Linear layers that get adapters: comma-separated names (e.g. q_proj,v_proj; each must name a linear layer of the
    policy) or 'all-linear' (every linear layer but lm_head)."""
    max_new_tokens: int = 32
    """Longest policy response during collection, in tokens."""
    max_new_tokens_by_h: dict[str, int] | None = None
    """Per-H response limits, JSON {"H": tokens}, e.g. {"1": 1024, "2": 768, "3": 512}: a dialogue of length H gets
    this budget at every turn (the original release's setting two); H not listed use max_new_tokens."""
    temperature: float = 0.8
    """Policy sampling temperature during collection."""
    logprob_temperature: float | None = None
    """Divide logits by this before log-softmax for log pi, log pi_t and log pi_0 (eq. 1 and the KL penalty).
    None = the sampling temperature (1.0 when sampling is greedy), so pi_t is the distribution y was drawn from."""
    penalty_turns: str = "rollout"
    """Which policy responses of a branch the KL penalty and Gamma cover: 'rollout' (y_h and the later turns to H, the
    generations Q(s_h, y_h) is the return of) or 'turn-h' (y_h only, the original release). Never the shared roll-in."""
    max_seq_len: int = 2048
    """Longest (state + response) in tokens for training; longer tuples are dropped and counted."""
    eval_prompts: int = 8
    """Held-out prompts, each played at every H in 1..max_turns with the same seeds before training and after each
    iteration; the summary reports the paired change in reward with a 95-percent bootstrap interval (0 = no evaluation)."""
    eval_split: str = "test"
    """Where the held-out prompts come from: 'test' (its first eval_prompts items) or 'train' (its last eval_prompts
    items, which training then never sees: a validation set for hyperparameter sweeps that leaves the test split alone)."""
    eval_temperature: float | None = None
    """Policy sampling temperature in the held-out evaluation; None = the collection's temperature, 0 = greedy. With a
    greedy user a greedy evaluation is deterministic, so its paired change holds no sampling noise, only the policy's."""
    eval_every: int = 1
    """Play the held-out evaluation after every eval_every-th iteration, and always before training and after the last."""
    reference_kl: bool = True
    """Keep a frozen copy of the initial policy to log KL(pi || pi_0) and use it for the env's KL penalty."""
    keep_checkpoints: int = 1
    """Checkpoints kept on disk (the newest N; older ones are deleted once a newer one is complete)."""
    save_every: int = 0
    """Also checkpoint every N optimizer steps (0 = only after each iteration)."""
    collect_chunk_prompts: int = 64
    """Prompts per stored chunk of collection: each rank collects its prompts in chunks of this many and writes each
    finished chunk's tuples to iteration_<t>/collected/; a run that stops during collection and is resumed collects
    only the chunks that are missing. 0 = a rank's whole shard in one chunk. REFUEL's collection; the baselines'
    data modes collect a rank's shard in one piece."""
    policy_backend: str = "transformers"
    """How the policy generates in collection and evaluation: 'transformers' (the very module being trained) or
    'vllm' (an in-process vLLM engine started from policy_model; the trained weights are pushed into it, without a
    restart, before each collection and evaluation; needs vllm)."""
    policy_vllm_kwargs: dict[str, Any] = field(default_factory=dict)
    """'vllm' policy backend: further vllm.LLM options, e.g. {"gpu_memory_utilization": 0.3, "tensor_parallel_size": 2}.
    With several ranks each rank starts its own engine (distributed_executor_backend='external_launcher')."""
    policy_vllm_push_bytes: int = 2**30
    """'vllm' policy backend: the trained weights go to the engine in groups of whole decoder layers of about this many
    bytes, each gathered from the ZeRO-3 shards and released before the next (the whole model is never gathered)."""
    policy_vllm_sleep: bool = False
    """'vllm' policy backend: put the engine to sleep (vLLM sleep mode, level 1: weights offloaded to CPU memory, KV
    cache freed) while DeepSpeed trains, and wake it before the next push. CUDA only; refused on a CPU."""
    deepspeed: str | None = None
    """DeepSpeed config file (ZeRO-2/3); None = plain PyTorch."""
    device: str | None = None
    """Device (default: cuda if available, else cpu)."""
    seed: int = 1
    """Seed of collection, mini-batch order and initialisation."""
    output_dir: str = "runs"
    """Where runs are written: <output_dir>/<run_name>/."""
    run_name: str | None = None
    """Run folder name (default: {env_id}__{agent}__{seed}__{time}; the baselines add their mode, {agent}-{mode})."""
    resume: bool = False
    """Continue the run in <output_dir>/<run_name> from its latest checkpoint."""
    progress: bool = True
    """Show progress bars."""
    report_to: str = "tensorboard"
    """Where metrics go besides metrics.jsonl: 'tensorboard', 'wandb' or 'trackio' (each in its offline mode, its files
    in the run folder; wandb and trackio are the extras refuel-gym[wandb] / [trackio]), several comma-separated, or
    'none'."""

    def validate(self) -> None:
        """Every problem at once, each naming its flag, the value given and what to pass; nothing is loaded."""
        problems = []

        def bad(name: str, value: Any, what: str) -> None:
            problems.append(f"--{name.replace('_', '-')} {_shown(value)}: {what}")

        def at_least(name: str, low: int, what: str) -> None:
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                bad(name, value, f"pass an integer >= {low} ({what})")

        if self.iterations < 0:
            bad("iterations", self.iterations, "pass an integer >= 1, or 0 for one pass over the split")
        at_least("epochs", 1, "passes over each iteration's tuples")
        at_least("batch_size", 1, "pairs per optimizer update, over all ranks")
        at_least("micro_batch_size", 1, "pairs per forward/backward on one rank")
        if not problems and self.batch_size % self.micro_batch_size:
            bad("batch_size", self.batch_size, f"must be a positive multiple of micro_batch_size ({self.micro_batch_size})")
        at_least("max_seq_len", 1, "the longest state + response in tokens that training keeps")
        at_least("max_new_tokens", 1, "the longest policy response in tokens")
        at_least("seed", 0, "seeds are non-negative")
        at_least("save_every", 0, "0 = checkpoint only after each iteration")
        at_least("collect_chunk_prompts", 0, "prompts per stored chunk of collection; 0 = a rank's shard in one")
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", self.lr, "pass a finite learning rate > 0, e.g. 1e-6")
        if not (math.isfinite(self.eta) and self.eta > 0):
            bad("eta", self.eta, "pass a finite number > 0")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            bad("temperature", self.temperature, "pass a finite number >= 0 (0 = greedy)")
        if not (0 <= self.warmup_ratio <= 1):
            bad("warmup_ratio", self.warmup_ratio, "pass a fraction in [0, 1]")
        if self.loss_scale not in LOSS_SCALES:
            bad("loss_scale", self.loss_scale, f"pass one of {list(LOSS_SCALES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            bad("lr_schedule", self.lr_schedule, f"pass one of {list(LR_SCHEDULES)}")
        if self.schedule_scope not in ("run", "iteration"):
            bad("schedule_scope", self.schedule_scope, "pass 'run' or 'iteration'")
        if self.penalty_turns not in PENALTY_TURNS:
            bad("penalty_turns", self.penalty_turns, f"pass one of {list(PENALTY_TURNS)}")
        if self.logprob_temperature is not None and not self.logprob_temperature > 0:
            bad("logprob_temperature", self.logprob_temperature, "pass a number > 0, or none for the sampling temperature")
        if not isinstance(self.max_new_tokens_by_h, dict | None):
            bad("max_new_tokens_by_h", self.max_new_tokens_by_h, 'pass a JSON object {"H": tokens}, e.g. {"1": 1024}')
        for key, value in (self.max_new_tokens_by_h if isinstance(self.max_new_tokens_by_h, dict) else {}).items():
            if not (str(key).isdigit() and int(key) >= 1 and isinstance(value, int) and value >= 1):
                bad("max_new_tokens_by_h", self.max_new_tokens_by_h,
                    f"needs entries H >= 1 -> tokens >= 1, got {key!r}: {value!r}")
        if self.eval_prompts < 0:
            bad("eval_prompts", self.eval_prompts, "pass an integer >= 0 (0 = no evaluation)")
        if self.eval_every < 1:
            bad("eval_every", self.eval_every, "pass an integer >= 1 (1 = after every iteration)")
        if self.eval_temperature is not None and not self.eval_temperature >= 0:
            bad("eval_temperature", self.eval_temperature, "pass a number >= 0 (0 = greedy), or none")
        if self.eval_split not in ("test", "train"):
            bad("eval_split", self.eval_split, "pass 'test' or 'train'")
        if self.keep_checkpoints < 1:
            bad("keep_checkpoints", self.keep_checkpoints, "pass an integer >= 1 (a resume needs the newest)")
        if self.prompts_per_iteration < 0:
            bad("prompts_per_iteration", self.prompts_per_iteration, "pass an integer >= 1, or 0 for the whole split")
        if self.policy_backend not in ("transformers", "vllm"):
            bad("policy_backend", self.policy_backend, "pass 'transformers' or 'vllm'")
        problems += _env_problems(self.env_id, self.env_preset, self.env_kwargs)
        problems += _device_problems(self.device)
        problems += _run_name_problems(self.run_name)
        try:
            parse_report_to(self.report_to)
        except ValueError as err:
            problems.append(f"--report-to {self.report_to}: {err}")
        if self.lora_r < 0:
            bad("lora_r", self.lora_r, "pass an integer >= 1 for rank-r adapters, or 0 to train the full weights")
        if self.lora_r and not self.lora_alpha > 0:
            bad("lora_alpha", self.lora_alpha, "pass a number > 0 (the adapters are scaled by alpha / r), e.g. 32")
        if self.lora_r and not self.lora_target_modules.strip(" ,"):
            bad("lora_target_modules", self.lora_target_modules, "pass 'all-linear' or names such as q_proj,v_proj")
        if self.resume and not self.run_name:
            problems.append("--resume needs --run-name (the run folder to continue)")
        if problems:
            raise ValueError("invalid REFUEL configuration: " + "; ".join(problems))


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def _env_problems(env_id: str, preset: str | None, env_kwargs: Any) -> list[str]:
    """The environment arguments, checked as the environment will read them (no model or data is loaded)."""
    from refuel_env import ENV_IDS, SYNTHETIC_ENV_IDS
    from refuel_env.components import make_config
    from refuel_env.synthetic import make_synthetic_config

    if env_id not in ENV_IDS and env_id not in SYNTHETIC_ENV_IDS:
        return [f"--env-id {env_id}: pass one of {sorted(ENV_IDS) + sorted(SYNTHETIC_ENV_IDS)}"]
    if not isinstance(env_kwargs, dict):
        return [f"--env-kwargs {_shown(env_kwargs)}: pass a JSON object of environment arguments, "
                'e.g. \'{"max_turns": 3}\'']
    if env_id in SYNTHETIC_ENV_IDS:  # (the synthetic task has its own arguments and no presets)
        try:
            make_synthetic_config(**env_kwargs)
        except (TypeError, ValueError) as err:
            return [f"--env-kwargs {_shown(env_kwargs)}: {err}"]
        return []
    try:
        make_config(preset, **{k: v for k, v in env_kwargs.items() if k != "preset"})
    except (TypeError, ValueError) as err:
        flag = "--env-preset" if preset and "preset" in str(err) and "argument" not in str(err) else "--env-kwargs"
        value = preset if flag == "--env-preset" else _shown(env_kwargs)
        return [f"{flag} {value}: {err}"]
    return []


def _device_problems(device: str | None) -> list[str]:
    if device is None:
        return []
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as err:
        return [f"--device {device}: not a device ({err}); pass cpu, cuda or cuda:N, or leave it out"]
    if kind == "cuda" and not torch.cuda.is_available():
        return [f"--device {device}: this machine has no CUDA device (torch.cuda.is_available() is False); "
                "pass --device cpu, or leave --device out"]
    return []


def _run_name_problems(run_name: str | None) -> list[str]:
    """A run name is one folder name inside --output-dir: never a path that leads out of it."""
    if run_name is None:
        return []
    if (not run_name.strip() or run_name in (".", "..") or "/" in run_name or "\\" in run_name
            or (os.sep in run_name) or (os.altsep and os.altsep in run_name) or "\0" in run_name):
        return [f"--run-name {run_name!r}: a run name is one folder name inside --output-dir (no path separator, "
                "not '.' or '..'); pass e.g. --run-name my-run, and --output-dir for where it goes"]
    return []
