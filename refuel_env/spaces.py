"""Gymnasium spaces for prose: an assistant message and a conversation.

``gymnasium.spaces.Text`` checks every character against a fixed charset (alphanumerics by
default), so ordinary prose with punctuation, newlines or non-ASCII letters is not "contained".
These spaces hold what the environment really exchanges: any valid Unicode ``str`` up to a length
(a lone surrogate such as ``"\ud800"`` is not text: it cannot be encoded, so no tokenizer reads
it), and a chat transcript whose roles alternate and which ends with the user's turn.

Both spaces support ``AsyncVectorEnv``'s shared memory: each sub-environment gets a buffer as large
as the space's largest element (about 4.4 MB for a conversation of 5 turns of 100,000 characters)
and the observation is pickled into it (see :class:`SharedObservations`).
"""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import (
    batch_space,
    create_shared_memory,
    iterate,
    read_from_shared_memory,
    write_to_shared_memory,
)

MAX_CHARS = 100_000
"""Longest message, in characters, that the spaces contain (and the environments accept)."""


def text_problem(text: Any, max_chars: int = MAX_CHARS) -> str | None:
    """Why ``text`` is not a message the spaces contain, or None when it is one."""
    if not isinstance(text, str):
        return f"expected a str, got {type(text).__name__}"
    if len(text) > max_chars:
        return f"it has {len(text):,} characters, more than the {max_chars:,} the space allows"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            return (
                f"it is not valid Unicode: {text[err.start:err.end]!r} at position {err.start} is a lone "
                "surrogate, which no tokenizer can read; pass text that encodes as UTF-8"
            )
    return None

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
    """Any valid Unicode ``str`` of at most ``max_chars`` characters (empty allowed)."""

    def __init__(self, max_chars: int = MAX_CHARS, seed: int | np.random.Generator | None = None):
        self.max_chars = int(max_chars)
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def contains(self, x: Any) -> bool:
        return text_problem(x, self.max_chars) is None

    @property
    def max_pickled_bytes(self) -> int:
        """An upper bound on the pickled size of an element (UTF-8 uses at most 4 bytes a character)."""
        return _with_margin(4 * self.max_chars)

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        return _random_prose(self.np_random, self.max_chars)

    def __repr__(self) -> str:
        return f"Prose(max_chars={self.max_chars})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Prose) and other.max_chars == self.max_chars


def _with_margin(payload_bytes: int) -> int:
    """Room for pickle's opcodes and frame headers around ``payload_bytes`` of UTF-8 text."""
    return payload_bytes + payload_bytes // 100 + 4096


