"""refuel-gym's environment: multi-turn dialogue with a simulated user and a trajectory reward.

Importing this package registers the environment ids with Gymnasium::

    import gymnasium as gym
    import refuel_env  # noqa: F401  (or: gym.make("refuel_env:UltraInteractDialogue-v0"))

    env = gym.make("UltraInteractDialogue-v0")
    vec = gym.make_vec("UltraInteractDialogue-v0", num_envs=8, vectorization_mode="vector_entry_point")
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from refuel_env import vectorize

CONFIG_DEFAULTS = {
    "data_source": "sample", "split": "train", "max_turns": 5, "user_model": "embedded", "user_backend": "transformers",
    "user_tensor_parallel_size": 1, "user_vllm_kwargs": None, "user_base_url": None, "user_openai_kwargs": None,
    "user_prompt_style": None, "user_device": None, "user_temperature": 0.8, "user_max_new_tokens": None,
    "reward_model": "embedded", "reward_device": None, "kl_coef": 0.0, "truncation_penalty": None,
    "tokenizer": "embedded", "max_response_tokens": None, "max_dialogue_tokens": None, "data_filters": None,
}
"""The defaults of ``refuel_env.components.EnvConfig`` (a test keeps them equal), registered with every id
so that ``gym.spec(id).kwargs`` shows the whole configuration an id makes."""

SYNTHETIC_DEFAULTS = {"max_turns": 3, "split": "train", "kl_coef": 0.0, "behaviour": "mixed"}
"""The defaults of ``refuel_env.synthetic.SyntheticEnvConfig``."""

ENV_IDS = {
    # Setting one: an LLM plays the user, starting from UltraInteract prompts.
    "UltraInteractDialogue-v0": {"dataset": "ultrainteract", "user": "llm"},
    # Setting two: the user's questions are pre-sampled from the dataset dialogue.
    "UltraInteractPresampled-v0": {"dataset": "ultrainteract", "user": "presampled"},
    "AnthropicHHPresampled-v0": {"dataset": "anthropic_hh", "user": "presampled"},
}

# A small task with exactly computable Q-values, for checking algorithms (refuel_env.synthetic).
SYNTHETIC_ENV_IDS = {
    "SyntheticDialogue-v0": ("refuel_env.envs.synthetic:SyntheticDialogueEnv",
                             "refuel_env.envs.synthetic:SyntheticDialogueVectorEnv"),
}


def register_envs() -> None:
    """Register every refuel-gym id (idempotent)."""
    for env_id, kwargs in ENV_IDS.items():
        if env_id in registry:
            continue
        register(
            id=env_id,
            entry_point="refuel_env.envs.dialogue:DialogueEnv",
            vector_entry_point="refuel_env.envs.vector:DialogueVectorEnv",
            kwargs={**kwargs, **CONFIG_DEFAULTS},
            nondeterministic=False,
        )
    for env_id, (entry_point, vector_entry_point) in SYNTHETIC_ENV_IDS.items():
        if env_id not in registry:
            register(id=env_id, entry_point=entry_point, vector_entry_point=vector_entry_point,
                     kwargs=dict(SYNTHETIC_DEFAULTS), nondeterministic=False)


register_envs()
vectorize.install()  # async workers of refuel-gym ids start safely after torch ran (see refuel_env.vectorize)

__all__ = ["CONFIG_DEFAULTS", "ENV_IDS", "SYNTHETIC_DEFAULTS", "SYNTHETIC_ENV_IDS", "register_envs"]
