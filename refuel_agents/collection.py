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

Penalties (setting two, appendix C.1). Eq. 11's KL term and the truncation penalty Gamma apply
to the policy's own generations in a branch, and :class:`Penalties` says which: ``"rollout"``
(default) covers y_h and every later policy response of the branch, turns h..H, the
generations whose return Q(s_h, y_h) regresses; ``"turn-h"`` covers y_h alone, as the original
release did. The shared roll-in (turns before h) is part of the state s_h and is never
penalised: it is the same in both branches, and Gamma there would replace both rewards by the
same constant and erase the pair. Gamma fires on a covered response whose generation was cut by
the token budget (``finish_reason == "length"``), and replaces the model score: reward =
Gamma - KL penalty. The environment's own Gamma, which counts tokens of the text, is switched off
for collection by the trainer; this rule reads how the generation really ended.

A branch that the environment truncates (the dialogue outgrew a model's context or
``max_dialogue_tokens``) gets Gamma too where the setting defines one, so no tuple is dropped
for its outcome. Without Gamma the tuple is dropped, and :class:`CollectionStats` counts drops
by h (``dropped_by_h`` over ``prompts_by_h``): conditioning on both branches surviving biases
the regression target, so the rate is reported. A roll-in truncated before s_h has no tuple.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from refuel_env.generation import Completion, SamplingParams, TextGenerator

#: Computes per-response log-probs (policy, reference) for the KL penalty: (states, responses, completions) ->
#: two lists. ``completions[k]`` is the policy's :class:`Completion` of response k (its sampled token ids are
#: what must be scored), or None for a response the policy did not sample.
LogprobFn = Callable[[list[list[dict]], list[str], list[Completion | None]], tuple[list[float], list[float]]]


#: Which of a branch's policy responses the KL penalty and Gamma cover (see the module docstring).
PENALTY_TURNS = ("rollout", "turn-h")


@dataclass(frozen=True)
class Penalties:
    """Setting two's penalties as collection applies them: Gamma, eq. 11's KL coefficient, their turns."""

    truncation_penalty: float | None = None
    """Gamma: the reward of a branch whose covered response hit the token budget (None: no Gamma)."""
    kl_coef: float = 0.0
    """eq. 11's gamma, as the environment applies it (needed to subtract the KL from Gamma)."""
    turns: str = "rollout"
    """'rollout' (turns h..H, the paper's reading) or 'turn-h' (y_h only, the original release)."""

    def __post_init__(self) -> None:
        if self.turns not in PENALTY_TURNS:
            raise ValueError(f"penalty turns must be one of {PENALTY_TURNS}, got {self.turns!r}")


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
    prompts_by_h: Counter = field(default_factory=Counter)
    dropped_by_h: Counter = field(default_factory=Counter)
    gamma_length: int = 0
    gamma_truncated: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "tuples": self.tuples,
            "dropped_truncated": self.dropped_truncated,
            "policy_calls": self.policy_calls,
            "policy_responses": self.policy_responses,
            "user_parse_failures": self.user_parse_failures,
            "gamma_length": self.gamma_length,
            "gamma_truncated": self.gamma_truncated,
            "drop_rate_by_h": {str(h): self.dropped_by_h[h] / n for h, n in sorted(self.prompts_by_h.items()) if n},
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
    token_ids: tuple[int, ...] | None = None  # the tokens sampled for y_h (None: given, or not reported)
    finish_reason: str | None = None  # how y_h's generation ended
    covered_length_hit: bool = False  # a response that the penalties cover ended on the token budget
    kl_sum: float = 0.0  # sum over covered responses of log pi_t - log pi_0
    steps: int = 0  # responses this branch has given


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
    penalties: Penalties | None = None,
) -> tuple[list[dict[str, Any]], CollectionStats]:
    """Collect one REFUEL tuple per prompt with ``policy``; returns the rows and the stats.

    Each row holds: ``item_id``, ``h``, ``H``, ``state`` (s_h as messages), ``response``,
    ``response_prime`` (y_h, y'_h), ``dialogue``, ``dialogue_prime`` (the full transcripts),
    ``reward``, ``reward_prime``, ``reward_parts``/``reward_parts_prime`` and ``seed``, and
    for sampled responses ``response_token_ids``/``response_prime_token_ids`` with
    ``response_finish_reason``/``response_prime_finish_reason`` (what training scores).
    ``sampling`` is one :class:`SamplingParams` or a dict from H to one (per-H response limits).
    ``kl_logprobs`` is needed when the environment has a KL penalty (it is asked for the
    log-probs of the responses that ``penalties`` covers; the others get 0). ``penalties``:
    Gamma and the turns it and the KL cover (module docstring); None = no Gamma, KL over turns h..H.
    ``last_turn=True`` branches at the last turn, h = H, instead of h ~ U{1..H}: the policy rolls
    in to s_H and both responses are the final ones (the LT-ONLINE baseline's data).
    """
    rng = np.random.default_rng(seed)
    batcher = StepBatcher(env_id, env_kwargs)
    stats = CollectionStats(prompts=num_prompts)
    if prompt_indices is not None and len(prompt_indices) != num_prompts:
        raise ValueError(f"prompt_indices has {len(prompt_indices)} entries for num_prompts={num_prompts}")
    obs, info = batcher.reset(num_prompts, seed, prompt_indices)
    horizons = [int(x) for x in info["horizon"]]
    turns_h = list(horizons) if last_turn else [int(rng.integers(1, H + 1)) for H in horizons]
    rows: list[dict[str, Any]] = [
        {"item_id": str(info["item_id"][i]), "h": turns_h[i], "H": horizons[i], "seed": seed}
        for i in range(num_prompts)
    ]
    stats.prompts_by_h.update(turns_h)
    slots: list[_Slot] = []
    for i in range(num_prompts):
        snap = info["snapshot"][i]
        if turns_h[i] == 1:
            slots.extend(_branch_slots(i, snap, rng, rows))
        else:
            slots.append(_Slot(i, -1, snap))

    total = sum(2 * (H - h + 1) + h - 1 for H, h in zip(horizons, turns_h))
    bar = tqdm(total=total, desc="collect", unit="resp", disable=not progress, leave=False)
    _run(slots, rows, batcher, policy, sampling, rng, stats, kl_logprobs, bar, penalties)
    bar.close()
    batcher.close()
    complete = [r for r in rows if "reward" in r and "reward_prime" in r and not r.get("dropped")]
    stats.tuples = len(complete)
    return complete, stats


