"""Plain data types shared by every part of the environment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypedDict


class Message(TypedDict):
    """One chat message, as chat templates take it."""

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class DialogueItem:
    """One dataset dialogue that starts an episode.

    ``questions`` are the user turns x_1..x_K in order; setting one uses only ``questions[0]``
    (the simulated user writes the rest), setting two asks them all, pre-sampled.
    ``responses`` are the dataset's assistant turns y_1..y_K (``None`` where the dataset has none),
    used by the offline roll-ins. ``chosen`` / ``rejected`` are the dataset's preferred and
    dispreferred last responses, where it has them.
    """

    item_id: str
    source: str
    questions: tuple[str, ...]
    responses: tuple[str | None, ...] = ()
    system: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    task: str = ""
    meta: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.questions:
            raise ValueError(f"item {self.item_id!r} has no user question")
        if self.responses and len(self.responses) != len(self.questions):
            raise ValueError(
                f"item {self.item_id!r} has {len(self.questions)} questions but "
                f"{len(self.responses)} responses; they must pair up turn by turn"
            )

    @property
    def num_turns(self) -> int:
        return len(self.questions)

    def prefix(self, turn: int) -> list[Message]:
        """The dataset state s_turn: x_1, y_1, ..., x_turn (1-based), for offline roll-ins."""
        if not 1 <= turn <= self.num_turns:
            raise ValueError(f"turn must be in 1..{self.num_turns}, got {turn}")
        if turn > 1 and (len(self.responses) < turn - 1 or any(r is None for r in self.responses[: turn - 1])):
            raise ValueError(f"item {self.item_id!r} has no dataset responses before turn {turn}")
        messages: list[Message] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        for h in range(turn - 1):
            messages.append({"role": "user", "content": self.questions[h]})
            messages.append({"role": "assistant", "content": self.responses[h]})  # type: ignore[typeddict-item]
        messages.append({"role": "user", "content": self.questions[turn - 1]})
        return messages
