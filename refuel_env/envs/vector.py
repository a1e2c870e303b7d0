"""DialogueVectorEnv: N dialogues stepped together, one batched user call and one reward call a step."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from refuel_env.components import build_core, spec_config
from refuel_env.core import (
    RESET_OPTIONS,
    Episode,
    EpisodeError,
    StepResult,
    check_option_names,
    check_options,
    check_seed,
    copy_messages,
    render_transcript,
)
from refuel_env.snapshot import Snapshot
from refuel_env.spaces import Conversation, Prose


class DialogueVectorEnv(VectorEnv):
    """A native batched version of :class:`~refuel_env.envs.dialogue.DialogueEnv`.

    Sub-environment ``i`` reset with ``seed=s`` behaves exactly like a ``DialogueEnv`` reset with
    ``seed=s + i`` (as Gymnasium's sync vector env seeds its copies). Observations are a tuple of
    conversations; rewards, terminations and truncations are arrays; infos follow Gymnasium's
    vector convention (an array per key, with a ``_key`` mask).

    Reset options are those of ``DialogueEnv``; each may be a single value for every
    sub-environment or a sequence with one entry per sub-environment (``None`` for "not given"),
    e.g. ``options={"snapshot": [snap_a, snap_a, None, None]}``. ``options["reset_mask"]`` (a
    bool array) resets only the selected sub-environments and keeps the others as they are.

    Autoreset is next-step: the step after a sub-environment ends resets it (its action is
    ignored) and returns the new first observation with reward 0.
    """

    metadata = {"render_modes": ["ansi"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, render_mode: str | None = None, preset: str | None = None, **kwargs: Any):
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.config = spec_config(preset, **kwargs)
        self.core = build_core(self.config)
        self.single_observation_space = Conversation(max_turns=self.config.max_turns)
        self.single_action_space = Prose()
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rngs: list[np.random.Generator] = [np.random.default_rng() for _ in range(num_envs)]
        self._episodes: list[Episode | None] = [None] * num_envs
        self._autoreset = np.zeros(num_envs, dtype=bool)

    # ------------------------------------------------------------------ reset

    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None):
        seeds = self._seeds(seed)
        options = check_options(options)
        check_option_names(options, (*RESET_OPTIONS, "reset_mask"))
        mask = self._reset_mask(options.pop("reset_mask", None))
        per_env = {k: self._per_env(v, k) for k, v in options.items()}
        # Build every new episode, from copies of the random streams, before replacing any, so
        # that a bad option loses nothing.
        new: dict[int, tuple[np.random.Generator, Episode]] = {}
        for i in np.flatnonzero(mask):
            rng = np.random.default_rng(seeds[i]) if seeds[i] is not None else copy.deepcopy(self._rngs[i])
            env_options = {k: v[i] for k, v in per_env.items() if v[i] is not None}
            try:
                new[i] = (rng, self.core.new_episode(rng, env_options, reseed=seeds[i] is not None))
            except (ValueError, TypeError) as err:
                raise type(err)(f"env {i}: {err}") from err
        infos: dict[str, Any] = {}
        for i, (rng, ep) in new.items():
            self._rngs[i] = rng
            self._episodes[i] = ep
            self._autoreset[i] = False
            infos = self._add_info(infos, self.core.reset_info(ep), i)
        return self._observations(), infos

    def _seeds(self, seed: Any) -> list[int | None]:
        if isinstance(seed, list | tuple | np.ndarray):
            if len(seed) != self.num_envs:
                raise ValueError(
                    f"seed: got {len(seed)} seeds for {self.num_envs} sub-environments; pass one int (sub-env i "
                    f"gets seed + i), a list of {self.num_envs} ints or None, or None"
                )
            return [check_seed(s, f"seed[{i}]") for i, s in enumerate(seed)]
        first = check_seed(seed)
        return [None if first is None else first + i for i in range(self.num_envs)]

    def _reset_mask(self, mask: Any) -> np.ndarray:
        if mask is None:
            return np.ones(self.num_envs, dtype=bool)
        array = np.asarray(mask)
        if array.dtype != np.bool_ or array.shape != (self.num_envs,):
            raise ValueError(
                f"reset_mask must be {self.num_envs} bools (a bool array of shape ({self.num_envs},)), got "
                f"{mask!r:.80} (dtype {array.dtype}, shape {array.shape})"
            )
        return array

    def _per_env(self, value: Any, name: str) -> list[Any]:
        """One value per sub-environment: a sequence is per sub-env, anything else is for all.

        A prefix is itself a list of messages: a list that is empty or starts with a message dict is
        one prefix for every sub-environment.
        """
        one_prefix = name == "prefix" and isinstance(value, list | tuple) and (not value or isinstance(value[0], dict))
        if isinstance(value, list | tuple | np.ndarray) and not one_prefix:
            if len(value) != self.num_envs:
                raise ValueError(
                    f"options[{name!r}]: got {len(value)} values for {self.num_envs} sub-environments; pass one "
                    f"value for all, or a list of {self.num_envs} with None where not given"
                )
            return [v.item() if isinstance(v, np.generic) else v for v in value]
        return [value] * self.num_envs

    # ------------------------------------------------------------------ step

    def step(self, actions: Sequence[str]):
        if isinstance(actions, str) or not isinstance(actions, Sequence | np.ndarray) or len(actions) != self.num_envs:
            raise ValueError(f"step() takes a sequence of {self.num_envs} actions (one str per environment), got {actions!r:.80}")
        if any(ep is None for ep in self._episodes):
            raise EpisodeError("step() called before reset(); call reset() first")
        stepping = [i for i in range(self.num_envs) if not self._autoreset[i]]
        for i in stepping:
            self.core.check_action(self._episodes[i], actions[i], where=f"env {i}: ")

        # Sub-environments that ended last step start a new episode (next-step autoreset). It is
        # built from a copy of the random stream and kept only if the whole step succeeds, so a
        # step that fails leaves every sub-environment, autoreset flags included, as it was.
        results: dict[int, StepResult] = {}
        restarted: dict[int, tuple[np.random.Generator, Episode]] = {}
        for i in np.flatnonzero(self._autoreset):
            rng = copy.deepcopy(self._rngs[i])
            ep = self.core.new_episode(rng, None)
            restarted[i] = (rng, ep)
            results[i] = StepResult(0.0, False, False, self.core.reset_info(ep))
        if stepping:
            stepped = self.core.advance([self._episodes[i] for i in stepping], [actions[i] for i in stepping])
            results.update(zip(stepping, stepped))
        for i, (rng, ep) in restarted.items():
            self._rngs[i], self._episodes[i] = rng, ep

        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        infos: dict[str, Any] = {}
        for i in range(self.num_envs):
            r = results[i]
            rewards[i], terminated[i], truncated[i] = r.reward, r.terminated, r.truncated
            infos = self._add_info(infos, r.info, i)
        self._autoreset = terminated | truncated
        return self._observations(), rewards, terminated, truncated, infos

    # ------------------------------------------------------------------ extras

    def snapshot(self, index: int) -> Snapshot:
        """The current state of sub-environment ``index`` (0..num_envs - 1)."""
        if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= index < self.num_envs:
            raise IndexError(f"snapshot(index): index must be an int in 0..{self.num_envs - 1}, got {index!r:.80}")
        ep = self._episodes[int(index)]
        if ep is None:
            raise EpisodeError("snapshot() called before reset(); call reset() first")
        return self.core.snapshot(ep)

    def set_logprobs(self, policy: Sequence[float], reference: Sequence[float]) -> None:
        """Log-probs of the next actions under the policy and the reference (for the KL penalty)."""
        for name, values in (("policy", policy), ("reference", reference)):
            if isinstance(values, str) or not isinstance(values, Sequence | np.ndarray) or len(values) != self.num_envs:
                raise ValueError(
                    f"set_logprobs takes one {name} log-prob per sub-environment, {self.num_envs} numbers, got "
                    f"{type(values).__name__} {values!r:.80}; e.g. set_logprobs([-1.5] * {self.num_envs}, [-1.7] * {self.num_envs})"
                )
        if any(ep is None for ep in self._episodes):
            raise EpisodeError("set_logprobs() called before reset(); call reset() first")
        for i, (p, r) in enumerate(zip(policy, reference)):  # check all before setting any
            self.core.check_logprobs(p, r, where=f"env {i}: ")
        for i, (p, r) in enumerate(zip(policy, reference)):
            if not self._autoreset[i]:
                self.core.set_logprobs(self._episodes[i], p, r)

    def _observations(self) -> tuple[list, ...]:
        return tuple(copy_messages(ep.messages) if ep is not None else [] for ep in self._episodes)

    def render(self) -> tuple[str, ...] | None:
        if self.render_mode != "ansi":
            return None
        return tuple(render_transcript(ep.messages) if ep is not None else "" for ep in self._episodes)
