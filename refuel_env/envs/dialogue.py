"""DialogueEnv: a policy talks with a simulated user and gets one reward for the whole dialogue."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from refuel_env.components import build_core, spec_config
from refuel_env.core import Episode, EpisodeError, check_seed, copy_messages, render_transcript
from refuel_env.snapshot import Snapshot
from refuel_env.spaces import Conversation, Prose


class DialogueEnv(gym.Env[list, str]):
    """
    ## Description

    Multi-turn dialogue as an MDP (the REFUEL paper, section 2). The state s_h is the
    transcript x_1, y_1, ..., x_h; the action y_h is the assistant's next message; the
    simulated user answers with x_{h+1} ~ T(. | s_h, y_h); after turn H a reward model scores
    the whole dialogue. Any state can be saved (``snapshot()``, or ``info["snapshot"]``) and
    continued from, any number of times, identically when seeded.

    ## Action Space

    ``Prose``: the assistant's message, any valid Unicode ``str`` of at most 100,000 characters;
    ``step`` refuses anything else with a ``ValueError`` (``TypeError`` for a non-str).

    ## Observation Space

    ``Conversation``: the transcript as chat messages (``{"role", "content"}``), an optional
    leading ``system`` message, then ``user`` and ``assistant`` alternating, ending with the
    user's turn. Every observation is a new list of new dicts: changing it changes nothing in the
    environment.

    ## Rewards

    0.0 after every turn before H; after turn H, the trajectory reward: the reward model's score,
    minus the KL penalty of eq. 11 when ``kl_coef > 0`` (log-probs supplied through
    ``set_logprobs``), or the constant ``truncation_penalty`` when a response hit
    ``max_response_tokens``. ``info["reward_parts"]`` holds the parts.

    ## Starting State

    A dataset item's first question (``options["index"]`` or ``options["item"]`` choose it,
    otherwise uniformly at random). H ~ U{1..max_turns}; with a pre-sampled user, H is the
    item's number of questions, capped at max_turns (as in the original release);
    ``options["horizon"]`` fixes it. Reset-to-prefix: ``options["snapshot"]`` restores a
    snapshot exactly (with a ``seed``, the user's random stream is reseeded from it instead of
    restored; no other option may come with it; a snapshot that cannot be a state of this
    environment raises ``SnapshotError``), ``options["prefix"]`` starts from a given transcript
    (e.g. s_h of a dataset dialogue), then H ~ U{h..max_turns} unless given. A reset that fails
    changes nothing, the random stream included.

    ## Episode End

    Terminated after the H-th response, with the reward. Truncated when the dialogue no longer
    fits the simulated user's or the reward model's context, or ``max_dialogue_tokens``:
    reward 0.0, ``info["truncation_reason"]`` says why. Nothing is cut silently.

    ## Info

    ``turn`` (h of the observation; H + 1 at the end), ``horizon``, ``item_id``, ``user_parsed``
    and ``user_fallback`` (for the latest user message), ``user_parse_failures`` (this episode),
    ``action_tokens``, ``response_tokens`` (all responses so far), ``user_prompt_tokens``,
    ``user_completion_tokens``, ``response_hit_length_limit``, ``snapshot``, and at the end
    ``reward_parts`` (a part that does not apply is left out) or ``truncation_reason``.

    ## Arguments

    ``preset`` and the fields of :class:`refuel_env.components.EnvConfig` (dataset, user,
    models, penalties, limits); ``render_mode="ansi"`` renders the transcript as text.

    ## Version History

    * v0: initial version.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, render_mode: str | None = None, preset: str | None = None, **kwargs: Any):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.render_mode = render_mode
        self.config = spec_config(preset, **kwargs)
        self.core = build_core(self.config)
        self.observation_space = Conversation(max_turns=self.config.max_turns)
        self.action_space = Prose()
        self._episode: Episode | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        seed = check_seed(seed)
        # A reset that fails (a bad option) leaves the environment, its random stream included, as it was.
        saved = (self._np_random, self._np_random_seed, self._np_random and self._np_random.bit_generator.state)
        try:
            super().reset(seed=seed)
            episode = self.core.new_episode(self.np_random, options, reseed=seed is not None)
        except BaseException:
            self._np_random, self._np_random_seed = saved[0], saved[1]
            if saved[0] is not None:
                saved[0].bit_generator.state = saved[2]
            raise
        self._episode = episode
        return copy_messages(episode.messages), self.core.reset_info(episode)

    def step(self, action: str):
        (result,) = self.core.advance([self._episode], [action])  # type: ignore[list-item]
        return copy_messages(self._episode.messages), result.reward, result.terminated, result.truncated, result.info  # type: ignore[union-attr]

    def snapshot(self) -> Snapshot:
        """The current state, to pass later as ``reset(options={"snapshot": ...})``."""
        if self._episode is None:
            raise EpisodeError("snapshot() called before reset(); call reset() first")
        return self.core.snapshot(self._episode)

    def set_logprobs(self, policy: float, reference: float) -> None:
        """Log-probs of the next action under the policy and the reference (for the KL penalty)."""
        if self._episode is None:
            raise EpisodeError("set_logprobs() called before reset(); call reset() first")
        self.core.set_logprobs(self._episode, policy, reference)

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self._episode is None:
            return None
        ep = self._episode
        header = f"== {ep.item.item_id}  turn {min(ep.turn, ep.horizon)}/{ep.horizon} ==\n"
        return header + render_transcript(ep.messages)
