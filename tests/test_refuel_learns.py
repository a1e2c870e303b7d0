"""Evidence that REFUEL learns: a task small enough to learn on a CPU in about a minute.

The task. A 2-layer Llama with a 32-word vocabulary (its tokenizer built here, with a ChatML
template) talks for H = 2 turns with the environment's instant user; the trajectory reward is
the fraction of the policy's words that are "yes", averaged over its turns. The initial policy
says "yes" about 1 word in 32.

Pre-registered criterion (fixed before the first run): for each of the seeds 1, 2 and 3, the
mean reward of the trained policy over 16 held-out dialogues (8 prompts at H = 1 and at H = 2)
exceeds the initial policy's by at least 0.15.
"""

from __future__ import annotations

import numpy as np
import pytest

from refuel_agents.refuel import RefuelConfig, RefuelTrainer
from refuel_env.rewards import TrajectoryRewardModel

pytestmark = pytest.mark.slow

MARGIN = 0.15


class YesReward(TrajectoryRewardModel):
    """Fraction of "yes" among each response's words, averaged over the assistant's turns."""

    name = "yes-fraction"
    max_length = None

    def _score(self, dialogues):
        scores = []
        for dialogue in dialogues:
            turns = [m["content"].split() for m in dialogue if m["role"] == "assistant"]
            scores.append(float(np.mean([w.count("yes") / max(len(w), 1) for w in turns])))
        return np.asarray(scores)

    def count_tokens(self, dialogue):
        return sum(len(m["content"].split()) for m in dialogue)


def run(word_lm_dir, tmp_path, seed: int) -> tuple[float, float]:
    config = RefuelConfig(
        env_id="UltraInteractDialogue-v0", env_kwargs={"user": "instant", "max_turns": 2, "tokenizer": None},
        policy_model=str(word_lm_dir), iterations=4, prompts_per_iteration=32, epochs=2, batch_size=8,
        micro_batch_size=8, lr=3e-3, eta=1.0, max_new_tokens=6, temperature=1.0, eval_prompts=8,
        output_dir=str(tmp_path), run_name=f"seed{seed}", seed=seed, progress=False, device="cpu",
    )
    trainer = RefuelTrainer(config, reward_model=YesReward())
    before = np.mean([r["reward"] for r in trainer.evaluate()])
    trainer.train()
    after = np.mean([r["reward"] for r in trainer.evaluate()])
    return float(before), float(after)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_refuel_raises_the_reward(word_lm_dir, tmp_path, seed):
    before, after = run(word_lm_dir, tmp_path, seed)
    print(f"seed {seed}: mean reward {before:.3f} -> {after:.3f}")
    assert after >= before + MARGIN, f"seed {seed}: {before:.3f} -> {after:.3f}, below the margin {MARGIN}"
