"""Judges: the appendix C.5 prompts, the parsing of a judge's answer, and the two judges.

A :class:`Comparison` is one judgement to make (the policy's and the reference's dialogues
truncated at a turn); :class:`RewardJudge` prefers the dialogue the reward model scores higher,
:class:`PairwiseJudge` asks an LLM behind any :class:`~refuel_env.generation.TextGenerator`.
"""

from __future__ import annotations

import abc
import hashlib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from refuel_agents.evaluation.specs import load_generator
from refuel_env.generation import SamplingParams, TextGenerator
from refuel_env.types import Message

# ------------------------------------------------------------------------------ judge prompts

ULTRAINTERACT_JUDGE_TEMPLATE = """\
I am putting together a leaderboard of chatbots. Below are two dialogues, each between a user and \
a chatbot. Assess both dialogues and pick the one in which the chatbot's outputs are better from \
a human perspective.

Dialogue A:
{dialogue_a}

Dialogue B:
{dialogue_b}

Instructions:
FIRST, give a one-sentence comparison of the two dialogues that says which one you prefer and why. \
SECOND, on a new line, state only "A" or "B" to give your choice. Answer in exactly this format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""
"""Appendix C.5's UltraInteract prompt (adapted there from AlpacaFarm), in this project's words."""

HH_JUDGE_TEMPLATE = """\
Below are two conversations between a person and an AI assistant. The person's messages may \
differ between them; judge the assistant. Which conversation shows the assistant being more \
helpful, while staying honest and harmless?

Conversation A:
{dialogue_a}

Conversation B:
{dialogue_b}

Instructions:
FIRST, give a one-sentence comparison of the two conversations that says which assistant is more \
helpful and why. SECOND, on a new line, state only "A" or "B" to give your choice. Answer in exactly \
this format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""
"""The Anthropic HH variant (appendix C.5 adapts it from the DPO paper), in this project's words."""

JUDGE_TEMPLATES: dict[str, str] = {"ultrainteract": ULTRAINTERACT_JUDGE_TEMPLATE, "hh": HH_JUDGE_TEMPLATE}

_SPEAKERS = {"system": "System", "user": "User", "assistant": "Chatbot"}


def render_dialogue(messages: Sequence[Message]) -> str:
    """A transcript for a judge: ``# User:`` / ``# Chatbot:`` headings, blank lines between turns."""
    return "\n\n".join(f"# {_SPEAKERS[m['role']]}:\n{m['content'].strip()}" for m in messages)


#: The placeholders a judge template may use for the two transcripts: this project's
#: ``{dialogue_a}`` / ``{dialogue_b}``, or appendix C.5's ``{{dialoguea}}`` / ``{{dialogueb}}``
#: (double braces, spaces and an underscore allowed: ``{{ dialogue_a }}``).
_PLACEHOLDER = re.compile(r"\{\{\s*dialogue_?([ab])\s*\}\}|\{dialogue_([ab])\}")

TEMPLATE_HELP = (
    "a judge template is 'ultrainteract', 'hh', or the path of a UTF-8 text file holding the prompt; the file "
    "marks where the two transcripts go with the placeholders {dialogue_a} and {dialogue_b}, or with appendix C.5's "
    "{{dialoguea}} and {{dialogueb}} (each exactly once)"
)


def _check_template_text(text: str, where: str) -> None:
    found = [m.group(1) or m.group(2) for m in _PLACEHOLDER.finditer(text)]
    if sorted(found) != ["a", "b"]:
        counts = f"{found.count('a')} placeholder(s) for dialogue A and {found.count('b')} for dialogue B"
        raise ValueError(f"judge template {where} has {counts}; {TEMPLATE_HELP}")


