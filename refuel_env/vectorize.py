"""Gymnasium's async mode for refuel-gym ids: workers start in a way that is safe after torch ran.

``AsyncVectorEnv`` starts its workers with the platform's default start method, which is ``fork`` on
Linux (up to Python 3.13). A forked worker inherits torch's intra-op thread pool in a state it cannot
use: once the parent has run a torch operation on several threads (any model forward), the worker's
first parallel torch operation (a reward model's forward, the simulated user's generation) waits
forever. ``forkserver`` and ``spawn`` start each worker from a process that has run no torch
operation, so this cannot happen; CUDA, which cannot be used in a forked child either, works too.

Importing :mod:`refuel_env` wraps ``gymnasium.make_vec``: for a refuel-gym id in ``"async"`` mode,
without a ``"context"`` in ``vector_kwargs``, the workers start with :data:`SAFE_START_METHOD`.
Every other call is passed on unchanged, and ``vector_kwargs={"context": "fork"}`` restores forking.
As with any start method but ``fork``, a script that makes the async env must guard its entry point
(``if __name__ == "__main__":``), and the environment's arguments are pickled to reach the workers.
"""

from __future__ import annotations

import functools
import multiprocessing
from typing import Any

import gymnasium
from gymnasium.envs import registration
from gymnasium.envs.registration import EnvSpec, VectorizeMode

SAFE_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
"""The start method of a refuel-gym id's async workers when the caller names none."""


def is_refuel_id(id: str | EnvSpec) -> bool:
    """Whether ``id`` (a name or a spec) is one of this package's environments."""
    try:
        spec = id if isinstance(id, EnvSpec) else gymnasium.spec(id)
    except Exception:  # an unknown id: gymnasium.make_vec gives its own error
        return False
    entry = spec.entry_point
    return isinstance(entry, str) and entry.startswith("refuel_env.")


def _is_async(mode: Any) -> bool:
    try:
        return mode is not None and VectorizeMode(mode) == VectorizeMode.ASYNC
    except ValueError:
        return False


def install() -> None:
    """Wrap ``gymnasium.make_vec`` (once) so that refuel-gym ids start async workers safely."""
    original = registration.make_vec
    if getattr(original, "refuel_safe_start", False):
        return

    @functools.wraps(original)
    def make_vec(
        id: str | EnvSpec,
        num_envs: int = 1,
        vectorization_mode: VectorizeMode | str | None = None,
        vector_kwargs: dict[str, Any] | None = None,
        wrappers: Any = None,
        **kwargs: Any,
    ) -> gymnasium.vector.VectorEnv:
        if _is_async(vectorization_mode) and "context" not in (vector_kwargs or {}) and is_refuel_id(id):
            vector_kwargs = {**(vector_kwargs or {}), "context": SAFE_START_METHOD}
        return original(id, num_envs, vectorization_mode, vector_kwargs, wrappers, **kwargs)

    make_vec.refuel_safe_start = True  # type: ignore[attr-defined]
    registration.make_vec = make_vec
    gymnasium.make_vec = make_vec
