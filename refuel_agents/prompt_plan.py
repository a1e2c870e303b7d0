"""Which prompts a run collects on, iteration by iteration, with which seeds, and which it holds out.

:func:`iteration_prompts` walks a split without replacement across iterations; :class:`PromptPlan`
applies it to the items training may use (the held-out ones and their near-duplicates excluded);
:func:`iteration_seed` gives each iteration's collection its seed.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np


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


class PromptPlan:
    """Which dataset items a run trains on, iteration by iteration, and which it holds out.

    Training walks its items of the train split (:func:`iteration_prompts`): all of them when
    ``eval_split`` is 'test' (the held-out prompts are then the test split's first ``eval_prompts``);
    with 'train', the split less ``eval_prompts`` held-out items and every item that shares a
    ``parent_id`` or a first user message with one (:func:`refuel_agents.heldout.split_train`).
    ``iterations=0`` means one pass over the items training walks. Split sizes are read from the
    environment once.
    """

    def __init__(self, env_id: str, env_kwargs: dict[str, Any], seed: int, per_iteration: int, iterations: int,
                 eval_split: str = "test", eval_prompts: int = 0):
        self.env_id, self.env_kwargs, self.seed = env_id, env_kwargs, seed
        self.per_iteration, self.eval_split, self.eval_prompts = per_iteration, eval_split, eval_prompts
        self._iterations, self._sizes = iterations, {}
        self._horizons: list[int] | None = None
        self._train_split: tuple[list[int], list[int]] | None = None

    def _items(self, split: str) -> list[Any]:
        env = gym.make(self.env_id, **{**self.env_kwargs, "split": split})
        try:
            return list(env.unwrapped.core.items)
        finally:
            env.close()

    def split_size(self, split: str = "train") -> int:
        if split not in self._sizes:
            self._sizes[split] = len(self._items(split))
        return self._sizes[split]

    def training_indices(self) -> list[int]:
        """The train split's items that training may use (every data mode draws from these only)."""
        if self.eval_split != "train" or self.eval_prompts <= 0:
            return list(range(self.split_size()))
        return list(self._split_train()[1])

    def _split_train(self) -> tuple[list[int], list[int]]:
        from refuel_agents.heldout import heldout_prompts, item_keys, split_train

        if self._train_split is None:
            heldout_prompts("train", self.eval_prompts, self.split_size())  # the split's size first: a clear error
            self._train_split = split_train([item_keys(item) for item in self._items("train")], self.eval_prompts)
        return self._train_split

    @property
    def train_items(self) -> int:
        return len(self.training_indices())

    @property
    def iterations(self) -> int:
        """T: as configured, or (``iterations=0``) as many as one pass over the training items takes."""
        per = self.per_iteration
        return self._iterations or (math.ceil(self.train_items / per) if per else 1)

    def prompts(self, iteration: int) -> list[int]:
        """The dataset items of iteration ``iteration`` (:func:`iteration_prompts` over :meth:`training_indices`)."""
        training = self.training_indices()
        return [training[i] for i in iteration_prompts(self.seed, len(training), iteration, self.per_iteration)]

    def heldout(self) -> list[int]:
        """The held-out prompts' indices in ``eval_split``; a clear error when the split is too small."""
        from refuel_agents.heldout import heldout_prompts

        if self.eval_split == "train" and self.eval_prompts > 0:
            return list(self._split_train()[0])
        return heldout_prompts(self.eval_split, self.eval_prompts, self.split_size(self.eval_split))

    def heldout_horizons(self) -> list[int]:
        """The longest dialogue length H each held-out prompt allows (its turns, for pre-sampled questions)."""
        if self._horizons is None:
            env = gym.make(self.env_id, **{**self.env_kwargs, "split": self.eval_split})
            try:
                core = env.unwrapped.core
                self._horizons = [int(core.max_horizon(core.items[i])) for i in self.heldout()]
            finally:
                env.close()
        return list(self._horizons)


def iteration_seed(seed: int, iteration: int) -> int:
    """The collection seed of an iteration. Sub-environment i is seeded with this + i, so
    iterations' seeds must be far apart, or consecutive iterations would draw the same prompts."""
    return int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0] % 2**31)
