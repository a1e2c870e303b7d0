"""REFUEL (algorithm 1): collect with pi_t, regress the relative future, repeat.

    python scripts/train_agent.py --agent refuel                      # embedded default, CPU
    python scripts/train_agent.py --agent refuel --preset paper-setting-one

Each iteration t: (1) collect one tuple (s_h, y_h, y'_h, r(s_{H+1}), r(s'_{H+1})) per prompt
with pi_t through the environment (``collection.py``); (2) compute log pi_t of both responses
once, before any update, with exactly the function used in training; (3) minimise eq. 1,

    ( (1/eta) * [ (log pi(y|s) - log pi_t(y|s)) - (log pi(y'|s) - log pi_t(y'|s)) ] - (r - r') )^2,

in mini-batches for ``epochs`` passes. The policy generator wraps the very module being
trained, so collection at t + 1 sees the new weights with no save and reload.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refuel_agents import checkpoint as ckpt
from refuel_agents import distributed as dist
from refuel_agents.collection import (
    PENALTY_TURNS,
    CollectionStats,
    Penalties,
    collect_refuel_tuples,
    play_dialogues,
)
from refuel_agents.engine import LR_SCHEDULES, OptimConfig, TrainEngine
from refuel_agents.logprobs import (
    EncodedResponse,
    SequenceTooLongError,
    batched_logprobs,
    collate,
    encode_response,
    encode_sampled_response,
    sequence_logprobs,
    sequence_logprobs_and_entropy,
)
from refuel_agents.losses import LOSS_SCALES, regression_sign_agreement
from refuel_agents.tracking import MetricsLogger, plot_run
from refuel_env import embedded
from refuel_env.generation import (
    SamplingParams,
    TextGenerator,
    TransformersGenerator,
    default_device,
    load_causal_lm,
)


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
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    last_k_layers: int | None = None
    """Train only the last k decoder layers (plus final norm and lm_head); None = all."""
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
    eval_prompts: int = 2
    """Held-out prompts played before training and after each iteration (0 = no evaluation)."""
    reference_kl: bool = True
    """Keep a frozen copy of the initial policy to log KL(pi || pi_0) and use it for the env's KL penalty."""
    save_every: int = 0
    """Also checkpoint every N optimizer steps (0 = only after each iteration)."""
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

    def validate(self) -> None:
        problems = []
        if self.iterations < 0:
            problems.append(f"iterations must be >= 1, or 0 for one pass over the split, got {self.iterations}")
        if self.loss_scale not in LOSS_SCALES:
            problems.append(f"loss_scale must be one of {list(LOSS_SCALES)}, got {self.loss_scale!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.schedule_scope not in ("run", "iteration"):
            problems.append(f"schedule_scope must be 'run' or 'iteration', got {self.schedule_scope!r}")
        if self.penalty_turns not in PENALTY_TURNS:
            problems.append(f"penalty_turns must be one of {list(PENALTY_TURNS)}, got {self.penalty_turns!r}")
        if self.logprob_temperature is not None and not self.logprob_temperature > 0:
            problems.append(f"logprob_temperature must be > 0 (or None for the sampling temperature), got {self.logprob_temperature}")
        for key, value in (self.max_new_tokens_by_h or {}).items():
            if not (str(key).isdigit() and int(key) >= 1 and isinstance(value, int) and value >= 1):
                problems.append(f"max_new_tokens_by_h needs entries H >= 1 -> tokens >= 1, got {key!r}: {value!r}")
        if self.eta <= 0:
            problems.append(f"eta must be > 0, got {self.eta}")
        if self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            problems.append(f"batch_size ({self.batch_size}) must be a positive multiple of micro_batch_size ({self.micro_batch_size})")
        if self.prompts_per_iteration < 0:
            problems.append("prompts_per_iteration must be >= 0")
        if self.policy_backend not in ("transformers", "vllm"):
            problems.append(f"policy_backend must be 'transformers' or 'vllm', got {self.policy_backend!r}")
        if self.resume and not self.run_name:
            problems.append("--resume needs --run-name (the run folder to continue)")
        if problems:
            raise ValueError("invalid REFUEL configuration: " + "; ".join(problems))


# ------------------------------------------------------------------------------ data


def encode_pair_response(tokenizer: Any, row: dict, suffix: str, max_seq_len: int | None) -> EncodedResponse:
    """s_h and one of the row's responses as token ids with its response mask.

    A sampled response is scored on exactly its sampled tokens (``response{suffix}_token_ids``:
    the end-of-turn token only when it was sampled; nothing re-tokenised). A response without
    them (a dataset reply, a backend that reports no tokens) is tokenised through the template,
    end-of-turn token included.
    """
    ids = row.get(f"response{suffix}_token_ids")
    if ids is not None:
        return encode_sampled_response(tokenizer, row["state"], ids, row[f"response{suffix}_finish_reason"],
                                       max_length=max_seq_len)
    return encode_response(tokenizer, row["state"], row[f"response{suffix}"], max_length=max_seq_len)


def encode_tuples(rows: list[dict], tokenizer: Any, max_seq_len: int) -> tuple[list[dict], int]:
    """Add token ids and turn-h response masks for y and y'; drop (and count) tuples too long."""
    kept, too_long = [], 0
    for row in rows:
        try:
            a = encode_pair_response(tokenizer, row, "", max_seq_len)
            b = encode_pair_response(tokenizer, row, "_prime", max_seq_len)
        except SequenceTooLongError:
            too_long += 1
            continue
        kept.append({**row, "input_ids": a.input_ids, "response_mask": a.response_mask,
                     "input_ids_prime": b.input_ids, "response_mask_prime": b.response_mask})
    return kept, too_long


def pair_batch(rows: list[dict], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One forward batch holding every y first and then every y' of the rows."""
    encoded = [EncodedResponse(r["input_ids"], r["response_mask"]) for r in rows]
    encoded += [EncodedResponse(r["input_ids_prime"], r["response_mask_prime"]) for r in rows]
    return {k: v.to(device) for k, v in collate(encoded, pad_id).items()}


def iteration_prompts(seed: int, num_items: int, iteration: int, per_iteration: int) -> list[int]:
    """The dataset indices of iteration ``iteration``'s prompts, without replacement.

    The prompts of successive iterations are consecutive stretches of one endless walk through
    the split: pass k is the permutation drawn from (seed, k). With ``per_iteration = 0`` (the
    whole split) iteration t is exactly pass t; with fewer, iterations walk on through the same
    pass, and no prompt comes back before every other prompt of the split has been used.
    """
    if num_items < 1:
        raise ValueError("the dataset split has no items to draw prompts from")
    per = per_iteration or num_items
    out: list[int] = []
    position = iteration * per
    while len(out) < per:
        walk, offset = divmod(position, num_items)
        take = min(per - len(out), num_items - offset)
        out.extend(np.random.default_rng([seed, walk]).permutation(num_items)[offset : offset + take].tolist())
        position += take
    return out


def reward_table(rows: list[dict], key: str, max_turns: int) -> dict[int, tuple[int, float]]:
    """Mean of ``key`` (a reward) grouped by the dialogue length H: {H: (count, mean)}."""
    table = {}
    for H in range(1, max_turns + 1):
        values = [r[key] for r in rows if r["H"] == H and r.get(key) is not None]
        table[H] = (len(values), float(np.mean(values)) if values else math.nan)
    return table


# ------------------------------------------------------------------------------ trainer


class RefuelTrainer:
    """Setup, iterations of collect + train, checkpoints. One readable loop: :meth:`train`."""

    agent = "refuel"

    @property
    def mode(self) -> str:
        """The data the iterations collect (``refuel_agents.modes``): REFUEL's own, algorithm 1."""
        return "refuel"

    @property
    def label(self) -> str:
        """Agent and data mode as one name, used in the default run name."""
        return self.agent if self.mode == "refuel" else f"{self.agent}-{self.mode}"

    def __init__(self, config: RefuelConfig, *, reward_model: Any = None):
        config.validate()
        self.config = config
        self.rank, self.world = dist.rank_and_world()
        if config.batch_size % (self.world * config.micro_batch_size):
            raise ValueError(
                f"batch_size={config.batch_size} is the global batch over {self.world} ranks: it must be a multiple of "
                f"world size x micro_batch_size = {self.world} x {config.micro_batch_size}; pass e.g. --batch-size "
                f"{self.world * config.micro_batch_size * max(1, round(config.batch_size / (self.world * config.micro_batch_size)))}")
        self.rank_batch_size = config.batch_size // self.world
        self.device = torch.device(config.device or default_device())
        torch.manual_seed(config.seed)
        self.env_kwargs = dict(config.env_kwargs)
        if config.env_preset:
            self.env_kwargs["preset"] = config.env_preset
        if reward_model is not None:
            self.env_kwargs["reward_model"] = reward_model
        self.run_dir = Path(config.output_dir) / (config.run_name or self._default_run_name())
        path = str(embedded.smollm2_path()) if config.policy_model == "embedded" else config.policy_model
        # A private copy: the process-wide model cache may hold the same checkpoint for the simulated
        # user (the embedded default uses SmolLM2 for both), which training must not change.
        model, tokenizer = load_causal_lm.__wrapped__(path, str(self.device), "auto")
        self.generator = TransformersGenerator(model, tokenizer, name=path)
        self.tokenizer = self.generator.tokenizer
        # Training reads right-padded batches; generation pads on the left: separate tokenizer copies.
        self.train_tokenizer = copy.copy(self.tokenizer)
        self.model = self.generator.model
        self.rollout_generator: TextGenerator = self.generator
        self.weight_pushes = 0  # vLLM backend: how often the trained weights were pushed into the engine
        self.pushed_group_numel = 0  # vLLM backend: the most parameter elements gathered at once by the last push
        self._pushed_step = 0  # the optimizer step whose weights the rollout generator holds
        self._policy_path = path
        self._asleep = False  # the vLLM policy engine sleeps while DeepSpeed trains (policy_vllm_sleep)
        if config.policy_vllm_sleep and not torch.cuda.is_available():
            raise ValueError("policy_vllm_sleep: vLLM's sleep mode exists on CUDA (and ROCm, XPU) only; this machine has "
                             "no CUDA device, and vLLM refuses it on CPU. Drop --policy-vllm-sleep here")
        if config.policy_backend == "vllm" and self.world == 1:
            self.rollout_generator = self._start_policy_engine()
        # pi_0, frozen; put in the trained model's precision once the engine exists (match_precision).
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False) if config.reference_kl else None
        self.pad_id = self.tokenizer.pad_token_id
        self.logprob_temperature = config.logprob_temperature or (config.temperature if config.temperature > 0 else 1.0)
        self.sampling = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature)
        self.engine: TrainEngine | None = None
        self._state: dict | None = None
        env_config = self._env_config()
        self.max_turns = env_config.max_turns
        self.collection_sampling: SamplingParams | dict[int, SamplingParams] = self.sampling
        if config.max_new_tokens_by_h:
            limits = {H: config.max_new_tokens for H in range(1, self.max_turns + 1)}
            limits.update({int(H): n for H, n in config.max_new_tokens_by_h.items()})
            self.collection_sampling = {H: replace(self.sampling, max_new_tokens=n) for H, n in limits.items()}
        # Collection applies Gamma itself, from how each covered generation ended (collection.py);
        # the environment's token-counting Gamma is off there. Evaluation keeps the environment's.
        self.penalties = Penalties(env_config.truncation_penalty, env_config.kl_coef, config.penalty_turns)
        self.collect_env_kwargs = dict(self.env_kwargs)
        if env_config.truncation_penalty is not None:
            self.collect_env_kwargs["truncation_penalty"] = None
        self._iterations: int | None = None
        self._collected: list[dict] | None = None  # every rank's tuples of the current iteration (metrics only)

    def _default_run_name(self) -> str:
        return f"{self.config.env_id}__{self.label}__{self.config.seed}__{int(time.time())}"

    # -------------------------------------------------------------- pieces

    @property
    def iterations(self) -> int:
        """T; ``iterations=0`` in the config means one pass over the split's prompts."""
        if self._iterations is None:
            per = self.config.prompts_per_iteration
            self._iterations = self.config.iterations or (math.ceil(self._dataset_size() / per) if per else 1)
        return self._iterations

    def prompt_indices(self, iteration: int) -> list[int]:
        """The dataset items iteration ``iteration`` collects from (:func:`iteration_prompts`)."""
        return iteration_prompts(self.config.seed, self._dataset_size(), iteration, self.config.prompts_per_iteration)

    def rank_prompts(self, indices: list[int], iteration: int) -> tuple[list[int], int]:
        """This rank's shard of an iteration's prompts and its collection seed.

        With W ranks the prompts are cut into W contiguous blocks. A rank's seed is the
        iteration's seed plus the position of its block, so the environment seeds each prompt's
        sub-environment (seed + i) as a one-rank run does; the collector's own draws (h, branch
        and sampling seeds) follow the rank's seed. One rank: all prompts, the iteration's seed.
        """
        if len(indices) < self.world:
            raise ValueError(f"iteration {iteration} has {len(indices)} prompts for {self.world} ranks: every rank needs at "
                             f"least one; raise --prompts-per-iteration to {self.world} or more")
        start, mine = dist.shard(indices, self.rank, self.world)
        return mine, _iteration_seed(self.config.seed, iteration) + start

    def collect(self, iteration: int) -> tuple[list[dict], CollectionStats]:
        """This rank's tuples of iteration ``iteration`` (its shard of :meth:`prompt_indices`)."""
        cfg = self.config
        self.model.eval()
        indices, seed = self.rank_prompts(self.prompt_indices(iteration), iteration)
        rows, stats = collect_refuel_tuples(
            env_id=cfg.env_id, env_kwargs=self.collect_env_kwargs, policy=self.rollout_policy(),
            sampling=self.collection_sampling, num_prompts=len(indices), prompt_indices=indices,
            seed=seed, kl_logprobs=self._kl_logprobs if self._env_has_kl() else None,
            progress=cfg.progress and self.rank == 0, penalties=self.penalties,
        )
        return rows, stats

    def _start_policy_engine(self) -> TextGenerator:
        """The vLLM policy engine of this rank. With several ranks each has its own replica, started
        through vLLM's external launcher (it joins the launcher's process group instead of spawning
        workers); unseeded requests draw from a seed of the rank's own."""
        from refuel_env.backends.vllm_backend import VLLMGenerator

        kwargs = dict(self.config.policy_vllm_kwargs)
        if self.world > 1:
            kwargs.setdefault("distributed_executor_backend", "external_launcher")
            kwargs.setdefault("seed", self.rank)
        if self.config.policy_vllm_sleep:
            kwargs["enable_sleep_mode"] = True
        return VLLMGenerator(self._policy_path, name=self._policy_path, **kwargs)

    def rollout_policy(self) -> TextGenerator:
        """The generator that plays the policy, holding the current weights.

        With the transformers backend it is the trained module itself. With vLLM the engine (woken
        up first if it sleeps) gets the trained weights when they changed since the last push:
        every rank pushes into its own engine, one group of whole decoder layers at a time, gathered
        from the ZeRO-3 shards and released before the next (:func:`distributed.push_weights`).
        """
        step = self._state["global_step"] if self._state else 0
        if self.rollout_generator is not self.generator:
            if self._asleep:
                self.rollout_generator.llm.wake_up()
                self._asleep = False
            if step != self._pushed_step:
                self.pushed_group_numel = dist.push_weights(self.engine, self.rollout_generator,
                                                            self.config.policy_vllm_push_bytes)
                self._pushed_step, self.weight_pushes = step, self.weight_pushes + 1
        return self.rollout_generator

    def _sleep_rollout(self) -> None:
        """Free the vLLM engine's GPU memory (weights offloaded, KV cache dropped) while DeepSpeed trains."""
        if self.config.policy_vllm_sleep and self.rollout_generator is not self.generator and not self._asleep:
            self.rollout_generator.llm.sleep(level=1)
            self._asleep = True

    def _env_config(self) -> Any:
        from refuel_env.components import make_config

        kwargs = {k: v for k, v in self.env_kwargs.items() if k != "preset"}
        return make_config(self.env_kwargs.get("preset"), **kwargs)

    def _env_has_kl(self) -> bool:
        return self._env_config().kl_coef > 0

    def _dataset_size(self) -> int:
        if not hasattr(self, "_num_items"):
            import gymnasium as gym

            env = gym.make(self.config.env_id, **self.env_kwargs)
            self._num_items = len(env.unwrapped.core.items)
            env.close()
        return self._num_items

    @torch.no_grad()
    def _kl_logprobs(self, states: list[list[dict]], responses: list[str]) -> tuple[list[float], list[float]]:
        if self.reference is None:
            raise ValueError("the environment has a KL penalty: enable reference_kl to keep the initial policy")
        rows = [{"input_ids": e.input_ids, "response_mask": e.response_mask} for e in
                (encode_response(self.train_tokenizer, s, r) for s, r in zip(states, responses))]
        kw = {"suffix": "", "batch_size": self.config.micro_batch_size * 2,
              "temperature": self.logprob_temperature, "device": self.device}
        return batched_logprobs(self.model, rows, self.pad_id, **kw), batched_logprobs(self.reference, rows, self.pad_id, **kw)

    def pair_logprobs(self, model: Any, batch_rows: list[dict], *, entropy: bool = False) -> Any:
        """log pi(y|s_h) and log pi(y'|s_h) of the rows under ``model``, as one [y..., y'...] batch.

        Training and the pi_t / pi_0 scores in :meth:`prepare` both go through here, with the
        same rows in the same micro-batch, so the padding and shapes are the same and the
        log-ratio is exactly 0 before the first update.
        """
        batch = pair_batch(batch_rows, self.pad_id, self.device)
        if entropy:
            return (*sequence_logprobs_and_entropy(model, batch, temperature=self.logprob_temperature), batch)
        return sequence_logprobs(model, batch, temperature=self.logprob_temperature)

    def prepare(self, rows: list[dict], iteration: int = 0) -> tuple[list[dict], int]:
        """Token ids, masks and the pi_t (and pi_0) log-probs, computed once before the updates.

        Each row is scored in the micro-batch where training first meets it (the iteration's
        mini-batch order is a function of the seed, the iteration and the number of rows).
        """
        rows, too_long = encode_tuples(rows, self.train_tokenizer, self.config.max_seq_len)
        self.score(rows, iteration, self._global_pairs(len(rows), iteration))
        return rows, too_long

    def score(self, rows: list[dict], iteration: int, global_pairs: int) -> None:
        """Add log pi_t (and log pi_0) of both responses to encoded rows, in training's micro-batches."""
        models = [("logp_t", self.model)] + ([("logp_ref", self.reference)] if self.reference is not None else [])
        micro = self.config.micro_batch_size
        order = self._minibatch_order(iteration, len(rows), self._steps_for(global_pairs)) if rows else []
        batches = [order[i : i + micro] for i in range(0, len(order), micro)]
        batches += [list(range(i, min(i + micro, len(rows)))) for i in range(0, len(rows), micro)]  # never-trained rows
        done: set[int] = set()
        was_training = self.model.training
        self.model.train()  # as in training (dropout-free models: the mode changes nothing else)
        with torch.no_grad():
            for members in batches:
                if done.issuperset(members):
                    continue
                for key, model in models:
                    logp = self.pair_logprobs(model, [rows[i] for i in members]).float().cpu().tolist()
                    for j, i in enumerate(members):
                        if i not in done:
                            rows[i][key], rows[i][f"{key}_prime"] = logp[j], logp[len(members) + j]
                done.update(members)
        self.model.train(was_training)

    def _global_pairs(self, pairs: int, iteration: int) -> int:
        """The pairs kept by all ranks together (each rank trains on its own). A rank without a pair
        while others have some could not take part in the updates: that is an error on every rank."""
        total = int(dist.all_sum(pairs, self._collective_device))
        if total and not dist.all_min(pairs, self._collective_device):
            raise RuntimeError(
                f"iteration {iteration}: a rank kept no pair while the {self.world} ranks kept {total} in all, so it "
                "cannot take part in the updates; collect more prompts per iteration (--prompts-per-iteration) or run "
                "on fewer ranks")
        return total

    @property
    def _collective_device(self) -> torch.device:
        return self.engine.device if self.engine is not None else self.device

    def evaluate(self) -> list[dict]:
        """Play ``eval_prompts`` held-out prompts at every H in 1..max_turns (the same prompts for each H)."""
        cfg = self.config
        if cfg.eval_prompts <= 0:
            return []
        self.model.eval()
        horizons = [H for H in range(1, self.max_turns + 1) for _ in range(cfg.eval_prompts)]
        prompts = list(range(cfg.eval_prompts)) * self.max_turns
        start, end = dist.shard_bounds(len(horizons), self.rank, self.world)  # each rank plays its block
        policy = self.rollout_policy()
        rows: list[dict] = []
        with dist.full_weights(self.engine, enabled=self.rollout_generator is self.generator):
            if end > start:
                rows = play_dialogues(
                    env_id=cfg.env_id, env_kwargs={**self.env_kwargs, "split": "test"}, policy=policy,
                    sampling=self.collection_sampling, num_dialogues=end - start, seed=cfg.seed + 10_000 + start,
                    horizon=horizons[start:end], prompt_indices=prompts[start:end],
                )
        return [row for part in dist.all_gather_objects(rows) for row in part]

    def train_step(self, batch_rows: list[dict]) -> dict[str, float]:
        """One micro-batch: forward y and y' together, eq. 1, backward."""
        n = len(batch_rows)
        logp, entropy, batch = self.pair_logprobs(self.engine.model, batch_rows, entropy=True)
        col = lambda key: torch.tensor([r[key] for r in batch_rows], dtype=torch.float32, device=self.device)  # noqa: E731
        loss = LOSS_SCALES[self.config.loss_scale](
            logp[:n], col("logp_t"), logp[n:], col("logp_t_prime"), col("reward"), col("reward_prime"), self.config.eta)
        self.engine.backward(loss)
        out = {
            "losses/loss": loss.item(),
            "charts/sign_agreement": float(regression_sign_agreement(
                logp[:n].detach(), col("logp_t"), logp[n:].detach(), col("logp_t_prime"), col("reward"), col("reward_prime"))),
            "charts/entropy": entropy.mean().item(),
            "charts/reward_mean": float(np.mean([r["reward"] for r in batch_rows] + [r["reward_prime"] for r in batch_rows])),
            "tokens": int(batch["attention_mask"].sum()),
        }
        if self.reference is not None:
            ref = torch.cat([col("logp_ref"), col("logp_ref_prime")])
            out["charts/logratio_to_init"] = (logp.detach() - ref).mean().item()
        return out

    # -------------------------------------------------------------- the loop

    def setup(self) -> dict:
        """Create the run folder or load its latest checkpoint; returns the loop state."""
        if self._state is None:
            self._state = self._resume_or_start()
        return self._state

    def train(self) -> Path:
        cfg = self.config
        state = self.setup()
        logger = MetricsLogger(self.run_dir, enabled=self.engine.is_main, resume_step=state["global_step"] if cfg.resume else None)
        summary = state.setdefault("summary", [])
        if not summary and cfg.eval_prompts > 0:
            summary.append({"iteration": 0, "eval": reward_table(self.evaluate(), "reward", self.max_turns)})
        for t in range(state["iteration"], self.iterations):
            self._collected = None
            rows = self._iteration_data(t, logger, state)
            self._sleep_rollout()
            steps_per_iter = self._steps_for(self._global_pairs(len(rows), t))
            order = self._minibatch_order(t, len(rows), steps_per_iter) if rows else []
            if steps_per_iter:
                self._plan_schedule(t, steps_per_iter, state)
            self.engine.model.train()  # collection and evaluation left it in eval mode
            for step_in_iter in range(state["step_in_iteration"], steps_per_iter):
                start_time = time.perf_counter()
                per = self.rank_batch_size
                idx = order[step_in_iter * per : (step_in_iter + 1) * per]
                metrics: list[dict[str, float]] = []
                info: dict[str, float] = {}
                for m in range(0, len(idx), cfg.micro_batch_size):
                    metrics.append(self.train_step([rows[i] for i in idx[m : m + cfg.micro_batch_size]]))
                    info = self.engine.step() or info  # updates at the accumulation boundary
                state["global_step"] += 1
                state["step_in_iteration"] = step_in_iter + 1
                tokens = sum(x.pop("tokens") for x in metrics)
                logged = {k: float(np.mean([x[k] for x in metrics])) for k in metrics[0]}
                logged.update({"charts/lr": info.get("lr", math.nan), "charts/grad_norm": info.get("grad_norm", math.nan),
                               "charts/tokens_per_s": tokens / (time.perf_counter() - start_time), "charts/iteration": t})
                logger.log(state["global_step"], logged)
                if cfg.save_every and state["global_step"] % cfg.save_every == 0 and state["step_in_iteration"] < steps_per_iter:
                    self._checkpoint(state)
            state["iteration"], state["step_in_iteration"] = t + 1, 0
            summary.append({"iteration": t + 1, "collected": reward_table(self._collected or rows, "reward", self.max_turns),
                            "eval": reward_table(self.evaluate(), "reward", self.max_turns) if cfg.eval_prompts else {}})
            self._checkpoint(state)
            if self.engine.is_main:
                print(format_summary(summary, self.max_turns), flush=True)
        logger.close()
        return self._finish(summary)

    def _steps_for(self, pairs: int) -> int:
        """Optimizer steps of an iteration that kept ``pairs`` pairs on all ranks together: ``epochs``
        passes over them (at least one step when there is a pair), so every method trains the same
        number of epochs on whatever it kept, and every rank makes the same number of steps."""
        return max(1, self.config.epochs * pairs // self.config.batch_size) if pairs else 0

    def _planned_steps(self) -> int:
        """The schedule's length before any data exists: every configured prompt kept."""
        return self._steps_for(self.config.prompts_per_iteration or self._dataset_size())

    def _plan_schedule(self, iteration: int, steps: int, state: dict) -> None:
        """Point the learning-rate schedule at this iteration's steps (``schedule_scope``).

        'run': iteration t is the t-th of T equal parts of one warm-up + decay. 'iteration': the
        iteration has its own warm-up + decay, and AdamW's state restarts at its first step.
        """
        first = state["global_step"] - state["step_in_iteration"]
        if self.config.schedule_scope == "iteration":
            self.engine.set_schedule(first, 0, steps)
            if state["step_in_iteration"] == 0:
                self.engine.reset_optimizer_state()
        else:
            self.engine.set_schedule(first, iteration * steps, self.iterations * steps)

    def _minibatch_order(self, iteration: int, n: int, steps: int | None = None) -> list[int]:
        """This rank's row order for the iteration's ``steps`` updates (default: as one rank with ``n``
        rows would make), ``batch_size / W`` rows per update."""
        steps = self._steps_for(n) if steps is None else steps
        rng = np.random.default_rng([self.config.seed, iteration])
        order: list[int] = []
        while len(order) < steps * self.rank_batch_size:
            order.extend(rng.permutation(n).tolist())  # epochs; a short last pass wraps around
        return order

    def _iteration_data(self, t: int, logger: MetricsLogger, state: dict) -> list[dict]:
        """This rank's tuples of iteration t: from disk when a resumed run collected them already.

        With W ranks each rank collects, scores and stores its own shard
        (``iteration_<t>/tuples/rank_<r>-of-<W>``); a shard missing on any rank (a kill between
        two ranks' writes) makes every rank collect its shard again, before any update used them.
        """
        folder = self.run_dir / f"iteration_{t:03d}"
        mine = dist.shard_dir(folder / "tuples", self.rank, self.world)
        if not dist.all_max(0 if mine.exists() else 1, self._collective_device):
            rows = dist.load_tuples(mine).to_list()
            self._collected = [r for part in dist.all_gather_objects([_light(r) for r in rows]) for r in part]
            return rows
        self.rollout_policy()  # (vLLM: push the weights before the ZeRO-3 gather below)
        with dist.full_weights(self.engine):
            rows, stats = self.collect(t)
            rows, too_long = self.prepare(rows, t)
        rows = [{**r, "rank": self.rank} for r in rows]
        parts = dist.all_gather_objects((stats, too_long, [_light(r) for r in rows], sorted({k for r in rows for k in r})))
        stats, too_long = dist.merge_stats([p[0] for p in parts]), sum(p[1] for p in parts)
        light = [r for p in parts for r in p[2]]
        if not light and not getattr(stats, "dropped_ties", 0):  # (DPO: an iteration of ties just makes no update)
            raise RuntimeError(
                f"iteration {t}: no usable tuple ({stats.dropped_truncated} truncated, {too_long} longer than "
                f"max_seq_len={self.config.max_seq_len}); raise the limits or shorten the responses"
            )
        if rows:  # (an empty Dataset does not load back; an iteration without pairs is simply collected again)
            import datasets

            # every rank's keys (from_list reads the first row's), so that the shards concatenate
            keys = list(dict.fromkeys(k for p in parts for k in p[3]))
            with ckpt.atomic_dir(mine) as tmp:
                datasets.Dataset.from_list([_storable({k: r.get(k) for k in keys}) for r in rows]).save_to_disk(str(tmp))
        if self.engine.is_main:
            record = {**stats.as_dict(), "too_long": too_long}
            if self.world > 1:
                record["ranks"] = [{**p[0].as_dict(), "too_long": p[1]} for p in parts]
            ckpt.write_json_atomic(folder / "collection.json", record)
        by_h = {h: float(np.mean([r["reward"] - r["reward_prime"] for r in light if r["h"] == h] or [math.nan]))
                for h in range(1, self.max_turns + 1)}
        drop_rate = stats.as_dict().get("drop_rate_by_h", {})
        kl = [x for r in light for x in r["kl"]]
        logger.log(state["global_step"], {"collect/tuples": len(light), "collect/dropped": stats.dropped_truncated + too_long,
                                          "collect/reward_mean": float(np.mean([r["reward"] for r in light] or [math.nan])),
                                          "collect/user_parse_failures": stats.user_parse_failures,
                                          # Monte-Carlo KL(pi_t || pi_0) per response: y ~ pi_t, scored at the sampling temperature
                                          "collect/kl_pi_t_pi_0": float(np.mean(kl)) if kl else math.nan,
                                          **{f"collect/reward_gap_h{h}": v for h, v in by_h.items()},
                                          **{f"collect/drop_rate_h{h}": float(v) for h, v in drop_rate.items()}})
        self._collected = light  # the summary's "collected" table covers every rank's tuples
        return dist.load_tuples(mine).to_list() if rows else rows

    def _resume_or_start(self) -> dict:
        cfg = self.config
        total_steps = self.iterations * self._planned_steps()
        optim = OptimConfig(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                            warmup_ratio=cfg.warmup_ratio, schedule=cfg.lr_schedule, max_grad_norm=cfg.max_grad_norm,
                            grad_accum_steps=self.rank_batch_size // cfg.micro_batch_size)
        if cfg.resume:
            latest = ckpt.latest_checkpoint(self.run_dir)
            if latest is None:
                raise FileNotFoundError(f"--resume: {self.run_dir} has no complete checkpoint to continue from")
            _load_weights(self.model, latest / "model")
        self.engine = TrainEngine(self.model, optim, total_steps, deepspeed_config=cfg.deepspeed,
                                  gradient_checkpointing=cfg.gradient_checkpointing, last_k_layers=cfg.last_k_layers,
                                  micro_batch_size=2 * cfg.micro_batch_size, device=None if cfg.deepspeed else self.device)
        if self.reference is not None:
            self.reference = self.engine.match_precision(self.reference)
        if cfg.policy_backend == "vllm" and self.world > 1:
            # after DeepSpeed has set up the process group that the external launcher joins
            self.rollout_generator = self._start_policy_engine()
        if cfg.resume:
            if self.engine.is_main:
                ckpt.remove_partial_writes(self.run_dir)
            self.engine.barrier()
            self.engine.load(latest / "engine")
            state = ckpt.load_state(latest)
            ckpt.set_rng_states(state.pop("rng"))
            print(f"resuming {self.run_dir} at iteration {state['iteration']}, step {state['global_step']}", flush=True)
            return state
        taken = self.run_dir.exists() and any(self.run_dir.iterdir())
        self.engine.barrier()  # every rank has looked before the main rank writes
        if taken:
            raise FileExistsError(f"{self.run_dir} exists and is not empty; pass --resume to continue it or pick another --run-name")
        if self.engine.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.write_json_atomic(self.run_dir / "config.json", {"agent": self.agent, "mode": self.mode, **asdict(cfg)})
        self.engine.barrier()
        return {"iteration": 0, "step_in_iteration": 0, "global_step": 0}

    def _checkpoint(self, state: dict) -> None:
        name = f"step_{state['global_step']:07d}"
        ckpt.save_checkpoint(self.run_dir, name, model=self.model, engine=self.engine, state=state)

    def _finish(self, summary: list[dict]) -> Path:
        final = self.run_dir / "final_model"
        weights = self.engine.unwrapped_model_state()  # every rank: ZeRO-3 gathers the shards
        if self.engine.is_main:
            with ckpt.atomic_dir(final) as tmp:
                self.model.save_pretrained(tmp, state_dict=weights)
                self.tokenizer.save_pretrained(tmp)
            (self.run_dir / "summary.md").write_text(format_summary(summary, self.max_turns))
            plot = plot_run(self.run_dir / "metrics.jsonl", self.run_dir / "reward_loss.png",
                            keys=("losses/loss", "charts/reward_mean", "charts/logratio_to_init"))
            print(f"final model: {final}\nmetrics: {self.run_dir / 'metrics.jsonl'} (TensorBoard: {self.run_dir / 'tensorboard'})"
                  + (f"\nplot: {plot}" if plot else ""), flush=True)
        return final


def _iteration_seed(seed: int, iteration: int) -> int:
    """The collection seed of an iteration. Sub-environment i is seeded with this + i, so
    iterations' seeds must be far apart, or consecutive iterations would draw the same prompts."""
    return int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0] % 2**31)


