"""Snapshots: an immutable, picklable copy of everything needed to continue a dialogue exactly."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refuel_env.types import DialogueItem, Message


class SnapshotError(ValueError):
    """A snapshot that cannot be restored into this environment."""


def canonical(value: Any) -> Any:
    """``value`` in a form whose ``repr`` is equal exactly when the values are equal as arguments.

    Numbers compare by value (``0``, ``0.0`` and ``np.float64(0)`` are alike; ``np.int64(5)`` is
    ``5``), dicts by their items in sorted order, lists and tuples by their elements; an object with
    a ``name`` (a model) by its name.
    """
    if value is None or isinstance(value, bool | np.bool_ | str):
        return bool(value) if isinstance(value, np.bool_) else value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        number = float(value)
        return int(number) if math.isfinite(number) and number.is_integer() else number
    if isinstance(value, Mapping):
        return tuple(sorted(((canonical(k), canonical(v)) for k, v in value.items()), key=repr))
    if isinstance(value, list | tuple):
        return tuple(canonical(v) for v in value)
    return getattr(value, "name", value)


def config_digest(tag: str, config: Mapping[str, Any]) -> str:
    """A short digest of an environment configuration; equal arguments give equal digests."""
    return hashlib.sha1(repr((tag, canonical(config))).encode()).hexdigest()[:16]


def rng_state(rng: np.random.Generator) -> tuple:
    """The state of a PCG64 generator as a hashable tuple."""
    state = rng.bit_generator.state
    if state["bit_generator"] != "PCG64":
        raise SnapshotError(f"only PCG64 generators can be snapshotted, got {state['bit_generator']}")
    inner = state["state"]
    return (inner["state"], inner["inc"], state["has_uint32"], state["uinteger"])


def rng_state_problem(state: object) -> str | None:
    """Why ``state`` is not a PCG64 state as :func:`rng_state` writes it, or None when it is one."""
    if not isinstance(state, tuple) or len(state) != 4:
        return f"rng_state must be a tuple (state, inc, has_uint32, uinteger), got {state!r:.80}"
    names = ("state", "inc", "has_uint32", "uinteger")
    limits = (2**128, 2**128, 2, 2**32)
    for name, value, limit in zip(names, state, limits):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value < limit:
            return f"rng_state's {name} must be an int in 0..{limit - 1}, got {value!r:.80}"
    return None


def rng_from_state(state: tuple) -> np.random.Generator:
    problem = rng_state_problem(state)
    if problem:
        raise SnapshotError(f"this snapshot's random state cannot be restored: {problem}")
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": state[0], "inc": state[1]},
        "has_uint32": state[2],
        "uinteger": state[3],
    }
    return rng


@dataclass(frozen=True)
class Snapshot:
    """The state s_h of one episode, to be restored with ``reset(options={"snapshot": snap})``.

    ``turn`` is h (the observation asks for y_h), ``horizon`` is H. ``rng_state`` is the state of
    the episode's own random generator, from which the simulated user's per-turn seeds are drawn,
    so restoring a snapshot replays the user exactly. ``config_id`` names the environment
    configuration the snapshot belongs to. The remaining fields are the episode's running
    totals, which the reward needs at the end.
    """

    config_id: str
    item: DialogueItem
    message_pairs: tuple[tuple[str, str], ...]
    turn: int
    horizon: int
    rng_state: tuple
    user_parse_failures: int = 0
    hit_length_limit: bool = False
    response_tokens: tuple[int, ...] = ()
    policy_logprob: float = 0.0
    reference_logprob: float = 0.0
    logprob_turns: int = 0
    done: bool = False
    extra: tuple[tuple[str, str], ...] = field(default=())

    @property
    def messages(self) -> list[Message]:
        """The transcript as a fresh list of chat messages."""
        return [{"role": role, "content": content} for role, content in self.message_pairs]  # type: ignore[typeddict-item]
