"""SyntheticDialogue-v0: the dialogue environment on the synthetic task of :mod:`refuel_env.synthetic`.

The classes are :class:`DialogueEnv` and :class:`DialogueVectorEnv` with the synthetic task's parts
in place of the dataset, the language-model user and the reward model: the same observations,
string actions, snapshots, prefix resets, seeds and info keys.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from refuel_env.envs.dialogue import DialogueEnv
from refuel_env.envs.vector import DialogueVectorEnv
from refuel_env.spaces import Conversation, Prose
from refuel_env.synthetic import build_synthetic_core, make_synthetic_config


class SyntheticDialogueEnv(DialogueEnv):
    """
    ## Description

    The multi-turn dialogue MDP of :class:`DialogueEnv` on a task small enough to solve exactly
    (:mod:`refuel_env.synthetic`): the user says one word (``vague``, ``clear`` or ``lost``), the
    assistant's response is the move ``ask``, ``answer`` or ``hint`` when it is exactly that word
    and ``invalid`` otherwise, the user's next word is drawn from a table given the move, and after
    turn H the reward is the sum of the turns' utilities. Q^pi of the synthetic policy can be
    enumerated (:mod:`refuel_env.synthetic_exact`).

    ## Action Space

    ``Prose``: any ``str``.

    ## Observation Space

    ``Conversation``: the transcript, ending with the user's word.

    ## Rewards

    0.0 before turn H; after it, the sum over the turns of ``UTILITY[state][move]`` (minus the KL
    penalty when ``kl_coef > 0``).

    ## Starting State

    An item's first word (items follow ``START_PATTERN``), H ~ U{1..max_turns}; the reset options
    of :class:`DialogueEnv` (``index``, ``item``, ``horizon``, ``snapshot``, ``prefix``).

    ## Episode End

    Terminated after the H-th response. Never truncated.

    ## Info

    The keys of :class:`DialogueEnv`.

    ## Arguments

    ``max_turns`` (1..3), ``split`` ('train' / 'test'), ``kl_coef``; ``render_mode="ansi"``.

    ## Version History

    * v0: initial version.
    """

    def __init__(self, render_mode: str | None = None, **kwargs: Any):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.render_mode = render_mode
        self.config = make_synthetic_config(**kwargs)
        self.core = build_synthetic_core(self.config)
        self.observation_space = Conversation(max_turns=self.config.max_turns)
        self.action_space = Prose()
        self._episode = None


class SyntheticDialogueVectorEnv(DialogueVectorEnv):
    """N synthetic dialogues stepped together; see :class:`DialogueVectorEnv` for the conventions."""

    metadata = {"render_modes": ["ansi"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, render_mode: str | None = None, **kwargs: Any):
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        VectorEnv.__init__(self)
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.config = make_synthetic_config(**kwargs)
        self.core = build_synthetic_core(self.config)
        self.single_observation_space = Conversation(max_turns=self.config.max_turns)
        self.single_action_space = Prose()
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rngs: list[np.random.Generator] = [np.random.default_rng() for _ in range(num_envs)]
        self._episodes = [None] * num_envs
        self._autoreset = np.zeros(num_envs, dtype=bool)


__all__ = ["SyntheticDialogueEnv", "SyntheticDialogueVectorEnv"]
