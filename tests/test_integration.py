"""The real embedded default: SmolLM2-135M-Instruct as the user, all-MiniLM-L6-v2 as the reward."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import refuel_env  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def test_default_env_plays_one_short_dialogue():
    env = gym.make("UltraInteractDialogue-v0")  # no arguments: the embedded default
    obs, info = env.reset(seed=0, options={"horizon": 2})
    assert info["turn"] == 1 and obs[0]["role"] == "user"
    obs, reward, terminated, truncated, info = env.step("Let me work through it: the answer is 42.")
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert obs[-1]["role"] == "user" and obs[-1]["content"].strip()
    assert info["user_completion_tokens"] > 0 and info["user_raw_output"]
    obs, reward, terminated, truncated, info = env.step("To check: 6 * 7 = 42, so the answer stands.")
    assert terminated and not truncated and np.isfinite(reward)
    assert reward == info["reward_parts"]["model_score"]
    env.close()


def test_demo_script_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo_env.py"), "--num-dialogues", "2", "--horizon", "2",
         "--max-new-tokens", "24"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 dialogues of 2 turns" in result.stdout and "reward: mean" in result.stdout
