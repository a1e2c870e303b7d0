"""A reward model for tests: the number of words of the last response. Cheap and deterministic, and pairs of
responses of different lengths have a reward gap (equal lengths tie)."""

from __future__ import annotations

import numpy as np

from refuel_env.rewards import TrajectoryRewardModel


class WordCountReward(TrajectoryRewardModel):
    """The number of words of the last response; tokens are counted as words."""

    name = "word-count"
    max_length = None

    def _score(self, dialogues):
        return np.asarray([float(len(d[-1]["content"].split())) for d in dialogues])

    def count_tokens(self, dialogue):
        return sum(len(m["content"].split()) for m in dialogue)
