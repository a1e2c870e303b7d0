"""Gymnasium spaces for prose: an assistant message and a conversation.

``gymnasium.spaces.Text`` checks every character against a fixed charset (alphanumerics by
default), so ordinary prose with punctuation, newlines or non-ASCII letters is not "contained".
These spaces hold what the environment really exchanges: any ``str`` up to a length, and a chat
transcript whose roles alternate and which ends with the user's turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import batch_space

_WORDS = (
    "the a of to and is in that it for you can how what why which number function proof list value "
    "answer question step first then next because so if not we total sum prime string python loop "
    "café naïve über 3 42 x² π = + - ( )"
).split()
_PUNCT = (".", ",", "?", "!", ":", ";", "\n", " —")


def _random_prose(rng: np.random.Generator, max_chars: int) -> str:
    words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(1, 24)))]
    pieces = []
    for w in words:
        pieces.append(w)
        pieces.append(str(rng.choice(_PUNCT)) + " " if rng.random() < 0.15 else " ")
    return "".join(pieces).strip()[:max_chars]


class Prose(spaces.Space[str]):
    """Any Python ``str`` of at most ``max_chars`` characters (empty allowed)."""

    def __init__(self, max_chars: int = 100_000, seed: int | np.random.Generator | None = None):
        self.max_chars = int(max_chars)
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_chars

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        return _random_prose(self.np_random, self.max_chars)

    def __repr__(self) -> str:
        return f"Prose(max_chars={self.max_chars})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Prose) and other.max_chars == self.max_chars


def conversation_problem(messages: Any, *, end_role: str | None = "user") -> str | None:
    """Why ``messages`` is not a valid transcript, or None when it is.

    Valid: a list of ``{"role", "content"}`` dicts with str content, an optional leading system
    message, then user and assistant turns alternating from the user, ending with ``end_role``.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        return f"expected a list of messages, got {type(messages).__name__}"
    turns = list(messages)
    if turns and isinstance(turns[0], dict) and turns[0].get("role") == "system":
        turns = turns[1:]
    if not turns:
        return "it has no user message"
    for i, m in enumerate(turns):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            return f"turn {i} is not a dict with exactly the keys 'role' and 'content': {m!r:.100}"
        if not isinstance(m["content"], str):
            return f"turn {i} has {type(m['content']).__name__} content, not str"
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            return f"roles must alternate user/assistant from the first turn; turn {i} is {m['role']!r}, expected {expected!r}"
    if end_role is not None and turns[-1]["role"] != end_role:
        return f"it must end with a {end_role} message, but ends with {turns[-1]['role']!r}"
    return None


class Conversation(spaces.Space[list]):
    """A chat transcript: alternating user/assistant messages from the user's first turn.

    A state s_h ends with the user's turn; the last observation of an episode, s_{H+1}, ends
    with the assistant's final response, so both endings are contained.
    """

    def __init__(self, max_turns: int = 5, max_chars: int = 100_000, seed: int | np.random.Generator | None = None):
        self.max_turns = int(max_turns)
        self.max_chars = int(max_chars)
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def contains(self, x: Any) -> bool:
        if conversation_problem(x, end_role=None) is not None:
            return False
        turns = [m for m in x if m["role"] != "system"]
        return (len(turns) + 1) // 2 <= self.max_turns and all(len(m["content"]) <= self.max_chars for m in x)

    def sample(self, mask: Any = None, probability: Any = None) -> list[dict[str, str]]:
        h = int(self.np_random.integers(1, self.max_turns + 1))
        return [
            {"role": "user" if i % 2 == 0 else "assistant", "content": _random_prose(self.np_random, self.max_chars)}
            for i in range(2 * h - 1)
        ]

    def __repr__(self) -> str:
        return f"Conversation(max_turns={self.max_turns}, max_chars={self.max_chars})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Conversation) and (other.max_turns, other.max_chars) == (
            self.max_turns,
            self.max_chars,
        )


@batch_space.register(Prose)
@batch_space.register(Conversation)
def _batch_prose(space: spaces.Space, n: int = 1) -> spaces.Tuple:
    return spaces.Tuple([space] * n)
