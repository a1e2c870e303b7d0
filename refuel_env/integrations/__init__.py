"""Bridges from refuel-gym's environments to training libraries.

Each bridge imports its library only when used, so ``refuel_env`` imports without it:

* :mod:`refuel_env.integrations.trl`: a ``rollout_func`` for TRL's ``GRPOTrainer`` that plays
  whole dialogues against any registered id (docs/trl.md).
"""