def _covered(slot: _Slot, penalties: Penalties | None) -> bool:
    """Whether the penalties cover the response this slot gives next (module docstring).

    A given response (a dataset reply, lt-offline) is not the policy's and gets no penalty."""
    if slot.branch < 0 or slot.given is not None:
        return False
    return slot.steps == 0 or penalties is None or penalties.turns == "rollout"


def _run(
    slots: list[_Slot],
    rows: list[dict[str, Any]],
    batcher: StepBatcher,
    policy: TextGenerator | None,
    sampling: SamplingParams | dict[int, SamplingParams],
    rng: np.random.Generator,
    stats: CollectionStats,
    kl_logprobs: LogprobFn | None,
    bar: Any,
    penalties: Penalties | None = None,
) -> None:
    """Advance every slot to its end: each turn, one policy call and one vector step for all."""
    while slots:
        states = [s.snapshot.messages for s in slots]
        seeds = rng.integers(0, 2**31 - 1, len(slots)).tolist()
        params = [_params_for(sampling, rows[s.tuple_index]["H"]) for s in slots]
        replies, completions = _replies(slots, states, seeds, policy, params, stats)
        covered = [_covered(s, penalties) for s in slots]
        logprobs = None
        if kl_logprobs is not None:
            logprobs = ([0.0] * len(slots), [0.0] * len(slots))
            wanted = [k for k, c in enumerate(covered) if c]
            if wanted:
                pol, ref = kl_logprobs([states[k] for k in wanted], [replies[k] for k in wanted],
                                       [completions[k] for k in wanted])
                for j, k in enumerate(wanted):
                    logprobs[0][k], logprobs[1][k] = pol[j], ref[j]
                    slots[k].kl_sum += pol[j] - ref[j]
        obs, reward, terminated, truncated, info = batcher.step(
            [s.snapshot for s in slots], [s.seed for s in slots], replies, logprobs
        )
        if bar is not None:
            bar.update(len(slots))
        next_slots: list[_Slot] = []
        for k, slot in enumerate(slots):
            slot.seed = slot.given = None
            completion = completions[k]
            if slot.branch >= 0 and slot.response is None:
                slot.response = replies[k]
                if completion is not None:
                    slot.token_ids, slot.finish_reason = completion.token_ids, completion.finish_reason
            if covered[k] and completion is not None and completion.finish_reason == "length":
                slot.covered_length_hit = True
            slot.steps += slot.branch >= 0
            row = rows[slot.tuple_index]
            if truncated[k]:
                reason = str(info["truncation_reason"][k])
                if slot.branch >= 0 and penalties is not None and penalties.truncation_penalty is not None:
                    stats.gamma_truncated += 1
                    _finish_branch(row, slot, obs[k], math.nan, info, k, stats, penalties, truncated=reason)
                else:
                    row["truncation_reason"] = reason
                    _drop(row, stats, reason)
            elif terminated[k]:
                _finish_branch(row, slot, obs[k], float(reward[k]), info, k, stats, penalties)
            else:
                slot.snapshot = info["snapshot"][k]
                if slot.branch == -1 and slot.snapshot.turn == row["h"]:
                    next_slots.extend(_branch_slots(slot.tuple_index, slot.snapshot, rng, rows))  # s_h: fork
                else:
                    next_slots.append(slot)
        slots = next_slots


def _params_for(sampling: SamplingParams | dict[int, SamplingParams], H: int) -> SamplingParams:
    if isinstance(sampling, SamplingParams):
        return sampling
    if H not in sampling:
        raise ValueError(f"the per-H sampling settings have no entry for H={H} (they cover H in {sorted(sampling)})")
    return sampling[H]