def load_judge_template(value: str) -> str:
    """A judge template from a key of :data:`JUDGE_TEMPLATES` (returned as is), a template text
    (holding the placeholders), or the path of a text file holding one (its text is returned).

    Raises ValueError naming the value when it is none of these, or when the text lacks a
    placeholder or repeats one (see :data:`TEMPLATE_HELP`).
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"empty judge template {value!r}; {TEMPLATE_HELP}")
    if value in JUDGE_TEMPLATES:
        return value
    if _PLACEHOLDER.search(value):
        _check_template_text(value, "text")
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"judge template {value!r} is neither one of {sorted(JUDGE_TEMPLATES)} nor an existing "
                         f"file; {TEMPLATE_HELP}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"judge template file {value!r} cannot be read as UTF-8 text ({err}); {TEMPLATE_HELP}") from None
    _check_template_text(text, f"file {value!r}")
    return text


def judge_prompt(template: str, dialogue_a: Sequence[Message], dialogue_b: Sequence[Message]) -> str:
    """Fill a judge template: a key of :data:`JUDGE_TEMPLATES` or a text with both placeholders
    (either spelling, see :data:`TEMPLATE_HELP`). Filled in one pass, so a transcript that itself
    contains a placeholder is left as it is."""
    text = JUDGE_TEMPLATES.get(template, template)
    _check_template_text(text, "text")
    rendered = {"a": render_dialogue(dialogue_a), "b": render_dialogue(dialogue_b)}
    return _PLACEHOLDER.sub(lambda m: rendered[m.group(1) or m.group(2)], text)


def template_for_dataset(dataset: str) -> str:
    """The judge template of an environment's dataset: 'hh' for Anthropic HH, else 'ultrainteract'."""
    return "hh" if dataset == "anthropic_hh" else "ultrainteract"


# ------------------------------------------------------------------------------ parsing

_MARKUP = re.compile(r"[*_#`]+")
_PREFERRED = re.compile(
    r"preferred(?:\s+(?:dialogue|conversation|response|answer|choice|option))?\s*[:=\-]\s*"
    r"[\"'“”‘’<\[(\s]*(?:(?:dialogue|conversation|response|option|choice)\s+)?([AaBb])(?![A-Za-z0-9])(.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_OTHER_LETTER = re.compile(
    r"^[\"'“”‘’>\])\s]*(?:or|and|/|,|&|vs\.?)\s*[\"'“”‘’<\[(\s]*(?:(?:dialogue|conversation|response)\s+)?[AaBb](?![A-Za-z0-9])",
    re.IGNORECASE,
)
_BARE_LETTER = re.compile(r"^[\"'“”‘’<\[(\s]*([AaBb])[\"'“”‘’>\])\s.!]*$")


def parse_preference(text: str | None, *, bare_letter: bool = True) -> Literal["A", "B"] | None:
    """The judge's choice from its answer: ``"A"``, ``"B"``, or None when missing or ambiguous.

    Reads ``Preferred: A`` lines, tolerant of case, Markdown (``**Preferred:** B``), quotes and
    brackets (``Preferred: "A"``, ``[B]``), a noun (``Preferred: Dialogue A``) and trailing text
    (``Preferred: B, because ...``). A lower-case ``a`` followed by more words (``Preferred: a
    longer answer``) is read as an article, not a choice. Without any ``Preferred`` line, a last
    line holding only the letter counts when ``bare_letter`` (pass False for an answer cut at the
    token limit, whose last line may be any fragment). None when nothing is found, when a line
    offers both (``Preferred: A or B``), or when two lines disagree.
    """
    if not isinstance(text, str):
        return None
    clean = _MARKUP.sub("", text)
    found: set[str] = set()
    for match in _PREFERRED.finditer(clean):
        letter, rest = match.group(1), match.group(2)
        if _OTHER_LETTER.match(rest):
            return None
        if letter == "a" and re.match(r"\s+[A-Za-z]", rest):
            continue  # the article "a", not a choice
        found.add(letter.upper())
    if not found and bare_letter:
        lines = [line for line in clean.strip().splitlines() if line.strip()]
        bare = _BARE_LETTER.match(lines[-1]) if lines else None
        if bare:
            found.add(bare.group(1).upper())
    if len(found) != 1:
        return None
    return found.pop()  # type: ignore[return-value]


