"""On-policy collection of REFUEL tuples through the environment's public API (algorithm 1, line 3).

For each prompt: the environment draws H (``reset`` without a horizon), we draw h ~ U{1..H};
the policy rolls in for h - 1 turns; at s_h the state is snapshotted; branch A restores it with
one seed and branch B with another (so the simulated user's randomness is independent), each
samples its own y_h from the policy and continues with the policy to turn H, and only to H.

Everything is batched: every turn, all dialogues that still need a response, whatever their
phase, go to the policy in one ``chat`` call and to a vector environment in one ``step``. A
dialogue is carried from turn to turn as a snapshot, so a vector environment of the right size
is rebuilt from snapshots each turn (``reset(options={"snapshot": [...]})``; restoring without a
seed continues exactly, as if it had never been interrupted).

A tuple whose branch was truncated (the dialogue outgrew a model's context) is dropped and
counted in :class:`CollectionStats`; nothing is dropped silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from refuel_env.generation import SamplingParams, TextGenerator

#: Computes per-response log-probs (policy, reference) for the KL penalty: (states, responses) -> two lists.
LogprobFn = Callable[[list[list[dict]], list[str]], tuple[list[float], list[float]]]


@dataclass
class CollectionStats:
    """What a collection produced and what it had to drop."""

    prompts: int = 0
    tuples: int = 0
    dropped_truncated: int = 0
    truncation_reasons: Counter = field(default_factory=Counter)
    policy_calls: int = 0
    policy_responses: int = 0
    user_parse_failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "tuples": self.tuples,
            "dropped_truncated": self.dropped_truncated,
            "policy_calls": self.policy_calls,
            "policy_responses": self.policy_responses,
            "user_parse_failures": self.user_parse_failures,
        }


@dataclass
class _Slot:
    """One dialogue in flight: a roll-in, or branch 0 / 1 of a tuple."""

    tuple_index: int
    branch: int  # -1 roll-in, 0 = A, 1 = B
    snapshot: Any
    seed: int | None = None  # reseed the user's stream at the next restore (a branch's first step)
    response: str | None = None  # y_h of a branch
    given: str | None = None  # a response to play at the next step instead of a policy sample (lt-offline)


class StepBatcher:
    """Steps any set of snapshots together in a vector environment of matching size."""

    def __init__(self, env_id: str, env_kwargs: dict[str, Any]):
        self.env_id = env_id
        self.env_kwargs = env_kwargs
        self._envs: dict[int, gym.vector.VectorEnv] = {}

    def env(self, n: int) -> gym.vector.VectorEnv:
        if n not in self._envs:
            self._envs[n] = gym.make_vec(self.env_id, num_envs=n, vectorization_mode="vector_entry_point", **self.env_kwargs)
        return self._envs[n]

    def reset(self, n: int, seed: int, indices: Sequence[int] | None) -> tuple[Any, dict]:
        options = {"index": list(indices)} if indices is not None else None
        return self.env(n).reset(seed=seed, options=options)

    def step(self, snapshots: Sequence[Any], seeds: Sequence[int | None], actions: Sequence[str],
             logprobs: tuple[list[float], list[float]] | None = None):
        env = self.env(len(snapshots))
        env.reset(seed=list(seeds), options={"snapshot": list(snapshots)})
        if logprobs is not None:
            env.unwrapped.set_logprobs(*logprobs)
        return env.step(list(actions))

    def close(self) -> None:
        for env in self._envs.values():
            env.close()


def collect_refuel_tuples(
    *,
    env_id: str,
    env_kwargs: dict[str, Any],
    policy: TextGenerator,
    sampling: SamplingParams,
    num_prompts: int,
    seed: int,
    prompt_indices: Sequence[int] | None = None,
    kl_logprobs: LogprobFn | None = None,
    progress: bool = True,
    last_turn: bool = False,
) -> tuple[list[dict[str, Any]], CollectionStats]:
    """Collect one REFUEL tuple per prompt with ``policy``; returns the rows and the stats.

    Each row holds: ``item_id``, ``h``, ``H``, ``state`` (s_h as messages), ``response``,
    ``response_prime`` (y_h, y'_h), ``dialogue``, ``dialogue_prime`` (the full transcripts),
    ``reward``, ``reward_prime``, ``reward_parts``/``reward_parts_prime`` and ``seed``.
    ``kl_logprobs`` is needed when the environment has a KL penalty (it asks for the log-probs
    of every response under the policy and the reference).
    ``last_turn=True`` branches at the last turn, h = H, instead of h ~ U{1..H}: the policy rolls
    in to s_H and both responses are the final ones (the LT-ONLINE baseline's data).
    """
    rng = np.random.default_rng(seed)
    batcher = StepBatcher(env_id, env_kwargs)
    stats = CollectionStats(prompts=num_prompts)
    obs, info = batcher.reset(num_prompts, seed, prompt_indices)
    horizons = [int(x) for x in info["horizon"]]
    turns_h = list(horizons) if last_turn else [int(rng.integers(1, H + 1)) for H in horizons]
    rows: list[dict[str, Any]] = [
        {"item_id": str(info["item_id"][i]), "h": turns_h[i], "H": horizons[i], "seed": seed}
        for i in range(num_prompts)
    ]
    slots: list[_Slot] = []
    for i in range(num_prompts):
        snap = info["snapshot"][i]
        if turns_h[i] == 1:
            slots.extend(_branch_slots(i, snap, rng, rows))
        else:
            slots.append(_Slot(i, -1, snap))

    total = sum(2 * (H - h + 1) + h - 1 for H, h in zip(horizons, turns_h))
    bar = tqdm(total=total, desc="collect", unit="resp", disable=not progress, leave=False)
    _run(slots, rows, batcher, policy, sampling, rng, stats, kl_logprobs, bar)
    bar.close()
    batcher.close()
    complete = [r for r in rows if "reward" in r and "reward_prime" in r and not r.get("dropped")]
    stats.tuples = len(complete)
    return complete, stats


def _run(
    slots: list[_Slot],
    rows: list[dict[str, Any]],
    batcher: StepBatcher,
    policy: TextGenerator | None,
    sampling: SamplingParams,
    rng: np.random.Generator,
    stats: CollectionStats,
    kl_logprobs: LogprobFn | None,
    bar: Any,
) -> None:
    """Advance every slot to its end: each turn, one policy call and one vector step for all."""
    while slots:
        states = [s.snapshot.messages for s in slots]
        seeds = rng.integers(0, 2**31 - 1, len(slots)).tolist()
        replies = _replies(slots, states, seeds, policy, sampling, stats)
        logprobs = kl_logprobs(states, replies) if kl_logprobs is not None else None
        obs, reward, terminated, truncated, info = batcher.step(
            [s.snapshot for s in slots], [s.seed for s in slots], replies, logprobs
        )
        if bar is not None:
            bar.update(len(slots))
        next_slots: list[_Slot] = []
        for k, slot in enumerate(slots):
            slot.seed = slot.given = None
            if slot.branch >= 0 and slot.response is None:
                slot.response = replies[k]
            row = rows[slot.tuple_index]
            if truncated[k]:
                row["truncation_reason"] = str(info["truncation_reason"][k])
                _drop(row, stats, row["truncation_reason"])
            elif terminated[k]:
                _finish_branch(row, slot, obs[k], float(reward[k]), info, k, stats)
            else:
                slot.snapshot = info["snapshot"][k]
                if slot.branch == -1 and slot.snapshot.turn == row["h"]:
                    next_slots.extend(_branch_slots(slot.tuple_index, slot.snapshot, rng, rows))  # s_h: fork
                else:
                    next_slots.append(slot)
        slots = next_slots


def _replies(slots: list[_Slot], states: list[list], seeds: list[int], policy: TextGenerator | None,
             sampling: SamplingParams, stats: CollectionStats) -> list[str]:
    """Each slot's response this turn: its given one, else a policy sample (one batched call)."""
    replies = [s.given for s in slots]
    asking = [k for k, reply in enumerate(replies) if reply is None]
    if asking:
        if policy is None:
            raise ValueError("these dialogues need policy responses, but no policy was given")
        sampled = policy.chat([states[k] for k in asking], sampling, seeds=[seeds[k] for k in asking])
        stats.policy_calls += 1
        stats.policy_responses += len(asking)
        for k, completion in zip(asking, sampled):
            replies[k] = completion.text
    return replies


def _branch_slots(i: int, snap: Any, rng: np.random.Generator, rows: list[dict]) -> list[_Slot]:
    rows[i]["state"] = snap.messages
    seeds = rng.integers(0, 2**31 - 1, 2).tolist()
    return [_Slot(i, 0, snap, seed=seeds[0]), _Slot(i, 1, snap, seed=seeds[1])]


def _finish_branch(row: dict, slot: _Slot, dialogue: list, reward: float, info: dict, k: int,
                   stats: CollectionStats) -> None:
    suffix = "" if slot.branch == 0 else "_prime"
    row[f"response{suffix}"] = slot.response
    row[f"dialogue{suffix}"] = list(dialogue)
    row[f"reward{suffix}"] = reward
    parts = info["reward_parts"]
    row[f"reward_parts{suffix}"] = {key: float(parts[key][k]) for key in parts
                                    if not key.startswith("_") and parts[f"_{key}"][k]}
    stats.user_parse_failures += int(info["user_parse_failures"][k])


def _drop(row: dict, stats: CollectionStats, reason: str) -> None:
    if not row.get("dropped"):
        row["dropped"] = True
        stats.dropped_truncated += 1
        stats.truncation_reasons[reason.split(",")[0]] += 1


def play_dialogues(
    *,
    env_id: str,
    env_kwargs: dict[str, Any],
    policy: TextGenerator,
    sampling: SamplingParams,
    num_dialogues: int,
    seed: int,
    horizon: int | Sequence[int] | None = None,
    prompt_indices: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Play whole dialogues with ``policy`` (no branching), batched like the collection.

    One row per dialogue: ``item_id``, ``H``, ``reward`` (None when truncated, with
    ``truncation_reason``), ``dialogue``.
    """
    rng = np.random.default_rng(seed)
    batcher = StepBatcher(env_id, env_kwargs)
    options: dict[str, Any] = {}
    if horizon is not None:
        options["horizon"] = list(horizon) if isinstance(horizon, Sequence) else horizon
    if prompt_indices is not None:
        options["index"] = list(prompt_indices)
    _, info = batcher.env(num_dialogues).reset(seed=seed, options=options)
    rows = [{"item_id": str(info["item_id"][i]), "H": int(info["horizon"][i])} for i in range(num_dialogues)]
    slots = [_Slot(i, 0, info["snapshot"][i]) for i in range(num_dialogues)]
    stats = CollectionStats(prompts=num_dialogues)
    _run(slots, rows, batcher, policy, sampling, rng, stats, None, None)
    batcher.close()
    return [
        {"item_id": r["item_id"], "H": r["H"], "reward": r.get("reward"), "dialogue": r.get("dialogue", []),
         **({"truncation_reason": r["truncation_reason"]} if "truncation_reason" in r else {})}
        for r in rows
    ]