def conversation_problem(
    messages: Any, *, end_role: str | None = "user", max_chars: int | None = MAX_CHARS
) -> str | None:
    """Why ``messages`` is not a valid transcript, or None when it is.

    Valid: a list of ``{"role", "content"}`` dicts with str content, an optional leading system
    message, then user and assistant turns alternating from the user, ending with ``end_role``.
    Each content must be valid Unicode of at most ``max_chars`` characters (None: any length).
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        return f"expected a list of messages, got {type(messages).__name__}"
    turns = list(messages)
    if turns and isinstance(turns[0], dict) and turns[0].get("role") == "system":
        system = turns[0]
        if set(system) != {"role", "content"} or not isinstance(system["content"], str):
            return f"the system message is not a dict with exactly the keys 'role' and 'content' and str content: {system!r:.100}"
        problem = text_problem(system["content"], max_chars if max_chars is not None else len(system["content"]))
        if problem:
            return f"the system message's content: {problem}"
        turns = turns[1:]
    if not turns:
        return "it has no user message"
    for i, m in enumerate(turns):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            return f"turn {i} is not a dict with exactly the keys 'role' and 'content': {m!r:.100}"
        if not isinstance(m["content"], str):
            return f"turn {i} has {type(m['content']).__name__} content, not str"
        problem = text_problem(m["content"], max_chars if max_chars is not None else len(m["content"]))
        if problem:
            return f"turn {i}'s content: {problem}"
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

    def __init__(self, max_turns: int = 5, max_chars: int = MAX_CHARS, seed: int | np.random.Generator | None = None):
        self.max_turns = int(max_turns)
        self.max_chars = int(max_chars)
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def contains(self, x: Any) -> bool:
        if conversation_problem(x, end_role=None, max_chars=self.max_chars) is not None:
            return False
        turns = [m for m in x if m["role"] != "system"]
        return (len(turns) + 1) // 2 <= self.max_turns

    @property
    def max_pickled_bytes(self) -> int:
        """An upper bound on the pickled size of an element: 2 * max_turns + 1 messages (a system one)."""
        return _with_margin((2 * self.max_turns + 1) * (4 * self.max_chars + 128))

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


class Batch(spaces.Tuple):
    """N copies of a :class:`Prose` or :class:`Conversation` space: the batched space of a vector env.

    Gymnasium's ``SyncVectorEnv.step`` and ``AsyncVectorEnv.step_async`` iterate over the batch of
    actions (``gymnasium.vector.utils.iterate``) before any sub-environment steps. Iterating over a
    ``Batch`` checks every element first and refuses the whole batch (``ValueError``, or ``TypeError``
    for a non-str) when one is outside the space or the count is wrong, so a refused step changes no
    sub-environment in any vectorization mode.
    """

    def __init__(self, space: Prose | Conversation, n: int, seed: int | np.random.Generator | None = None):
        super().__init__([space] * n, seed=seed)


def batch_problem(space: Batch, items: Any, what: str = "action") -> tuple[type[Exception], str] | None:
    """Why ``items`` is not an element of ``space`` (the error type and message), or None."""
    n = len(space.spaces)
    if isinstance(items, str | bytes) or not isinstance(items, Sequence | np.ndarray) or len(items) != n:
        return ValueError, f"step() takes a sequence of {n} {what}s (one per sub-environment), got {items!r:.80}"
    for i, (sub, item) in enumerate(zip(space.spaces, items)):
        if isinstance(sub, Prose):
            if not isinstance(item, str):
                return TypeError, f"env {i}: the {what} must be the assistant's message as a str, got {type(item).__name__}"
            problem = text_problem(item, sub.max_chars)
        else:
            problem = None if sub.contains(item) else f"it is not an element of {sub!r}"
        if problem:
            return ValueError, f"env {i}: the {what} is outside the {what} space ({type(sub).__name__}): {problem}"
    return None


@batch_space.register(Prose)
@batch_space.register(Conversation)
def _batch_prose(space: Prose | Conversation, n: int = 1) -> Batch:
    return Batch(space, n)


@iterate.register(Batch)
def _iterate_checked(space: Batch, items: Any):
    problem = batch_problem(space, items)
    if problem:
        error, message = problem
        raise error(message)
    return iter(list(items))


# ------------------------------------------------------------------ AsyncVectorEnv shared memory

_LENGTH_BYTES = 8


@create_shared_memory.register(Prose)
@create_shared_memory.register(Conversation)
def _create_prose_shared_memory(space: Prose | Conversation, n: int = 1, ctx: ModuleType = multiprocessing) -> Any:
    return ctx.Array("B", n * (_LENGTH_BYTES + space.max_pickled_bytes))


class SharedObservations(Sequence):
    """The observations of every sub-environment, read from their shared buffers when indexed.

    ``AsyncVectorEnv`` reads its shared memory once and returns this object (a deep copy of it,
    unless ``copy=False``); a deep copy is a plain tuple of the current observations.
    """

    def __init__(self, space: Prose | Conversation, shared_memory: Any, n: int):
        self.space, self.shared_memory, self.n = space, shared_memory, n
        self.slot = _LENGTH_BYTES + space.max_pickled_bytes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(self.n)))
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} is out of range for {self.n} sub-environments")
        buffer = memoryview(self.shared_memory.get_obj()).cast("B")
        start = (index % self.n) * self.slot
        size = int.from_bytes(buffer[start : start + _LENGTH_BYTES], "little")
        if size == 0:
            return None  # nothing written yet (before the first reset)
        return pickle.loads(buffer[start + _LENGTH_BYTES : start + _LENGTH_BYTES + size])

    def __deepcopy__(self, memo: dict) -> tuple:
        return tuple(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    def __repr__(self) -> str:
        return f"SharedObservations({tuple(self)!r})"


@read_from_shared_memory.register(Prose)
@read_from_shared_memory.register(Conversation)
def _read_prose_from_shared_memory(space: Prose | Conversation, shared_memory: Any, n: int = 1) -> SharedObservations:
    return SharedObservations(space, shared_memory, n)


@write_to_shared_memory.register(Prose)
@write_to_shared_memory.register(Conversation)
def _write_prose_to_shared_memory(space: Prose | Conversation, index: int, value: Any, shared_memory: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > space.max_pickled_bytes:
        raise ValueError(
            f"the observation of sub-environment {index} takes {len(data):,} bytes pickled, more than "
            f"{space!r} allows ({space.max_pickled_bytes:,}); it is not an element of the space"
        )
    slot = _LENGTH_BYTES + space.max_pickled_bytes
    buffer = memoryview(shared_memory.get_obj()).cast("B")
    start = index * slot
    buffer[start + _LENGTH_BYTES : start + _LENGTH_BYTES + len(data)] = data
    buffer[start : start + _LENGTH_BYTES] = len(data).to_bytes(_LENGTH_BYTES, "little")