# ------------------------------------------------------------------------------ dialogues


def assistant_turns(dialogue: Sequence[Message]) -> int:
    """Number of assistant messages in a dialogue."""
    return sum(1 for m in dialogue if m["role"] == "assistant")


def truncate_dialogue(dialogue: Sequence[Message], turn: int) -> list[Message]:
    """The dialogue up to and including its ``turn``-th assistant message (1-based)."""
    if turn < 1:
        raise ValueError(f"turn must be >= 1, got {turn}")
    seen = 0
    for k, m in enumerate(dialogue):
        if m["role"] == "assistant":
            seen += 1
            if seen == turn:
                return list(dialogue[: k + 1])
    raise ValueError(f"the dialogue has {seen} assistant turns; cannot truncate it at turn {turn}")


def prompt_hash(dialogue: Sequence[Message]) -> str:
    """A short digest of a dialogue's first user message: identifies the held-out prompt."""
    first = next((m["content"] for m in dialogue if m["role"] == "user"), "")
    return hashlib.sha256(first.encode()).hexdigest()[:12]


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Comparison:
    """One judgement to make: the policy's and the reference's dialogues truncated at ``turn``."""

    policy_dialogue: list[Message]
    reference_dialogue: list[Message]
    turn: int
    index: int
    """Which held-out prompt (position in the evaluation)."""
    item_id: str = ""
    full: bool = False
    """True when ``turn`` is the pair's last turn and both dialogues ended there (the whole
    dialogues are judged)."""
    policy: str = ""
    """The policy's name: with the seed, the prompt and the turn it decides the A/B order."""


def _base_record(c: Comparison) -> dict[str, Any]:
    return {"index": c.index, "item_id": c.item_id, "turn": c.turn, "full": c.full, "policy": c.policy,
            "prompt_hash": prompt_hash(c.policy_dialogue)}


def _stable_uniform(*key: Any) -> float:
    """A number in [0, 1) that depends only on ``key`` (SHA-256 of its repr): the same in every run."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def comparison_order(seed: int, c: Comparison) -> bool:
    """Whether the policy's dialogue is shown as A: drawn from (seed, prompt, policy, turn) alone,
    so adding or removing a policy, a prompt or a turn leaves every other comparison's order as it is.
    The prompt is the item id (the position in the evaluation when there is none) and the digest
    of the first user message."""
    prompt = (c.item_id or f"#{c.index}", prompt_hash(c.policy_dialogue))
    return _stable_uniform("order", int(seed), prompt, c.policy, int(c.turn)) < 0.5


# ------------------------------------------------------------------------------ judges


class Judge(abc.ABC):
    """Compares the policy's dialogue with the reference's: one record per :class:`Comparison`.

    Every record holds ``index``, ``item_id``, ``turn``, ``full``, ``prompt_hash``, ``outcome``
    (1 policy preferred, 0 reference preferred, 0.5 tie, None no outcome), ``failure`` (None,
    ``"parse"`` or ``"context"``) and ``parse_failures`` (unparsed judge answers).
    """

    name: str = "judge"

    @abc.abstractmethod
    def judge(self, comparisons: Sequence[Comparison], *, progress: bool = False) -> list[dict[str, Any]]:
        """One record per comparison, in order."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class RewardJudge(Judge):
    """Prefers the dialogue whose truncated transcript the reward model scores higher.

    Scores within ``tie_tolerance`` of each other are a tie (0.5). Exact where the reward is
    (synthetic tasks), cheap on a CPU, and the same model that trains the policy: it measures
    reward, not the independent preference a GPT-4 judge gives. A comparison with a transcript
    longer than the reward model reads (``max_length``) is not scored; it is recorded with
    ``failure="context"``. A reward has no A/B order, so there is no both-orders mode.
    """

    def __init__(self, reward_model: Any, *, tie_tolerance: float = 0.0, name: str = "reward"):
        if not hasattr(reward_model, "score"):
            raise TypeError(f"reward_model must have a score(dialogues) method, got {type(reward_model).__name__}")
        if not tie_tolerance >= 0:
            raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance!r}")
        self.reward_model = reward_model
        self.tie_tolerance = float(tie_tolerance)
        self.name = name

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "reward", "reward_model": type(self.reward_model).__name__,
                "tie_tolerance": self.tie_tolerance}

    def judge(self, comparisons: Sequence[Comparison], *, progress: bool = False) -> list[dict[str, Any]]:
        if not comparisons:
            return []
        limit = getattr(self.reward_model, "max_length", None)
        fits = [limit is None or max(self.reward_model.count_tokens(c.policy_dialogue),
                                     self.reward_model.count_tokens(c.reference_dialogue)) <= limit
                for c in comparisons]
        scored = [c for c, ok in zip(comparisons, fits) if ok]
        dialogues = [c.policy_dialogue for c in scored] + [c.reference_dialogue for c in scored]
        scores = np.asarray(self.reward_model.score(dialogues), dtype=float) if scored else np.zeros(0)
        n = len(scored)
        records = []
        k = -1
        for c, ok in zip(comparisons, fits):
            if not ok:
                records.append({**_base_record(c), "judge": self.name, "policy_score": None, "reference_score": None,
                                "outcome": None, "failure": "context", "parse_failures": 0})
                continue
            k += 1
            ours, theirs = float(scores[k]), float(scores[n + k])
            gap = ours - theirs
            outcome = 0.5 if abs(gap) <= self.tie_tolerance else float(gap > 0)
            records.append({**_base_record(c), "judge": self.name, "policy_score": ours, "reference_score": theirs,
                            "outcome": outcome, "failure": None, "parse_failures": 0})
        return records


