"""Pair data for REFUEL and the baselines of paper section 4.1, one collector per data mode.

Every mode returns rows in the schema of :func:`refuel_agents.collection.collect_refuel_tuples`
(``item_id``, ``h``, ``H``, ``state`` = s_h, ``response`` / ``response_prime`` = y_h / y'_h,
``dialogue`` / ``dialogue_prime``, ``reward`` / ``reward_prime``, ``reward_parts`` /
``reward_parts_prime``, ``seed``) plus ``mode``. The modes differ in whose roll-in reaches s_h,
which turn h is trained and whose responses are compared:

============  =====================================  ===========  ==========================================
mode          roll-in to s_h                         h            y_h, y'_h and what follows them
============  =====================================  ===========  ==========================================
refuel        the policy, with the simulated user    U{1..H}      two policy rollouts from s_h to H
lt-online     the policy, with the simulated user    H            two policy responses at H (the last turn)
lt-mixed      the dataset dialogue (its prefix s_H)  H            two policy responses at H
mt-mixed      the dataset dialogue (its prefix s_h)  U{1..H}      two policy rollouts from s_h to H; the
                                                                  simulated user asks turns h+1..H
lt-offline    the dataset dialogue (its prefix s_H)  H            the dataset's ``chosen`` / ``rejected``
============  =====================================  ===========  ==========================================

Horizons. The on-policy modes (refuel, lt-online) let the environment draw H, as REFUEL does.
The offline-roll-in modes (lt-mixed, mt-mixed, lt-offline) read the state from a dataset
dialogue, so H is that dialogue's own number of turns K (``DialogueItem.num_turns``): the state
s_H = (x_1, y_1, ..., x_K) is the dataset's, and for lt-offline the dataset's pair of replies is
at turn K. The dataset's turn distribution therefore sets the distribution of H, as in the
paper's appendix C.4 (fewer long dialogues). mt-mixed then draws h ~ U{1..K}.

Which items each offline mode can use. An item is usable when the environment allows H = K for
it and it has a dataset response at every turn before K (``DialogueItem.prefix``). lt-offline
also needs the item's ``chosen`` and ``rejected`` replies: those are the two responses compared;
an item without the pair is skipped (it has at most one dataset reply at turn K, nothing to
compare it with). Skipped items are counted in :class:`ModeStats`; a dataset with no usable
item is an error. Prompts are drawn from the usable items without replacement, reshuffling
when they run out (``num_prompts=None``: each usable item once).

Rewards always come from the environment: each branch is stepped (from the dataset prefix for
the offline roll-ins, through ``reset(options={"index", "prefix", "horizon"})``) so the same
reward model, penalties and truncation rules score every mode. Gamma and the KL penalty cover
the policy's generations of a branch as in ``collection.py`` (:class:`~refuel_agents.collection.Penalties`);
a dataset reply (lt-offline's pair, the replies inside a prefix) was not generated under a token
budget and gets neither. A truncated branch gets Gamma where the setting has one, else its
pair is dropped and counted, as in ``collection.py``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from refuel_agents.collection import (
    CollectionStats,
    LogprobFn,
    Penalties,
    StepBatcher,
    _branch_slots,
    _run,
    collect_refuel_tuples,
)
from refuel_env.generation import SamplingParams, TextGenerator
from refuel_env.types import DialogueItem

#: Every data mode; the last four are the baselines' (section 4.1).
MODES = ("refuel", "lt-online", "lt-mixed", "mt-mixed", "lt-offline")
BASELINE_MODES = ("lt-offline", "lt-mixed", "lt-online", "mt-mixed")
OFFLINE_ROLL_IN = ("lt-mixed", "mt-mixed", "lt-offline")

MODE_HELP = {
    "refuel": "REFUEL's data: on-policy roll-in to h ~ U{1..H}, two on-policy rollouts from s_h to H",
    "lt-offline": "last turn H of a dataset dialogue: dataset state s_H, the dataset's chosen / rejected replies",
    "lt-mixed": "last turn H of a dataset dialogue: dataset state s_H, two policy responses",
    "lt-online": "last turn H: the policy rolls in to s_H with the simulated user, two policy responses",
    "mt-mixed": "dataset state s_h at h ~ U{1..H}, two policy rollouts from s_h to H with the simulated user",
}


@dataclass
class ModeStats(CollectionStats):
    """:class:`CollectionStats` plus the mode, the items it could use, and pairs dropped for ties (DPO)."""

    mode: str = "refuel"
    usable_items: int | None = None
    unusable_items: Counter = field(default_factory=Counter)
    dropped_ties: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = {**super().as_dict(), "mode": self.mode, "dropped_ties": self.dropped_ties}
        if self.usable_items is not None:
            out["usable_items"] = self.usable_items
            out["unusable_items"] = dict(self.unusable_items)
        return out


def collect_pairs(
    *,
    mode: str,
    env_id: str,
    env_kwargs: dict[str, Any],
    policy: TextGenerator | None,
    sampling: SamplingParams | dict[int, SamplingParams],
    num_prompts: int | None,
    seed: int,
    prompt_indices: Sequence[int] | None = None,
    kl_logprobs: LogprobFn | None = None,
    progress: bool = True,
    penalties: Penalties | None = None,
    allowed: Sequence[int] | None = None,
) -> tuple[list[dict[str, Any]], ModeStats]:
    """Collect one pair per prompt in ``mode`` (see the module docstring); returns rows and stats.

    ``num_prompts=None`` means every usable item once (offline modes) or the whole dataset (on-policy
    modes). ``prompt_indices`` picks dataset items by index instead of drawing them. ``policy`` may
    be None only for lt-offline, which samples nothing. ``sampling`` and ``penalties`` as in
    :func:`~refuel_agents.collection.collect_refuel_tuples`. ``allowed``: the only items an offline roll-in
    may draw (the training items, without the held-out prompts; None: all).
    """
    if mode not in MODES:
        raise ValueError(f"unknown data mode {mode!r}; the modes are {list(MODES)}")
    if policy is None and mode != "lt-offline":
        raise ValueError(f"mode {mode!r} samples responses from the policy; pass policy=")
    if mode in ("refuel", "lt-online"):
        if num_prompts is None:
            num_prompts = len(prompt_indices) if prompt_indices is not None else len(dataset_items(env_id, env_kwargs)[0])
        rows, base = collect_refuel_tuples(
            env_id=env_id, env_kwargs=env_kwargs, policy=policy, sampling=sampling, num_prompts=num_prompts,
            seed=seed, prompt_indices=prompt_indices, kl_logprobs=kl_logprobs, progress=progress,
            last_turn=mode == "lt-online", penalties=penalties,
        )
        stats = ModeStats(**{f.name: getattr(base, f.name) for f in fields(CollectionStats)}, mode=mode)
        return [{**r, "mode": mode} for r in rows], stats
    return _collect_offline_roll_in(mode, env_id, env_kwargs, policy, sampling, num_prompts, seed, prompt_indices,
                                    kl_logprobs, progress, penalties, allowed)


# ------------------------------------------------------------------------------ dataset items


def dataset_items(env_id: str, env_kwargs: dict[str, Any]) -> tuple[list[DialogueItem], list[int]]:
    """The environment's dataset items and, for each, the longest horizon it allows.

    Read from the environment's dialogue core (``env.unwrapped.core``: ``items`` and
    ``max_horizon(item)``), the same source that ``RefuelTrainer`` counts the dataset from.
    """
    env = gym.make(env_id, **env_kwargs)
    try:
        core = getattr(env.unwrapped, "core", None)
        if core is None or not hasattr(core, "items") or not hasattr(core, "max_horizon"):
            raise TypeError(
                f"{env_id} exposes no dataset items (env.unwrapped.core.items and .max_horizon); the offline "
                "roll-in modes read the dataset dialogues from there"
            )
        items = list(core.items)
        return items, [int(core.max_horizon(item)) for item in items]
    finally:
        env.close()


def usable_for(mode: str, item: DialogueItem, max_horizon: int) -> str:
    """'' when ``item`` can start a pair in ``mode``, else why not (a short reason, for counting)."""
    if item.num_turns > max_horizon:
        return f"more turns than the longest horizon ({max_horizon})"
    try:
        item.prefix(item.num_turns)
    except ValueError:
        return "no dataset response before the last turn"
    if mode == "lt-offline" and (item.chosen is None or item.rejected is None):
        return "no chosen/rejected pair at the last turn"
    return ""


def draw_items(mode: str, items: Sequence[DialogueItem], horizons: Sequence[int], num_prompts: int | None,
               prompt_indices: Sequence[int] | None, rng: np.random.Generator,
               env_id: str, allowed: Sequence[int] | None = None) -> tuple[list[int], int, Counter]:
    """Indices of the items that start the pairs, the number of usable items, and why the others are not.

    ``horizons[i]`` is the longest horizon the environment allows for ``items[i]``; ``allowed`` (None: all)
    the items a draw may use: the others, held out, are not usable. Raises ``ValueError`` when no item is
    usable in ``mode`` or a given prompt index is not usable.
    """
    reasons = [usable_for(mode, item, H) for item, H in zip(items, horizons)]
    if allowed is not None:
        keep = set(allowed)
        reasons = [why if i in keep else "held out" for i, why in enumerate(reasons)]
    usable = [i for i, why in enumerate(reasons) if not why]
    unusable = Counter(why for why in reasons if why)
    if not usable:
        detail = ", ".join(f"{n} with {why}" for why, n in unusable.items())
        raise ValueError(
            f"mode {mode!r} has no usable dialogue among the {len(items)} items of {env_id} ({detail}); it needs "
            "dataset dialogues with a response at every turn before the last"
            + (" and a chosen/rejected pair at the last turn" if mode == "lt-offline" else "")
            + " and no more turns than the environment's longest horizon (max_turns)"
        )
    if prompt_indices is not None:
        bad = [i for i in prompt_indices if not 0 <= i < len(items) or reasons[i]]
        if bad:
            i = bad[0]
            why = reasons[i] if 0 <= i < len(items) else f"not in 0..{len(items) - 1}"
            raise ValueError(f"prompt index {i} cannot start a {mode!r} pair: {why}")
        return list(prompt_indices), len(usable), unusable
    n = len(usable) if num_prompts is None else num_prompts
    chosen: list[int] = []
    while len(chosen) < n:
        chosen.extend(rng.permutation(usable).tolist())
    return chosen[:n], len(usable), unusable


def draw_prompt_indices(mode: str, env_id: str, env_kwargs: dict[str, Any], num_prompts: int | None,
                        seed: int, allowed: Sequence[int] | None = None) -> list[int]:
    """The items an offline-roll-in collection with ``seed``, ``allowed`` and no ``prompt_indices`` would start
    from (the same draw, from a generator seeded with ``seed``): what several ranks split between them."""
    items, max_horizons = dataset_items(env_id, env_kwargs)
    return draw_items(mode, items, max_horizons, num_prompts, None, np.random.default_rng(seed), env_id, allowed)[0]


# ------------------------------------------------------------------------------ offline roll-in


def _collect_offline_roll_in(mode, env_id, env_kwargs, policy, sampling, num_prompts, seed, prompt_indices,
                             kl_logprobs, progress, penalties=None, allowed=None) -> tuple[list[dict[str, Any]], ModeStats]:
    rng = np.random.default_rng(seed)
    items, max_horizons = dataset_items(env_id, env_kwargs)
    indices, n_usable, unusable = draw_items(mode, items, max_horizons, num_prompts, prompt_indices, rng, env_id,
                                             allowed)
    n = len(indices)
    stats = ModeStats(prompts=n, mode=mode, usable_items=n_usable, unusable_items=unusable)
    if n == 0:
        return [], stats
    horizons = [items[i].num_turns for i in indices]
    turns_h = [int(rng.integers(1, H + 1)) if mode == "mt-mixed" else H for H in horizons]
    batcher = StepBatcher(env_id, env_kwargs)
    _, info = batcher.env(n).reset(seed=seed, options={
        "index": list(indices), "prefix": [items[i].prefix(h) for i, h in zip(indices, turns_h)], "horizon": horizons,
    })
    rows = [{"item_id": str(info["item_id"][k]), "h": turns_h[k], "H": horizons[k], "seed": seed} for k in range(n)]
    stats.prompts_by_h.update(turns_h)
    slots = [s for k in range(n) for s in _branch_slots(k, info["snapshot"][k], rng, rows)]
    if mode == "lt-offline":  # s_H is the last state: one step with the dataset's replies ends every branch
        for slot in slots:
            item = items[indices[slot.tuple_index]]
            slot.given = item.chosen if slot.branch == 0 else item.rejected
    total = sum(2 * (H - h + 1) for H, h in zip(horizons, turns_h))
    bar = tqdm(total=total, desc=f"collect {mode}", unit="resp", disable=not progress, leave=False)
    _run(slots, rows, batcher, policy, sampling, rng, stats, kl_logprobs, bar, penalties)
    bar.close()
    batcher.close()
    complete = [{**r, "mode": mode} for r in rows if "reward" in r and "reward_prime" in r and not r.get("dropped")]
    stats.tuples = len(complete)
    return complete, stats

