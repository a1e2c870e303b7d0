"""Whole dialogues as GRPO completions: a ``rollout_func`` for TRL's ``GRPOTrainer``.

GRPO scores completions of a prompt. Here a prompt is a dialogue state (s_1 of a dataset item,
a snapshot's s_h, or any transcript ending with a user turn) and its completion is the rest of
the dialogue, as the tokens the policy reads and writes::

    prompt_ids      template(s_h, add_generation_prompt=True)
    completion_ids  y_h | end of y_h's turn, x_{h+1}, generation prompt | y_{h+1} | ... | y_H
    env_mask        1   | 0 ...                                          | 1       | ... | 1

The responses y are the tokens the policy sampled; the stretches between them are the chat
template's own tokens for the turn's end, the simulated user's message and the next generation
prompt, taken from the template's rendering of the dialogue so far. ``prompt_ids +
completion_ids`` are therefore the template's ids of the whole dialogue, up to the last
response's end-of-turn token, whenever the sampled tokens are the tokenizer's own encoding of the
responses; the policy generates each turn from exactly these ids, and ``env_mask = 0`` keeps the
user's tokens out of the loss. The environment's trajectory reward r(s_{H+1}) reaches the reward
functions as ``trajectory_reward``; :func:`env_reward` reads it.

TRL is imported only when a trainer calls the rollout; this module never needs it at import.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from refuel_env.snapshot import Snapshot

#: The fields a rollout returns besides TRL's ``prompt_ids``, ``completion_ids`` and ``logprobs``.
EXTRA_FIELDS = ("env_mask", "trajectory_reward", "truncation_reason", "dialogue", "env_seed", "env_horizon")


def env_reward(completions: list, trajectory_reward: list[float | None], **kwargs: Any) -> list[float | None]:
    """The environment's trajectory reward of each dialogue, for ``GRPOTrainer(reward_funcs=...)``.

    A dialogue the environment truncated (it outgrew a model's context) has no reward: None, which
    GRPO leaves out of its group's baseline and gives no advantage.
    """
    return list(trajectory_reward)


def _key(messages: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, str], ...]:
    return tuple((str(m["role"]), str(m["content"])) for m in messages)


class DialogueRollout:
    """Plays whole dialogues of ``env_id`` with the trainer's policy, as GRPO's ``rollout_func``.

    ``env_kwargs`` are the id's keyword arguments (``gym.make_vec(env_id, **env_kwargs)``);
    ``horizon`` fixes H for dialogues started from an item or a prefix (None: the environment draws
    it); ``seed`` seeds the environment resets (dialogue i of a call gets its own seed, returned as
    ``env_seed``); ``max_new_tokens`` caps each response (None: the trainer's
    ``max_completion_length``, which then caps each response, not the whole completion);
    ``chat_template_kwargs`` are added to the trainer's.

    A prompt that :meth:`dataset` made starts the dialogue it stands for (an item, a snapshot or a
    prefix); any other prompt, a conversation ending with a user turn, starts from itself
    (``reset(options={"prefix": prompt})``). Every prompt is played as its own dialogue with its
    own seed, so GRPO's ``num_generations`` copies of a prompt are independent dialogues from the
    same state; from a snapshot, independent branches.
    """

    def __init__(
        self,
        env_id: str,
        *,
        env_kwargs: Mapping[str, Any] | None = None,
        horizon: int | None = None,
        seed: int = 0,
        max_new_tokens: int | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ):
        if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1):
            raise ValueError(f"horizon must be an int >= 1 or None (the environment draws H), got {horizon!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be an int >= 1 or None, got {max_new_tokens!r}")
        self.env_id = env_id
        self.env_kwargs = dict(env_kwargs or {})
        self.horizon = horizon
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._envs: dict[int, gym.vector.VectorEnv] = {}
        self._starts: dict[tuple, list[dict[str, Any]]] = {}
        self._calls = 0
        core = self._env(1).unwrapped.core
        if core.reward.kl_coef > 0:
            raise ValueError(
                f"{env_id} with kl_coef={core.reward.kl_coef} needs each response's log-probs under the policy and "
                "the reference before every step; under GRPO pass kl_coef=0 in env_kwargs and set "
                "GRPOConfig(beta=...) for the KL penalty instead"
            )

    # ------------------------------------------------------------------ prompts

    def dataset(
        self,
        indices: Sequence[int] | None = None,
        *,
        snapshots: Sequence[Snapshot] | None = None,
        prefixes: Sequence[Sequence[Mapping[str, str]]] | None = None,
    ):
        """A ``datasets.Dataset`` with a ``prompt`` column, for ``GRPOTrainer(train_dataset=...)``.

        One row per dataset item in ``indices`` (default, unless ``snapshots`` or ``prefixes`` are
        given: every item of the id's split that a dialogue of ``horizon`` turns fits, which with a
        pre-sampled user means the items with at least that many questions), per snapshot (its
        dialogues branch from it) and per
        prefix. The prompt is the state's transcript; the rollout resets to the state it came from.
        Prompts that several rows share (two items with the same first question) start one of those
        states at random.
        """
        import datasets

        probe = self._env(1)
        if indices is None and snapshots is None and prefixes is None:
            core = probe.unwrapped.core
            indices = [i for i, item in enumerate(core.items) if core.max_horizon(item) >= (self.horizon or 1)]
            if not indices:
                raise ValueError(f"no item of {self.env_id} has room for horizon={self.horizon} turns; pass a "
                                 "smaller horizon (or None)")
        rows: list[dict[str, Any]] = [{"index": index} for index in indices or ()]
        for snap in snapshots or ():
            if not isinstance(snap, Snapshot):
                raise TypeError(f"snapshots must hold Snapshot objects (env.snapshot(), info['snapshot']), got "
                                f"{type(snap).__name__}")
            rows.append({"snapshot": snap})
        rows += [{"prefix": [dict(m) for m in prefix]} for prefix in prefixes or ()]
        prompts = []
        for options in rows:
            # The environment checks every start (index range, horizon, snapshot configuration, prefix form).
            checked = dict(options) if "snapshot" in options or self.horizon is None else {**options, "horizon": self.horizon}
            obs, _ = probe.reset(seed=0, options={k: [v] for k, v in checked.items()})
            prompt = [{"role": m["role"], "content": m["content"]} for m in obs[0]]
            starts = self._starts.setdefault(_key(prompt), [])
            if not any(_same_start(options, s) for s in starts):
                starts.append(options)
            prompts.append(prompt)
        return datasets.Dataset.from_dict({"prompt": prompts})

    def _start_options(self, prompt: Any, rng: np.random.Generator) -> dict[str, Any]:
        if not isinstance(prompt, list) or not all(isinstance(m, Mapping) and "role" in m and "content" in m
                                                   for m in prompt):
            raise TypeError(
                "each prompt must be a conversation (a list of {'role', 'content'} messages ending with the user's "
                f"turn), as DialogueRollout.dataset() makes them; got {prompt!r:.120}"
            )
        starts = self._starts.get(_key(prompt))
        options = dict(starts[int(rng.integers(len(starts)))]) if starts else {"prefix": [dict(m) for m in prompt]}
        if self.horizon is not None and "snapshot" not in options:
            options["horizon"] = self.horizon
        return options

    # ------------------------------------------------------------------ TRL entry point

    def __call__(self, prompts: list, trainer: Any) -> dict[str, list]:
        """GRPO's ``rollout_func(prompts, trainer)``: one whole dialogue per prompt."""
        if getattr(trainer, "use_vllm", False):
            raise ValueError(
                "DialogueRollout generates with the trainer's transformers model; it does not drive TRL's vLLM "
                "engine. Set GRPOConfig(use_vllm=False)"
            )
        from trl.models import unwrap_model_for_generation

        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        config = copy.deepcopy(trainer.generation_config)
        if self.max_new_tokens is not None:
            config.max_new_tokens = self.max_new_tokens
        dist = getattr(trainer, "_dist", None)
        full_params = dist.summon_full_params(trainer.model_wrapped, recurse=False) if dist else contextlib.nullcontext()
        with (
            unwrap_model_for_generation(
                trainer.model_wrapped,
                trainer.accelerator,
                gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                generation_kwargs=getattr(trainer, "generation_kwargs", None),
                gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
            ) as model,
            full_params,
        ):
            return self.play(
                prompts,
                model,
                tokenizer,
                generation_config=config,
                eos_token_ids=trainer.eos_token_ids,
                chat_template_kwargs=getattr(trainer, "chat_template_kwargs", None),
                process_index=trainer.accelerator.process_index,
            )

    # ------------------------------------------------------------------ the dialogues

    def play(
        self,
        prompts: list,
        model: Any,
        tokenizer: Any,
        *,
        generation_config: Any = None,
        eos_token_ids: Sequence[int] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        seeds: Sequence[int] | None = None,
        process_index: int = 0,
    ) -> dict[str, list]:
        """Play one dialogue per prompt with a transformers causal LM; returns the rollout's fields.

        ``prompt_ids``, ``completion_ids``, ``logprobs`` (None: the trainer computes them) and
        :data:`EXTRA_FIELDS`: ``env_mask``, ``trajectory_reward`` (None when truncated),
        ``truncation_reason`` (None unless truncated), ``dialogue`` (the final transcript),
        ``env_seed`` and ``env_horizon``. ``gym.make(env_id, **env_kwargs).reset(seed=env_seed[i],
        options=...)`` stepped with dialogue i's responses gives dialogue i again. ``seeds`` fixes the
        reset seeds (default: drawn from ``seed``, the process index and the call count).
        ``generation_config`` defaults to the model's with ``max_new_tokens`` (or 256).
        """
        n = len(prompts)
        if n == 0:
            return {"prompt_ids": [], "completion_ids": [], "logprobs": None, **{k: [] for k in EXTRA_FIELDS}}
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, process_index, self._calls]))
        self._calls += 1
        if seeds is None:
            seeds = rng.integers(0, 2**31 - 1, n).tolist()
        elif len(seeds) != n:
            raise ValueError(f"seeds: got {len(seeds)} seeds for {n} prompts; pass one per prompt or None")
        options = [self._start_options(p, rng) for p in prompts]
        eos = self._eos_ids(tokenizer, generation_config, eos_token_ids)
        config = self._generation_config(model, generation_config, eos)
        kwargs = {**self.chat_template_kwargs, **(chat_template_kwargs or {})}

        keys = sorted({k for o in options for k in o})
        obs, info = self._env(n).reset(seed=[int(s) for s in seeds],
                                       options={k: [o.get(k) for o in options] for k in keys})
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [[] for _ in range(n)], "env_mask": [[] for _ in range(n)],
                                "trajectory_reward": [None] * n, "truncation_reason": [None] * n,
                                "dialogue": [None] * n, "env_seed": [int(s) for s in seeds],
                                "env_horizon": [int(h) for h in info["horizon"]]}
        for i, prompt in enumerate(prompts):
            if _key(obs[i]) != _key(prompt):
                raise ValueError(f"prompt {i}: the environment started from a different state than the prompt "
                                 f"({_key(obs[i])!r:.120} against {_key(prompt)!r:.120})")
            out["prompt_ids"].append(_encode(tokenizer, obs[i], True, kwargs))
        snapshots = list(info["snapshot"])
        active = list(range(n))
        while active:
            contexts = [out["prompt_ids"][i] + out["completion_ids"][i] for i in active]
            sampled = _sample(model, contexts, config, tokenizer.pad_token_id, eos)
            texts = [tokenizer.decode(ids[:-1] if ids and ids[-1] in eos else ids, skip_special_tokens=True)
                     for ids in sampled]
            env = self._env(len(active))
            env.reset(options={"snapshot": [snapshots[i] for i in active]})
            obs, reward, terminated, truncated, info = env.step(texts)
            going_on = []
            for k, i in enumerate(active):
                out["completion_ids"][i] += sampled[k]
                out["env_mask"][i] += [1] * len(sampled[k])
                if terminated[k] or truncated[k]:
                    out["dialogue"][i] = [{"role": m["role"], "content": m["content"]} for m in obs[k]]
                    if truncated[k]:
                        out["truncation_reason"][i] = str(info["truncation_reason"][k])
                    else:
                        out["trajectory_reward"][i] = float(reward[k])
                    continue
                segment = _user_segment(tokenizer, obs[k], kwargs, eos, ended=bool(sampled[k]) and sampled[k][-1] in eos)
                out["completion_ids"][i] += segment
                out["env_mask"][i] += [0] * len(segment)
                snapshots[i] = info["snapshot"][k]
                going_on.append(i)
            active = going_on
        return {"logprobs": None, **out}

    def _env(self, n: int) -> gym.vector.VectorEnv:
        if n not in self._envs:
            self._envs[n] = gym.make_vec(self.env_id, num_envs=n, vectorization_mode="vector_entry_point",
                                         **self.env_kwargs)
        return self._envs[n]

    def _eos_ids(self, tokenizer: Any, config: Any, eos_token_ids: Sequence[int] | None) -> set[int]:
        ids = set(eos_token_ids or ())
        if not ids and config is not None and config.eos_token_id is not None:
            ids = {config.eos_token_id} if isinstance(config.eos_token_id, int) else set(config.eos_token_id)
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        if not ids:
            raise ValueError("the tokenizer has no eos token and no eos_token_ids were given; pass eos_token_ids, "
                             "the ids that end an assistant turn")
        return ids

    def _generation_config(self, model: Any, config: Any, eos: set[int]) -> Any:
        if config is None:
            config = copy.deepcopy(model.generation_config)
            config.max_new_tokens = self.max_new_tokens or 256
        elif self.max_new_tokens is not None:
            config = copy.deepcopy(config)
            config.max_new_tokens = self.max_new_tokens
        if config.eos_token_id is None:
            config = copy.deepcopy(config)
            config.eos_token_id = sorted(eos)
        return config

    def close(self) -> None:
        """Close the environments the rollout made."""
        for env in self._envs.values():
            env.close()
        self._envs.clear()


