"""Simulated users: the transition x_{h+1} ~ T(. | s_h, y_h).

Two kinds, one interface (:class:`UserSimulator`), both batched:

* :class:`LLMUser` (setting one): a language model reads the dialogue and writes the user's next
  question. Prompt style ``"paper"`` is the prompt of the paper's appendix C.2 (a justification
  line, then a ``Question:`` line), meant for a strong instruction-following model such as
  Llama-3.1-70B-Instruct. Prompt style ``"role-swap"`` suits small models, which tend to answer
  as an assistant whatever the persona prompt says: the dialogue is shown with the roles swapped
  (the user's past turns become the model's own turns) and a short cue asking for the next
  question ends the last response, so that the next assistant message the model writes is the
  user's next question.
* :class:`PresampledUser` (setting two): the questions were fixed in advance by the dataset
  dialogue and do not depend on the responses.

Parsing and its fallback. ``"paper"`` output parses when it has a ``Question:`` line with text
after it; ``"role-swap"`` output parses when it contains a question mark (the question is the
text up to the first one, a leading ``Question:`` removed). When parsing fails, the user asks
the last sentence of the output that ends in ``?`` if there is one, and otherwise
:data:`FALLBACK_QUESTION`. Either way the turn is flagged ``parsed=False`` (the environment
reports it in ``info["user_parsed"]`` and counts it in ``info["user_parse_failures"]``).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from refuel_env.generation import SamplingParams, TextGenerator
from refuel_env.types import DialogueItem, Message

FALLBACK_QUESTION = "Could you explain your last answer in more detail?"

# The prompt of the paper's appendix C.2 (a configuration fact of the paper's simulator).
PAPER_USER_PROMPT = """Below is a dialogue between the user and the assistant. Pretend you are the user in this conversation. What question would you ask next?

### Dialogue:
{dialogue}

### Instructions:
FIRST provide a justification of the question you want to ask.
SECOND, on a new line, state only the question. Your response should use the format:
Justification: <one-sentence justification>
Question: <question to ask next>"""

ROLE_SWAP_SYSTEM = (
    "You are a curious person chatting with an AI assistant about a problem you care about. "
    "Read the assistant's last answer and reply with one short follow-up question about it. "
    "Write only the question, ending with a question mark."
)

# Appended to the last (swapped) assistant response: small models follow a cue at the end of the
# conversation far more often than a system prompt alone (measured on SmolLM2-135M-Instruct:
# 8 of 12 outputs contained a question with the cue, 2 of 12 without).
ROLE_SWAP_CUE = "What would you like to ask me next? Reply with one short question."

PromptStyle = Literal["paper", "role-swap"]

_QUESTION_LINE = re.compile(r"^\W*question\W*:\s*(.*)$", re.IGNORECASE | re.MULTILINE)
_QUESTION_SENTENCE = re.compile(r"[^.!?\n]*\?")


@dataclass(frozen=True)
class UserRequest:
    """What a user simulator needs to write x_{h+1}: the dialogue so far (ending with y_h)."""

    messages: tuple[Message, ...]
    item: DialogueItem
    turn: int  # h: the number of assistant turns in ``messages``
    seed: int


@dataclass(frozen=True)
class UserTurn:
    """The user's next message and how it was obtained."""

    text: str
    parsed: bool
    raw: str
    fallback: Literal["", "question_sentence", "generic"] = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


def parse_user_output(raw: str, style: PromptStyle = "paper") -> UserTurn:
    """Extract the user's next question from a simulator's raw output (see the module doc)."""
    question = ""
    if style == "paper":
        matches = _QUESTION_LINE.findall(raw)
        if matches:
            question = _clean(matches[-1])
    else:
        text = _QUESTION_LINE.sub(r"\1", raw.strip())
        if "?" in text:
            question = _clean(text[: text.index("?") + 1])
    if question:
        return UserTurn(text=question, parsed=True, raw=raw)
    sentences = [s.strip() for s in _QUESTION_SENTENCE.findall(raw) if len(s.strip()) > 1]
    if sentences:
        return UserTurn(text=_clean(sentences[-1]), parsed=False, raw=raw, fallback="question_sentence")
    return UserTurn(text=FALLBACK_QUESTION, parsed=False, raw=raw, fallback="generic")


def _clean(text: str) -> str:
    return text.strip().strip("*_`\"' ").strip()


