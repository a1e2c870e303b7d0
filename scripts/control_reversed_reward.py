"""A control for a claimed held-out improvement: the same run, trained on reversed rewards.

    python scripts/control_reversed_reward.py --agent refuel --eval-split train --run-name control
    python scripts/control_reversed_reward.py --help     # the flags of scripts/train_agent.py

It runs exactly what ``scripts/train_agent.py`` runs with the same flags, except that every
tuple's two rewards are negated where training reads them (each update's loss), so each
regression target r - r' points the other way. Everything else keeps the true rewards: the
stored tuples, ``collect/reward_mean`` and the summary's "collected" table, and the held-out
evaluation, which plays and scores with the true reward, so its summary is read as usual.

Why: a held-out improvement could come from the updates themselves rather than from the reward
they follow. With a greedy evaluation, for one, any small change of the weights changes the
greedy responses, and a policy whose greedy decoding loops at the start could improve after a
change in any direction. If the improvement follows the reward, the reversed run's held-out
change lies below the real run's; if both improve alike, the improvement is not evidence of
learning. Compare the two runs on the same split and seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_agent  # noqa: E402

from refuel_agents import baselines  # noqa: E402
from refuel_agents.refuel import RefuelTrainer  # noqa: E402


class ReversedRewardTrainer(RefuelTrainer):
    """REFUEL's updates on negated rewards (module docstring); collection logs and evaluation keep the true ones."""

    agent = "refuel-reversed-reward"

    def train_step(self, batch_rows: list[dict]) -> dict[str, float]:
        return super().train_step([{**r, "reward": -r["reward"], "reward_prime": -r["reward_prime"]} for r in batch_rows])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--agent", default="refuel")
    if first.parse_known_args(argv)[0].agent != "refuel":
        raise SystemExit("error: the control reverses REFUEL's rewards only: pass --agent refuel or no --agent")
    config_cls, _ = baselines.AGENTS["refuel"]
    baselines.AGENTS["refuel"] = (config_cls, ReversedRewardTrainer)
    train_agent.main(argv)


if __name__ == "__main__":
    main()