def _light(row: dict) -> dict:
    """What the iteration's metrics read from a row: gathered from every rank (no token ids or texts)."""
    return {"h": row["h"], "H": row["H"], "reward": row["reward"], "reward_prime": row["reward_prime"],
            "kl": [row[f"logp_t{s}"] - row[f"logp_ref{s}"] for s in ("", "_prime") if f"logp_ref{s}" in row]}


def _storable(row: dict) -> dict:
    """A row as ``datasets`` stores it: nested reward parts as JSON text (their keys vary)."""
    return {k: json.dumps(v) if k.startswith("reward_parts") else v for k, v in row.items()}


def _load_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Load a checkpoint's safetensors weights in place; only tied weights may be absent."""
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no safetensors weights; the checkpoint is incomplete")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"checkpoint {model_dir} does not match the policy model: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; resume with the same --policy-model"
        )


def format_summary(summary: list[dict], max_turns: int) -> str:
    """A Markdown table: mean reward by dialogue length H, before training and after each iteration."""
    header = "| H | " + " | ".join(
        f"iter {s['iteration']} eval" + ("" if s["iteration"] == 0 else f" / iter {s['iteration']} collected")
        for s in summary) + " |"
    lines = [header, "|---" * (len(summary) + 1) + "|"]
    for H in range(1, max_turns + 1):
        cells = []
        for s in summary:
            ev = s.get("eval", {}).get(H) or s.get("eval", {}).get(str(H))
            cell = _cell(ev)
            if s["iteration"] > 0:
                co = s.get("collected", {}).get(H) or s.get("collected", {}).get(str(H))
                cell += " / " + _cell(co)
            cells.append(cell)
        lines.append(f"| {H} | " + " | ".join(cells) + " |")
    return "Mean reward by dialogue length H (eval: held-out prompts at fixed H; collected: tuples of that H)\n" + "\n".join(lines)


def _cell(entry: Any) -> str:
    if not entry or not entry[0]:
        return "-"
    n, mean = entry
    return f"{mean:+.3f} (n={n})"