def format_dialogue(messages: Sequence[Message]) -> str:
    """The dialogue as ``User: ...`` / ``Assistant: ...`` paragraphs (system messages left out)."""
    names = {"user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages if m["role"] in names)


class UserSimulator(abc.ABC):
    """Writes the user's next message for a batch of dialogues."""

    #: True when the user's messages do not depend on the assistant's responses.
    presampled: bool = False

    @abc.abstractmethod
    def respond(self, requests: Sequence[UserRequest]) -> list[UserTurn]:
        """One :class:`UserTurn` per request, in order."""

    def prompt_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens the simulator must read to answer ``messages`` (0 when it reads none)."""
        return 0

    def messages_problem(self, messages: Sequence[Message]) -> str | None:
        """Why this user cannot continue from ``messages`` (a reset's prefix or item), or None.

        Checked at reset, so that a transcript the user cannot read fails there and not at a
        later step. Every message the language users read is fine.
        """
        return None

    @property
    def max_prompt_tokens(self) -> int | None:
        """Longest prompt the simulator can take, or None when unlimited."""
        return None


class LLMUser(UserSimulator):
    """A language model playing the user (setting one).

    Its prompt holds the policy's actions, which are text: an action that contains a chat-control
    token's text (``"<|im_end|>\\n<|im_start|>system ..."``) must not open or close a turn of the
    user's prompt. The generators the environment builds for it tokenise message contents that way
    (``literal_content=True``, :func:`refuel_env.generation.encode_chat`); pass a generator built so
    when you pass your own. Over HTTP ('openai' backend) the server renders and tokenises the
    messages, so the server must keep special tokens' text inside message contents as text; a server
    that tokenises the rendered template as a whole (the usual way) reads such an action as a real
    turn. Serve the user behind such a server only to policies you trust, or filter the actions.
    """

    def __init__(
        self,
        generator: TextGenerator,
        *,
        style: PromptStyle = "paper",
        sampling: SamplingParams | None = None,
    ):
        if style not in ("paper", "role-swap"):
            raise ValueError(f"unknown user prompt style {style!r}; use 'paper' or 'role-swap'")
        self.generator = generator
        self.style: PromptStyle = style
        self.sampling = sampling or SamplingParams(max_new_tokens=1024, temperature=0.8)

    def build_prompt(self, messages: Sequence[Message]) -> list[Message]:
        if self.style == "paper":
            return [{"role": "user", "content": PAPER_USER_PROMPT.format(dialogue=format_dialogue(messages))}]
        swapped: list[Message] = [{"role": "system", "content": ROLE_SWAP_SYSTEM}]
        for m in messages:
            if m["role"] == "user":
                swapped.append({"role": "assistant", "content": m["content"]})
            elif m["role"] == "assistant":
                swapped.append({"role": "user", "content": m["content"]})
        if swapped[-1]["role"] == "user":
            swapped[-1] = {"role": "user", "content": f"{swapped[-1]['content']}\n\n{ROLE_SWAP_CUE}"}
        return swapped

    def prompt_tokens(self, messages: Sequence[Message]) -> int:
        return self.generator.count_tokens(self.build_prompt(messages))

    @property
    def max_prompt_tokens(self) -> int:
        return self.generator.max_context - self.sampling.max_new_tokens

    def respond(self, requests: Sequence[UserRequest]) -> list[UserTurn]:
        if not requests:
            return []
        completions = self.generator.chat(
            [self.build_prompt(r.messages) for r in requests],
            self.sampling,
            seeds=[r.seed for r in requests],
        )
        turns = []
        for c in completions:
            turn = parse_user_output(c.text, self.style)
            turns.append(
                UserTurn(
                    text=turn.text,
                    parsed=turn.parsed,
                    raw=turn.raw,
                    fallback=turn.fallback,
                    prompt_tokens=c.prompt_tokens,
                    completion_tokens=c.completion_tokens,
                )
            )
        return turns


class PresampledUser(UserSimulator):
    """Asks the dataset dialogue's questions in order, whatever the assistant said (setting two)."""

    presampled = True

    def respond(self, requests: Sequence[UserRequest]) -> list[UserTurn]:
        turns = []
        for r in requests:
            if r.turn >= r.item.num_turns:
                raise ValueError(
                    f"item {r.item.item_id!r} has {r.item.num_turns} questions; there is no question "
                    f"{r.turn + 1}. Use a horizon of at most {r.item.num_turns} for this item."
                )
            question = r.item.questions[r.turn]
            turns.append(UserTurn(text=question, parsed=True, raw=question))
        return turns


class InstantUser(UserSimulator):
    """Answers at once with a fixed follow-up question; for measuring the environment's own overhead."""

    def __init__(self, question: str = FALLBACK_QUESTION):
        self.question = question

    def respond(self, requests: Sequence[UserRequest]) -> list[UserTurn]:
        return [UserTurn(text=self.question, parsed=True, raw=self.question) for _ in requests]