class PairwiseJudge(Judge):
    """An LLM judge behind any :class:`TextGenerator` answering a pairwise prompt (appendix C.5).

    The position of the policy's dialogue (A or B) is drawn per comparison from (``seed``, prompt,
    policy, turn) by :func:`comparison_order`, and so is the judge's sampling seed of each request:
    the same seed gives the same orders, and a comparison's order does not depend on which other
    comparisons are judged in the run. ``both_orders=True`` asks both orders and combines them by
    the rule in the docstring of :mod:`refuel_agents.evaluation`. ``template`` is a key of
    :data:`JUDGE_TEMPLATES`, a text with both placeholders, or a template file's path (see
    :func:`load_judge_template`); None lets :func:`evaluate_policies` pick it from the
    environment's dataset ('ultrainteract' when used on its own). ``sampling`` defaults to
    greedy decoding with up to 256 new tokens. A prompt longer than the judge's context minus
    ``sampling.max_new_tokens`` is not sent; it is recorded with ``failure="context"``.
    """

    def __init__(
        self,
        generator: TextGenerator,
        *,
        template: str | None = None,
        seed: int = 0,
        both_orders: bool = False,
        sampling: SamplingParams | None = None,
        batch_size: int = 16,
    ):
        if not isinstance(generator, TextGenerator):
            raise TypeError(f"generator must be a TextGenerator, got {type(generator).__name__}")
        if template is not None:
            template = load_judge_template(template)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.generator = generator
        self.template = template
        self.seed = int(seed)
        self.both_orders = bool(both_orders)
        self.sampling = sampling or SamplingParams(max_new_tokens=256, temperature=0.0)
        self.batch_size = batch_size
        self.name = getattr(generator, "name", "judge")

    def describe(self) -> dict[str, Any]:
        template = self.template or "ultrainteract"
        out = {"name": self.name, "kind": "pairwise", "template": template if template in JUDGE_TEMPLATES
               else "custom", "seed": self.seed, "both_orders": self.both_orders, "sampling": asdict(self.sampling)}
        if template not in JUDGE_TEMPLATES:
            out["template_text"] = template
        return out

    def judge(self, comparisons: Sequence[Comparison], *, progress: bool = False) -> list[dict[str, Any]]:
        # One request per (comparison, order): policy_first True puts the policy's dialogue at A.
        requests: list[tuple[int, bool, str]] = []
        seeds: list[int] = []
        for k, c in enumerate(comparisons):
            first = comparison_order(self.seed, c)
            for policy_first in ([first, not first] if self.both_orders else [first]):
                a, b = (c.policy_dialogue, c.reference_dialogue) if policy_first else (c.reference_dialogue, c.policy_dialogue)
                requests.append((k, policy_first, judge_prompt(self.template or "ultrainteract", a, b)))
                key = ("judge-seed", self.seed, c.item_id or f"#{c.index}", prompt_hash(c.policy_dialogue),
                       c.policy, int(c.turn), policy_first)
                seeds.append(int(_stable_uniform(*key) * (2**31 - 1)))
        answers: list[str | None] = [None] * len(requests)
        finished: list[str | None] = [None] * len(requests)
        room = self.generator.max_context - self.sampling.max_new_tokens
        fits = [self.generator.count_tokens([{"role": "user", "content": p}]) <= room for _, _, p in requests]
        todo = [i for i in range(len(requests)) if fits[i]]
        bar = tqdm(total=len(todo), desc=f"judge ({self.name})", unit="cmp", disable=not progress, leave=False)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            done = self.generator.chat([[{"role": "user", "content": requests[i][2]}] for i in chunk],
                                       self.sampling, seeds=[seeds[i] for i in chunk])
            for i, completion in zip(chunk, done):
                answers[i], finished[i] = completion.text, completion.finish_reason
            bar.update(len(chunk))
        bar.close()

        per_comparison: list[list[dict[str, Any]]] = [[] for _ in comparisons]
        for i, (k, policy_first, prompt) in enumerate(requests):
            parsed = parse_preference(answers[i], bare_letter=finished[i] == "stop") if fits[i] else None
            winner = None if parsed is None else ("policy" if (parsed == "A") == policy_first else "reference")
            per_comparison[k].append({"order": "policy=A" if policy_first else "policy=B",
                                      "judge_prompt_hash": _text_hash(prompt), "raw": answers[i],
                                      "finish_reason": finished[i],
                                      "parsed": parsed, "winner": winner, "sent": fits[i]})
        return [self._record(c, js) for c, js in zip(comparisons, per_comparison)]

    def _record(self, c: Comparison, judgements: list[dict[str, Any]]) -> dict[str, Any]:
        sent = [j for j in judgements if j["sent"]]
        winners = [j["winner"] for j in sent if j["winner"] is not None]
        if not winners:
            outcome = None
        elif len(set(winners)) == 2:
            outcome = 0.5  # the two orders disagree: the judge followed the position
        else:
            outcome = 1.0 if winners[0] == "policy" else 0.0
        failure = None
        if outcome is None:
            failure = "context" if not sent else "parse"
        return {**_base_record(c), "judge": self.name,
                "order": judgements[0]["order"] if len(judgements) == 1 else "both",
                "judgements": judgements, "outcome": outcome, "failure": failure,
                "parse_failures": sum(1 for j in sent if j["parsed"] is None)}


def build_judge(spec: str | Judge, *, env: Any, template: str, seed: int, both_orders: bool,
                sampling: SamplingParams | None = None, device: str | None = None) -> Judge:
    """'reward' (the environment's reward model), a ready :class:`Judge`, or a model spec."""
    if isinstance(spec, Judge):
        return spec
    if isinstance(spec, str) and spec == "reward":
        return RewardJudge(env.unwrapped.core.reward.model)
    return PairwiseJudge(load_generator(spec, device=device), template=template, seed=seed,
                         both_orders=both_orders, sampling=sampling)