def _same_start(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    return all(a[k] is b[k] or (not isinstance(a[k], Snapshot) and a[k] == b[k]) for k in a)


def _encode(tokenizer: Any, messages: Sequence[Mapping[str, str]], generation_prompt: bool,
            kwargs: Mapping[str, Any]) -> list[int]:
    """The chat template's ids of ``messages`` (the template writes any special tokens itself)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt,
                                         **kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _user_segment(tokenizer: Any, messages: Sequence[Mapping[str, str]], kwargs: Mapping[str, Any],
                  eos: set[int], *, ended: bool) -> list[int]:
    """The template's ids from the end of the response ``messages[-2]`` to the next generation prompt.

    They are cut from the template's rendering of the whole transcript at the response's end-of-turn
    token, so they are the ids the template gives in context. ``ended``: the sampled response ends
    with that token; otherwise (cut by the token limit) it comes first in the segment.
    """
    closed = _encode(tokenizer, messages[:-1], False, kwargs)
    full = _encode(tokenizer, messages, True, kwargs)
    ends = [k for k, t in enumerate(closed) if t in eos]
    if not ends:
        raise ValueError(
            f"the chat template closes the assistant's turn with none of the end-of-turn ids {sorted(eos)}; pass "
            "the ids that end an assistant turn (eos_token_ids, or the model's generation_config.eos_token_id)"
        )
    cut = ends[-1] + 1
    if full[:cut] != closed[:cut]:
        raise ValueError(
            "the chat template renders the dialogue up to the assistant's turn differently once the user's next "
            "message follows; the rollout needs a template whose rendering of a dialogue starts with its "
            "rendering of every earlier state"
        )
    return full[cut:] if ended else [closed[ends[-1]], *full[cut:]]


def _sample(model: Any, contexts: list[list[int]], config: Any, pad_id: int | None, eos: set[int]) -> list[list[int]]:
    """One sampled continuation per context (left-padded batch), each cut after its first end-of-turn id."""
    import torch

    pad = pad_id if pad_id is not None else min(eos)
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, context in enumerate(contexts):
        ids[k, width - len(context):] = torch.tensor(context, dtype=torch.long)
        mask[k, width - len(context):] = 1
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    rows = []
    for row in out[:, width:].tolist():
        cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


__all__ = ["DialogueRollout", "EXTRA_FIELDS", "env_reward"]