def _replies(slots: list[_Slot], states: list[list], seeds: list[int], policy: TextGenerator | None,
             params: list[SamplingParams], stats: CollectionStats) -> tuple[list[str], list[Completion | None]]:
    """Each slot's response this turn: its given one, else a policy sample (one batched call per
    distinct sampling setting, i.e. per response limit)."""
    replies = [s.given for s in slots]
    completions: list[Completion | None] = [None] * len(slots)
    asking = [k for k, reply in enumerate(replies) if reply is None]
    if asking and policy is None:
        raise ValueError("these dialogues need policy responses, but no policy was given")
    for setting in dict.fromkeys(params[k] for k in asking):
        group = [k for k in asking if params[k] == setting]
        sampled = policy.chat([states[k] for k in group], setting, seeds=[seeds[k] for k in group])
        stats.policy_calls += 1
        stats.policy_responses += len(group)
        for k, completion in zip(group, sampled):
            replies[k], completions[k] = completion.text, completion
    return replies, completions


def _branch_slots(i: int, snap: Any, rng: np.random.Generator, rows: list[dict]) -> list[_Slot]:
    rows[i]["state"] = snap.messages
    seeds = rng.integers(0, 2**31 - 1, 2).tolist()
    return [_Slot(i, 0, snap, seed=seeds[0]), _Slot(i, 1, snap, seed=seeds[1])]


def _finish_branch(row: dict, slot: _Slot, dialogue: list, reward: float, info: dict, k: int,
                   stats: CollectionStats, penalties: Penalties | None = None, truncated: str | None = None) -> None:
    """Store a finished branch: its response (with the sampled tokens), dialogue and reward.

    ``truncated`` (the environment's reason) marks a branch that Gamma scores instead of the model.
    """
    suffix = "" if slot.branch == 0 else "_prime"
    row[f"response{suffix}"] = slot.response
    row[f"dialogue{suffix}"] = list(dialogue)
    if slot.token_ids is not None:
        row[f"response{suffix}_token_ids"] = list(slot.token_ids)
        row[f"response{suffix}_finish_reason"] = slot.finish_reason
    parts: dict[str, float] = {}
    if truncated is None:
        env_parts = info["reward_parts"]
        parts = {key: float(env_parts[key][k]) for key in env_parts if not key.startswith("_") and env_parts[f"_{key}"][k]}
    gamma = penalties.truncation_penalty if penalties is not None else None
    if gamma is not None and (truncated is not None or slot.covered_length_hit):
        kl = penalties.kl_coef * slot.kl_sum
        parts = {"truncation_penalty": float(gamma), **({"kl_penalty": kl} if penalties.kl_coef else {}),
                 "reward": float(gamma) - kl}
        reward = parts["reward"]
        stats.gamma_length += truncated is None
        if truncated is not None:
            row[f"truncation_reason{suffix}"] = truncated
    row[f"reward{suffix}"] = reward
    row[f"reward_parts{suffix}"] = parts
    stats.user_parse_failures += int(info["user_parse_failures"][k])


def _drop(row: dict, stats: CollectionStats, reason: str) -> None:
    if not row.get("dropped"):
        row["dropped"] = True
        stats.dropped_truncated += 1
        stats.truncation_reasons[reason.split(",")[0]] += 1
        if "h" in row:
            stats.dropped_by_h[row["h"]] += 1


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
    progress: bool = False,
    kl_logprobs: LogprobFn | None = None,
) -> list[dict[str, Any]]:
    """Play whole dialogues with ``policy`` (no branching), batched like the collection.

    One row per dialogue: ``item_id``, ``H``, ``reward`` (None when truncated, with
    ``truncation_reason``), ``dialogue``. ``kl_logprobs`` is needed when the environment has a KL
    penalty: it scores every policy response, as the environment's reward then asks.
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
    bar = tqdm(total=sum(r["H"] for r in rows), desc="evaluate", unit="resp", disable=not progress, leave=False)
    _run(slots, rows, batcher, policy, sampling, rng, stats, kl_logprobs, bar)
    bar.close()
    batcher.close()
    return [
        {"item_id": r["item_id"], "H": r["H"], "reward": r.get("reward"), "dialogue": r.get("dialogue", []),
         **({"truncation_reason": r["truncation_reason"]} if "truncation_reason" in r else {})}
        for r in rows
    ]


def sampling_by_h(sampling: SamplingParams, max_new_tokens_by_h: dict[str, int] | None,
                  max_turns: int) -> SamplingParams | dict[int, SamplingParams]:
    """``sampling``, or one copy per dialogue length H with that H's response limit (the others keep
    ``sampling.max_new_tokens``), as :func:`collect_refuel_tuples` takes it."""
    if not max_new_tokens_by_h:
        return sampling
    limits = {H: sampling.max_new_tokens for H in range(1, max_turns + 1)}
    limits.update({int(H): n for H, n in max_new_tokens_by_h.items()})
    return {H: replace(sampling, max_new_tokens=n) for H, n in limits.items()}
