"""A stateful property test of every environment id: any sequence of resets, steps, snapshots,
restores, bad actions and changes to the returned observations keeps the environment consistent.

Checked after every rule: observations lie in the observation space; changing a returned
observation changes nothing in the environment; a refused action changes nothing; the same action
from the same snapshot always gives the same outcome (restoring is exact); ``info["snapshot"]`` is
the environment's state; stepping a finished episode is an error. The reward is a cheap one (the
last response's length) and the LLM user a tiny random Llama, so the whole test takes seconds.
"""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

import refuel_env
from refuel_env.core import EpisodeError
from refuel_env.rewards import TrajectoryRewardModel

ALL_IDS = sorted([*refuel_env.ENV_IDS, *refuel_env.SYNTHETIC_ENV_IDS])
ACTIONS = st.one_of(st.sampled_from(["ask", "answer", "hint", "", "  answer "]), st.text(max_size=30))
BAD_ACTIONS = st.sampled_from(["x" * 100_001, "fine \ud800", 42, None])


class LengthReward(TrajectoryRewardModel):
    """A cheap reward: the last response's length in characters."""

    name = "length"
    max_length = None

    def _score(self, dialogues):
        return np.array([float(len(d[-1]["content"])) for d in dialogues])

    def count_tokens(self, dialogue):
        return sum(len(m["content"]) for m in dialogue)


def machine_for(env):
    """A state machine class driving ``env``; outcomes are remembered across its examples."""
    seen: dict[tuple, tuple] = {}
    items = env.core.items

    class EnvMachine(RuleBasedStateMachine):
        snapshots = Bundle("snapshots")

        def __init__(self):
            super().__init__()
            self.done = True

        def _reset(self, seed, options):
            obs, info = env.reset(seed=seed, options=options)
            assert env.observation_space.contains(obs)
            assert info["snapshot"] == env.snapshot()
            self.done = False
            return obs

        @initialize(seed=st.integers(0, 2**32 - 1))
        def start(self, seed):
            self._reset(seed, None)

        @rule(seed=st.none() | st.integers(0, 2**16), index=st.none() | st.integers(0, 10_000), horizon=st.integers(1, 5))
        def reset(self, seed, index, horizon):
            options = {}
            if index is not None:
                options["index"] = index % len(items)
                options["horizon"] = 1 + (horizon - 1) % env.core.max_horizon(items[options["index"]])
            self._reset(seed, options)

        @precondition(lambda self: not self.done)
        @rule(action=ACTIONS)
        def step(self, action):
            before = env.snapshot()
            obs, reward, terminated, truncated, info = env.step(action)
            outcome = (copy.deepcopy(obs), reward, terminated, truncated)
            key = (before, action)
            assert seen.setdefault(key, outcome) == outcome, "the same action from the same state gave another outcome"
            assert env.observation_space.contains(obs)
            assert np.isfinite(reward)
            after = env.snapshot()
            assert info["snapshot"] == after
            obs[0]["content"] = "changed by the caller"
            obs[-1]["role"] = "system"
            obs.append({"role": "user", "content": "appended by the caller"})
            assert env.snapshot() == after, "changing the returned observation changed the environment"
            self.done = terminated or truncated

        @precondition(lambda self: not self.done)
        @rule(target=snapshots)
        def take_snapshot(self):
            return env.snapshot()

        @rule(snap=snapshots, seed=st.none() | st.integers(0, 2**16))
        def restore(self, snap, seed):
            obs = self._reset(seed, {"snapshot": snap})
            assert obs == snap.messages
            if seed is None:
                assert env.snapshot() == snap

        @precondition(lambda self: not self.done)
        @rule(action=BAD_ACTIONS)
        def bad_action(self, action):
            before = env.snapshot()
            with pytest.raises((ValueError, TypeError), match="action"):
                env.step(action)
            assert env.snapshot() == before

        @precondition(lambda self: self.done)
        @rule(action=ACTIONS)
        def step_after_the_end(self, action):
            with pytest.raises(EpisodeError, match="after the episode ended"):
                env.step(action)

    return EnvMachine


@pytest.fixture(scope="module")
def envs(tiny_lm_dir):
    made = {}
    for env_id in ALL_IDS:
        kwargs = {} if env_id in refuel_env.SYNTHETIC_ENV_IDS else {"reward_model": LengthReward()}
        if env_id == "UltraInteractDialogue-v0":
            kwargs.update(user_model=str(tiny_lm_dir), user_max_new_tokens=4, user_device="cpu", max_turns=3)
        made[env_id] = gym.make(env_id, disable_env_checker=True, **kwargs).unwrapped
    return made


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_reset_step_snapshot_restore_stay_consistent(envs, env_id):
    run_state_machine_as_test(
        machine_for(envs[env_id]),
        settings=settings(
            max_examples=12,
            stateful_step_count=12,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
