"""The environment classes: one dialogue (DialogueEnv) and a native batch of them (DialogueVectorEnv)."""

from refuel_env.envs.dialogue import DialogueEnv
from refuel_env.envs.vector import DialogueVectorEnv

__all__ = ["DialogueEnv", "DialogueVectorEnv"]
