"""Evaluation: per-turn win rates against a reference policy, reward-model score, KL, length.

The protocol of the paper's sections 4.2 and 4.3 (tables 1 and 2, appendices C.5 and E):

1. The policy and the reference policy each play the environment from the same held-out prompts
   (``split="test"``), with the same seeds, for H turns (H = 5 by default, the paper's; in a
   pre-sampled setting an item with fewer questions ends at its own length). Both use
   :func:`play_for_evaluation`, whose seeded sampling makes the two runs differ only by the
   policy. The training-data limit ``max_dialogue_tokens`` is off while playing.
2. For every turn h = 1..H_i that both dialogues reached, the two dialogues truncated after the
   h-th assistant message are compared by a judge: :class:`PairwiseJudge` (any :class:`~refuel_env.generation.TextGenerator`
   answering the appendix C.5 prompt: a local model, vLLM, or GPT-4 over HTTP) or
   :class:`RewardJudge` (the higher reward-model score wins; exact and cheap).
3. :func:`win_rates` aggregates the judgements: a win rate per turn with a Wilson 95 % interval,
   the average over turns (table 1's ``avg``), the appendix E weighted average (weights: the
   share of the test set's dataset dialogues of each length), and the full-dialogue win rate
   (each pair judged at its own last turn; table 2's ``Winrate``).
4. Also reported: the reward-model score (mean environment reward of the full dialogues, KL
   penalty off), a Monte-Carlo estimate of KL(pi || pi_ref) at temperature 1 from dialogues the
   policy sampled at temperature 1 (:func:`kl_estimate`), and the mean response length in words.

Outcomes are from the policy's side: 1 = the policy's dialogue is preferred, 0 = the
reference's, 0.5 = a tie. A comparison that yields no outcome (the judge's answer could not be
parsed, or the prompt does not fit the judge's context) is left out of the win rate and
counted. A pair in which either dialogue was truncated by the environment (it outgrew a model's
context) is judged at the turns both reached, has no full-dialogue judgement, and is counted as
``truncated_pairs``.

**Both orders** (``both_orders=True``): each comparison is judged with the policy's dialogue as
A and again as B. Both answers parsed: the same dialogue preferred both times gives 1 or 0;
different dialogues (the judge followed the position) give 0.5. One answer parsed: its outcome
counts, and the other is counted as a parse failure. None parsed: no outcome.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from refuel_agents.collection import StepBatcher
from refuel_agents.logprobs import batched_logprobs, encode_response
from refuel_env.generation import SamplingParams, TextGenerator, TransformersGenerator
from refuel_env.types import Message

DEFAULT_ENV_ID = "UltraInteractDialogue-v0"
DEFAULT_HORIZON = 5

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
    the rule in the module docstring. ``template`` is a key of :data:`JUDGE_TEMPLATES`, a text with
    both placeholders, or a template file's path (see :func:`load_judge_template`); None lets
    :func:`evaluate_policies` pick it from the environment's dataset ('ultrainteract' when used on
    its own). ``sampling`` defaults to
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


# ------------------------------------------------------------------------------ aggregation


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % by default); ties count 0.5 toward ``successes``."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def length_weights(lengths: Iterable[int], horizon: int) -> dict[int, float]:
    """Appendix E weights: the share of dataset dialogues of each length 1..horizon.

    Dialogues longer than ``horizon`` count at ``horizon`` (an evaluation at horizon H truncates
    them there).
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    counts = {h: 0 for h in range(1, horizon + 1)}
    total = 0
    for length in lengths:
        if length < 1:
            raise ValueError(f"a dialogue length must be >= 1, got {length}")
        counts[min(int(length), horizon)] += 1
        total += 1
    if total == 0:
        raise ValueError("length_weights needs at least one dialogue length")
    return {h: c / total for h, c in counts.items()}


def weighted_average(per_turn: Mapping[int, float], weights: Mapping[int, float]) -> float:
    """sum_h w_h * winrate_h / sum_h w_h over the turns that have a win rate (appendix E)."""
    pairs = [(float(weights.get(h, 0.0)), rate) for h, rate in per_turn.items() if rate is not None and not math.isnan(rate)]
    total = sum(w for w, _ in pairs)
    if total <= 0:
        return math.nan
    return sum(w * rate for w, rate in pairs) / total


def win_rates(records: Sequence[Mapping[str, Any]], *, horizon: int | None = None,
              weights: Mapping[int, float] | None = None) -> dict[str, Any]:
    """Aggregate judgement records into table 1's layout.

    Returns ``per_turn`` ({h: {win_rate, n, wins, ties, losses, ci_low, ci_high, failures,
    parse_failures}}; win rates are fractions in [0, 1], ties count one half), ``average`` (the
    mean of the per-turn win rates over the turns with judgements), ``weighted_average`` (with
    ``weights``, see :func:`weighted_average`; None without), ``full_dialogue`` (records with
    ``full``: each pair at its own last turn), ``n``, ``failures`` and ``parse_failures``.
    """
    turns = sorted({int(r["turn"]) for r in records})
    horizon = horizon or (max(turns) if turns else 0)
    per_turn: dict[int, dict[str, Any]] = {}
    for h in range(1, horizon + 1):
        per_turn[h] = _summarise([r for r in records if int(r["turn"]) == h])
    rates = {h: s["win_rate"] for h, s in per_turn.items() if s["n"] > 0}
    return {
        "per_turn": per_turn,
        "average": float(np.mean(list(rates.values()))) if rates else math.nan,
        "turns_in_average": sorted(rates),
        "weighted_average": weighted_average(rates, weights) if weights is not None else None,
        "full_dialogue": _summarise([r for r in records if r.get("full")]),
        "n": sum(s["n"] for s in per_turn.values()),
        "failures": sum(s["failures"] for s in per_turn.values()),
        "parse_failures": sum(s["parse_failures"] for s in per_turn.values()),
    }


def _summarise(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    outcomes = [float(r["outcome"]) for r in records if r.get("outcome") is not None]
    n = len(outcomes)
    wins = sum(1 for o in outcomes if o == 1.0)
    ties = sum(1 for o in outcomes if o == 0.5)
    score = sum(outcomes)
    low, high = wilson_interval(score, n)
    return {"win_rate": score / n if n else math.nan, "n": n, "wins": wins, "ties": ties,
            "losses": n - wins - ties, "ci_low": low, "ci_high": high,
            "failures": sum(1 for r in records if r.get("outcome") is None),
            "parse_failures": sum(int(r.get("parse_failures", 0)) for r in records)}


# ------------------------------------------------------------------------------ KL


def _local_model(generator: TextGenerator) -> tuple[Any, Any] | None:
    model, tokenizer = getattr(generator, "model", None), getattr(generator, "tokenizer", None)
    if isinstance(generator, TransformersGenerator) and model is not None and tokenizer is not None:
        return model, tokenizer
    return None


def response_logprobs(generator: TextGenerator, pairs: Sequence[tuple[Sequence[Message], str]], *,
                      temperature: float = 1.0, batch_size: int = 8) -> list[float]:
    """log pi(y|s) of each (state, response) pair under a local transformers model, with the
    training code's functions (:func:`~refuel_agents.logprobs.encode_response`,
    :func:`~refuel_agents.logprobs.sequence_logprobs`)."""
    local = _local_model(generator)
    if local is None:
        raise TypeError(f"log-probs need a local transformers model, got {type(generator).__name__}")
    model, tokenizer = local
    rows = [{"input_ids": e.input_ids, "response_mask": e.response_mask}
            for e in (encode_response(tokenizer, state, response) for state, response in pairs)]
    return batched_logprobs(model, rows, tokenizer.pad_token_id, batch_size=batch_size, temperature=temperature,
                            device=next(model.parameters()).device)


def turn_pairs(dialogue: Sequence[Message]) -> list[tuple[list[Message], str]]:
    """(s_h, y_h) for every assistant turn h of a dialogue."""
    return [(list(dialogue[:k]), m["content"]) for k, m in enumerate(dialogue) if m["role"] == "assistant"]


def kl_estimate(policy: TextGenerator, reference: TextGenerator, dialogues: Sequence[Sequence[Message]], *,
                temperature: float = 1.0, batch_size: int = 8) -> dict[str, Any]:
    """Monte-Carlo KL(pi || pi_ref) from dialogues the policy sampled.

    Per dialogue: the sum over its assistant turns h of log pi(y_h|s_h) - log pi_ref(y_h|s_h)
    (each model with its own tokenizer and chat template). Returns ``mean`` (the estimate),
    ``stderr`` (standard error over dialogues), ``n`` and ``per_dialogue``. ``temperature``
    divides the logits before the log-softmax (as in training); pass the sampling temperature
    so the estimate is that of the distributions the dialogues were sampled from.
    """
    spans, pairs = [], []
    for dialogue in dialogues:
        turns = turn_pairs(dialogue)
        spans.append((len(pairs), len(pairs) + len(turns)))
        pairs.extend(turns)
    if not pairs:
        raise ValueError("kl_estimate needs at least one dialogue with an assistant turn")
    ours = response_logprobs(policy, pairs, temperature=temperature, batch_size=batch_size)
    theirs = response_logprobs(reference, pairs, temperature=temperature, batch_size=batch_size)
    per_dialogue = [sum(ours[i] - theirs[i] for i in range(a, b)) for a, b in spans]
    n = len(per_dialogue)
    stderr = statistics.stdev(per_dialogue) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": float(np.mean(per_dialogue)), "stderr": stderr, "n": n, "per_dialogue": per_dialogue,
            "temperature": temperature}


# ------------------------------------------------------------------------------ model specs


class SpecError(ValueError):
    """A model spec that cannot be turned into a generator."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: ``backend`` is 'transformers', 'vllm' or 'openai'."""

    backend: Literal["transformers", "vllm", "openai"]
    model: str
    base_url: str | None = None


SPEC_HELP = """\
Model specs:
  embedded                    SmolLM2-135M-Instruct shipped with the project (transformers)
  PATH                        a local checkpoint directory, e.g. runs/<run>/final_model (transformers)
  hf:ID_OR_PATH               a Hugging Face id already in the local cache, or a path (transformers)
  vllm:ID_OR_PATH             the same model run by an in-process vLLM engine (needs vllm installed)
  openai:MODEL[@BASE_URL]     a model behind an OpenAI-compatible endpoint; BASE_URL includes the
                              API prefix (http://localhost:8000/v1); default $OPENAI_BASE_URL, else
                              https://api.openai.com/v1, which needs $OPENAI_API_KEY"""


def parse_spec(spec: str) -> ModelSpec:
    """Parse a model spec (see :data:`SPEC_HELP`); raises :class:`SpecError` on a bad one."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"empty model spec {spec!r}\n{SPEC_HELP}")
    spec = spec.strip()
    if spec == "embedded":
        return ModelSpec("transformers", "embedded")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ("hf", "vllm", "openai"):
        if not rest:
            raise SpecError(f"model spec {spec!r} names no model after '{prefix}:'\n{SPEC_HELP}")
        if prefix == "openai":
            model, at, url = rest.partition("@")
            if not model or (at and not url):
                raise SpecError(f"model spec {spec!r}: use openai:MODEL or openai:MODEL@BASE_URL")
            if url and not url.startswith(("http://", "https://")):
                raise SpecError(f"model spec {spec!r}: the base URL {url!r} must start with http:// or https://")
            return ModelSpec("openai", model, url or None)
        return ModelSpec("transformers" if prefix == "hf" else "vllm", rest)
    if sep and prefix.isalpha() and len(prefix) > 1 and not Path(spec).exists():
        raise SpecError(f"unknown model spec prefix {prefix!r} in {spec!r}\n{SPEC_HELP}")
    path = Path(spec)
    if not path.is_dir():
        raise SpecError(
            f"model directory {spec!r} does not exist (or is not a directory). Pass a checkpoint directory "
            f"such as runs/<run>/final_model, or 'hf:<id>' for a model in the local Hugging Face cache.\n{SPEC_HELP}"
        )
    if not (path / "config.json").is_file():
        raise SpecError(f"{spec!r} holds no config.json: not a transformers checkpoint directory "
                        "(a training run's model is in runs/<run>/final_model)")
    return ModelSpec("transformers", str(path))


def split_named_spec(text: str) -> tuple[str, str]:
    """``NAME=SPEC`` -> (NAME, SPEC); a plain spec is named by itself."""
    name, sep, spec = text.partition("=")
    if sep and name and not any(ch in name for ch in ":/@"):
        if not spec:
            raise SpecError(f"{text!r}: nothing after '='; use NAME=SPEC")
        return name, spec
    return text, text


def check_spec(spec: str) -> ModelSpec:
    """Parse a spec and check what can be checked without loading it (the API key of the OpenAI API)."""
    from refuel_env.backends.openai_http import API_KEY_ENV, resolve_base_url

    parsed = parse_spec(spec)
    if parsed.backend == "openai":
        base_url = resolve_base_url(parsed.base_url)
        if "api.openai.com" in base_url and not os.environ.get(API_KEY_ENV):
            raise SpecError(
                f"{spec!r} goes to the OpenAI API ({base_url}), which needs a key: set ${API_KEY_ENV}, or give the "
                "base URL of a local OpenAI-compatible server (openai:MODEL@http://localhost:8000/v1)"
            )
    return parsed


def load_generator(spec: str | TextGenerator, *, device: str | None = None, dtype: str | None = None,
                   batch_size: int = 32) -> TextGenerator:
    """A :class:`TextGenerator` from a spec (a ready generator is returned as is)."""
    if isinstance(spec, TextGenerator):
        return spec
    parsed = check_spec(spec)
    if parsed.backend == "transformers":
        path = parsed.model
        if path == "embedded":
            from refuel_env.embedded import smollm2_path

            path = str(smollm2_path())
        generator = TransformersGenerator.from_pretrained(path, device=device, dtype=dtype, batch_size=batch_size)
        generator.name = spec
        return generator
    if parsed.backend == "vllm":
        from refuel_env.backends.vllm_backend import VLLMGenerator

        return VLLMGenerator(parsed.model, name=spec)
    from refuel_env.backends.openai_http import OpenAIChatGenerator

    return OpenAIChatGenerator(parsed.model, base_url=parsed.base_url)


def build_judge(spec: str | Judge, *, env: Any, template: str, seed: int, both_orders: bool,
                sampling: SamplingParams | None = None, device: str | None = None) -> Judge:
    """'reward' (the environment's reward model), a ready :class:`Judge`, or a model spec."""
    if isinstance(spec, Judge):
        return spec
    if isinstance(spec, str) and spec == "reward":
        return RewardJudge(env.unwrapped.core.reward.model)
    return PairwiseJudge(load_generator(spec, device=device), template=template, seed=seed,
                         both_orders=both_orders, sampling=sampling)


# ------------------------------------------------------------------------------ the driver


def _json_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, str | int | float | bool | type(None)) else getattr(v, "name", repr(v))
            for k, v in kwargs.items()}


def _response_words(dialogues: Iterable[Sequence[Message]]) -> float:
    counts = [len(m["content"].split()) for d in dialogues for m in d if m["role"] == "assistant"]
    return float(np.mean(counts)) if counts else math.nan


def _rm_score(rows: Sequence[Mapping[str, Any]]) -> tuple[float, int]:
    rewards = [r["reward"] for r in rows if r.get("reward") is not None]
    return (float(np.mean(rewards)) if rewards else math.nan, len(rewards))


def play_for_evaluation(
    *,
    env_id: str,
    env_kwargs: Mapping[str, Any],
    policy: TextGenerator,
    sampling: SamplingParams,
    seed: int,
    horizons: Sequence[int],
    prompt_indices: Sequence[int],
) -> list[dict[str, Any]]:
    """Play one dialogue per held-out prompt with ``policy``, batched: one policy call and one
    vector step per turn for all dialogues in flight.

    Unlike :func:`refuel_agents.collection.play_dialogues`, a dialogue the environment truncates
    keeps its messages up to and including the response that ended it, so the turns it reached can
    still be judged; and the policy's sampling seed of each response comes from (``seed``, prompt,
    turn) alone, so a dialogue's samples do not depend on when the other dialogues ended. The
    environment is reset with ``seed`` (dialogue i gets ``seed + i``, as in the collection).

    One row per prompt: ``item_id``, ``H``, ``reward`` (None when truncated, with
    ``truncation_reason``), ``dialogue`` and ``turns_reached`` (its assistant messages).
    """
    n = len(prompt_indices)
    if len(horizons) != n:
        raise ValueError(f"play_for_evaluation: {len(horizons)} horizons for {n} prompts")
    batcher = StepBatcher(env_id, dict(env_kwargs))
    try:
        _, info = batcher.env(n).reset(seed=seed, options={"horizon": [int(h) for h in horizons],
                                                           "index": [int(i) for i in prompt_indices]})
        rows: list[dict[str, Any]] = [{"item_id": str(info["item_id"][i]), "H": int(info["horizon"][i]),
                                       "reward": None, "dialogue": []} for i in range(n)]
        active = [(i, info["snapshot"][i]) for i in range(n)]
        turn = 0
        while active:
            turn += 1
            seeds = [int(_stable_uniform("policy-seed", int(seed), int(prompt_indices[i]), turn) * (2**31 - 1))
                     for i, _ in active]
            replies = [c.text for c in policy.chat([snap.messages for _, snap in active], sampling, seeds=seeds)]
            obs, reward, terminated, truncated, info = batcher.step([snap for _, snap in active],
                                                                    [None] * len(active), replies)
            going_on = []
            for k, (i, _) in enumerate(active):
                if terminated[k] or truncated[k]:
                    rows[i]["dialogue"] = list(obs[k])
                    if terminated[k]:
                        rows[i]["reward"] = float(reward[k])
                    else:
                        rows[i]["truncation_reason"] = str(info["truncation_reason"][k])
                else:
                    going_on.append((i, info["snapshot"][k]))
            active = going_on
    finally:
        batcher.close()
    for row in rows:
        row["turns_reached"] = assistant_turns(row["dialogue"])
    return rows


def _kl_sampling(sampling: SamplingParams) -> SamplingParams:
    """Plain sampling from the policy (T = 1, no top-p / top-k), the same length limit and stops."""
    return SamplingParams(max_new_tokens=sampling.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                          stop=sampling.stop)


def evaluate_policies(
    policies: Mapping[str, TextGenerator | str],
    reference: TextGenerator | str = "embedded",
    judge: Judge | str = "reward",
    *,
    env_id: str = DEFAULT_ENV_ID,
    env_kwargs: Mapping[str, Any] | None = None,
    num_prompts: int = 8,
    horizon: int | None = DEFAULT_HORIZON,
    seed: int = 0,
    sampling: SamplingParams | None = None,
    both_orders: bool = False,
    judge_template: str | None = None,
    judge_sampling: SamplingParams | None = None,
    turn_weights: Mapping[int, float] | None = None,
    max_dialogue_tokens: int | None = None,
    compute_kl: bool = True,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Play every policy and the reference on the same held-out prompts, judge them turn by turn.

    ``policies`` maps a display name to a :class:`TextGenerator` or a model spec (see
    :data:`SPEC_HELP`); ``reference`` likewise. ``judge`` is 'reward', a model spec, or a ready
    :class:`Judge`. ``env_kwargs`` are the environment's keyword arguments (``preset`` included);
    ``split`` is set to 'test' and ``kl_coef`` to 0 for playing (KL is reported on its own), and
    the environment's ``max_dialogue_tokens`` (a preset's or ``env_kwargs``') to the argument
    ``max_dialogue_tokens`` (default None, no limit): that limit filters training data, and an
    evaluation that kept it would drop a pair at every turn when its later turns grow long. The
    configured value is recorded as ``config.env_max_dialogue_tokens``. A pair is judged at every
    turn both dialogues reached (a dialogue the environment still truncates, e.g. at a model's
    context, counts up to its last response).
    ``horizon`` is H (at most the environment's ``max_turns``; None = ``max_turns``).
    ``num_prompts`` held-out items are drawn without replacement with ``seed``. ``sampling`` is
    the policies' sampling (default: 256 new tokens at temperature 0.8). ``turn_weights`` override
    the appendix E weights (default: the test split's dataset dialogue lengths). ``both_orders``
    needs a pairwise (LLM) judge; with the reward judge it is refused (a reward has no A/B order).
    The KL column is KL(pi || pi_ref) of the models themselves (T = 1): with local models, each
    policy plays the same prompts once more sampling at T = 1 (the evaluation's own dialogues are
    used when ``sampling`` is already plain T = 1 sampling), scored at T = 1 (:func:`kl_estimate`).

    Returns a JSON-ready dict: ``config`` (everything needed to rerun, seeds included),
    ``turn_weights``, ``reference`` (its RM score and length), and ``policies``: per name
    ``win_rate`` (:func:`win_rates`), ``rm_score``, ``kl``, ``length_words``, ``truncated_pairs``,
    ``records`` and ``dialogues``. Write it out with :func:`write_reports`.
    """
    import gymnasium as gym

    import refuel_env  # (registers the ids)

    if not policies:
        raise ValueError("evaluate_policies needs at least one policy")
    if both_orders and (isinstance(judge, RewardJudge) or judge == "reward"):
        raise ValueError("both_orders=True (--both-orders) needs a pairwise LLM judge, but the judge is the reward "
                         "model, which scores each dialogue on its own and has no A/B order; drop --both-orders "
                         "or pass a model spec as the judge (e.g. openai:gpt-4-0613)")
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}")
    if max_dialogue_tokens is not None and (isinstance(max_dialogue_tokens, bool)
                                            or not isinstance(max_dialogue_tokens, int) or max_dialogue_tokens < 1):
        raise ValueError(f"max_dialogue_tokens must be None (no limit) or a positive int, got {max_dialogue_tokens!r}")
    sampling = sampling or SamplingParams(max_new_tokens=256, temperature=0.8)
    play_kwargs = {**dict(env_kwargs or {}), "split": "test", "kl_coef": 0.0}
    configured_limit = None
    if env_id in refuel_env.ENV_IDS:  # (the synthetic task has no dialogue limit)
        from refuel_env.components import make_config

        given = {k: v for k, v in play_kwargs.items() if k != "preset"}
        try:
            configured_limit = make_config(play_kwargs.get("preset"), **given).max_dialogue_tokens
        except (TypeError, ValueError):
            configured_limit = None  # gym.make below reports the bad argument
        play_kwargs["max_dialogue_tokens"] = max_dialogue_tokens
    elif max_dialogue_tokens is not None:
        raise ValueError(f"max_dialogue_tokens={max_dialogue_tokens} applies to the dialogue environments "
                         f"{sorted(refuel_env.ENV_IDS)}; {env_id} has no dialogue length limit: pass None")
    env = gym.make(env_id, **play_kwargs)
    core = env.unwrapped.core
    max_turns = core.max_turns
    H = max_turns if horizon is None else int(horizon)
    if not 1 <= H <= max_turns:
        raise ValueError(f"horizon must be in 1..{max_turns} (the environment's max_turns), got {horizon}; "
                         "raise max_turns in --env-kwargs for a longer horizon")
    items = core.items
    if num_prompts > len(items):
        raise ValueError(f"num_prompts={num_prompts} but the test split has only {len(items)} items; "
                         "lower --num-prompts or use a larger data source (data_source='hub' or a local file)")
    indices = sorted(np.random.default_rng(seed).choice(len(items), size=num_prompts, replace=False).tolist())
    horizons = [min(H, core.max_horizon(items[i])) for i in indices]
    weights = dict(turn_weights) if turn_weights is not None else length_weights([it.num_turns for it in items], H)
    template = judge_template or template_for_dataset(env.unwrapped.config.dataset)
    the_judge = build_judge(judge, env=env, template=template, seed=seed, both_orders=both_orders,
                            sampling=judge_sampling, device=device)
    if isinstance(the_judge, PairwiseJudge) and the_judge.template is None:
        the_judge.template = load_judge_template(template)
    if both_orders and not getattr(the_judge, "both_orders", False):
        raise ValueError(f"both_orders=True, but the judge {the_judge.name!r} ({type(the_judge).__name__}) judges one "
                         "order only; build it with both_orders=True or pass both_orders=False")
    kl_sampling = _kl_sampling(sampling)

    def play(generator: TextGenerator, params: SamplingParams = sampling) -> list[dict[str, Any]]:
        return play_for_evaluation(env_id=env_id, env_kwargs=play_kwargs, policy=generator, sampling=params,
                                   seed=seed, horizons=horizons, prompt_indices=indices)

    loaded: dict[str, TextGenerator] = {}

    def get(spec: TextGenerator | str) -> TextGenerator:
        if isinstance(spec, TextGenerator):
            return spec
        if spec not in loaded:
            loaded[spec] = load_generator(spec, device=device)
        return loaded[spec]

    steps = tqdm(total=1 + 2 * len(policies), desc="evaluate", unit="step", disable=not progress)
    ref_gen = get(reference)
    steps.set_postfix_str(f"play {getattr(ref_gen, 'name', 'reference')}")
    ref_rows = play(ref_gen)
    steps.update()
    ref_score, ref_n = _rm_score(ref_rows)
    results: dict[str, Any] = {
        "config": {
            "env_id": env_id, "env_kwargs": _json_kwargs(play_kwargs), "num_prompts": num_prompts, "horizon": H,
            "seed": seed, "prompt_indices": indices, "item_ids": [r["item_id"] for r in ref_rows],
            "dialogue_horizons": horizons, "env_seeds": [seed + i for i in range(num_prompts)],
            "sampling": asdict(sampling), "judge": the_judge.describe(),
            "both_orders": bool(getattr(the_judge, "both_orders", False)),
            "max_dialogue_tokens": max_dialogue_tokens, "env_max_dialogue_tokens": configured_limit,
            "kl_logprob_temperature": 1.0, "kl_sampling": asdict(kl_sampling), "length_unit": "words",
            "reference": reference if isinstance(reference, str) else getattr(reference, "name", "reference"),
        },
        "turn_weights": weights,
        "reference": {"name": getattr(ref_gen, "name", "reference"), "rm_score": ref_score, "rm_score_n": ref_n,
                      "length_words": _response_words(r["dialogue"] for r in ref_rows if r["dialogue"]),
                      "truncated": sum(1 for r in ref_rows if r.get("reward") is None), "dialogues": ref_rows},
        "policies": {},
    }
    for name, spec in policies.items():
        gen = get(spec)
        steps.set_postfix_str(f"play {name}")
        rows = play(gen)
        steps.update()
        comparisons = []
        truncated_pairs = 0
        for i, (ours, theirs) in enumerate(zip(rows, ref_rows)):
            complete = ours.get("reward") is not None and theirs.get("reward") is not None
            truncated_pairs += not complete
            last = min(ours["turns_reached"], theirs["turns_reached"])
            for h in range(1, last + 1):  # every turn both dialogues reached
                comparisons.append(Comparison(truncate_dialogue(ours["dialogue"], h),
                                              truncate_dialogue(theirs["dialogue"], h), h, i,
                                              ours["item_id"], full=complete and h == last, policy=name))
        steps.set_postfix_str(f"judge {name}")
        records = the_judge.judge(comparisons, progress=progress)
        steps.update()
        for r in records:
            r["policy"] = name
        score, n_scored = _rm_score(rows)
        kept = [r["dialogue"] for r in rows if r.get("reward") is not None]
        kl: dict[str, Any] | None = None
        kl_note = None
        kl_rows: list[dict[str, Any]] | None = None
        if not compute_kl:
            kl_note = "not computed (compute_kl=False)"
        elif _local_model(gen) is None or _local_model(ref_gen) is None:
            kl_note = "needs local transformers models for the policy and the reference"
        else:
            if sampling == kl_sampling:
                kl_dialogues = kept
            else:  # the evaluation's samples are not pi's: sample pi itself (T = 1)
                steps.set_postfix_str(f"play {name} at T = 1 for KL")
                kl_rows = play(gen, kl_sampling)
                kl_dialogues = [r["dialogue"] for r in kl_rows if r.get("reward") is not None]
            if kl_dialogues:
                kl = kl_estimate(gen, ref_gen, kl_dialogues, temperature=1.0)
                kl["samples"] = "the evaluation dialogues" if kl_rows is None else "kl_dialogues (sampled at T = 1)"
            else:
                kl_note = "no complete policy dialogue sampled at T = 1"
        results["policies"][name] = {
            "spec": spec if isinstance(spec, str) else getattr(spec, "name", name),
            "win_rate": win_rates(records, horizon=H, weights=weights),
            "rm_score": score, "rm_score_n": n_scored,
            "kl": kl, "kl_note": kl_note,
            "length_words": _response_words(kept),
            "truncated_pairs": truncated_pairs,
            "records": records, "dialogues": rows,
            **({"kl_dialogues": kl_rows} if kl_rows is not None else {}),
        }
    steps.close()
    env.close()
    return results


# ------------------------------------------------------------------------------ reports


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _get_turn(table: Mapping[Any, Any], h: int) -> Any:
    return table.get(h, table.get(str(h)))


def markdown_table(results: Mapping[str, Any]) -> str:
    """Rows = policies (and the reference), columns h=1..H, avg, weighted avg, full, RM score, KL, length."""
    H = int(results["config"]["horizon"])
    head = ["policy", *[f"h={h}" for h in range(1, H + 1)], "avg", "weighted avg", "full dialogue",
            "RM score", "KL(pi‖ref)", "length (words)", "n", "parse failures"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, p in results["policies"].items():
        wr = p["win_rate"]
        cells = [name]
        for h in range(1, H + 1):
            t = _get_turn(wr["per_turn"], h)
            cells.append(_pct(t["win_rate"]) if t and t["n"] else "-")
        kl = p.get("kl")
        cells += [_pct(wr["average"]), _pct(wr["weighted_average"]), _pct(wr["full_dialogue"]["win_rate"]),
                  _num(p["rm_score"]), _num(kl["mean"], "{:.2f}") if kl else "-", _num(p["length_words"], "{:.1f}"),
                  str(wr["n"]), str(wr["parse_failures"])]
        lines.append("| " + " | ".join(cells) + " |")
    ref = results["reference"]
    lines.append("| " + " | ".join([f"{ref['name']} (reference)", *["-"] * H, "-", "-", "-",
                                    _num(ref["rm_score"]), "0", _num(ref["length_words"], "{:.1f}"), "-", "-"]) + " |")
    return "\n".join(lines)


def _limit_sentence(cfg: Mapping[str, Any]) -> str:
    used, configured = cfg.get("max_dialogue_tokens"), cfg.get("env_max_dialogue_tokens")
    limit = "no dialogue length limit" if used is None else f"dialogues limited to {used} tokens"
    if configured is not None and configured != used:
        return f" Played with {limit} (the environment's training-data limit max_dialogue_tokens={configured} is off)."
    return f" Played with {limit}." if used is not None else ""


def markdown_report(results: Mapping[str, Any]) -> str:
    """The table with what it measures, the intervals and the run's configuration."""
    cfg = results["config"]
    judge = cfg["judge"]
    H = int(cfg["horizon"])
    out = [
        f"# Win rates against the reference ({cfg['reference']})",
        "",
        f"Environment `{cfg['env_id']}` (test split), {cfg['num_prompts']} held-out prompts, H = {H}, seed {cfg['seed']}; "
        f"judge: {judge.get('kind', '')} `{judge.get('name')}`" + (" (both orders)" if cfg["both_orders"] else "") + "."
        + _limit_sentence(cfg),
        "",
        markdown_table(results),
        "",
        "Win rates in % (ties count one half) of the policy's dialogue truncated at turn h against the reference's; "
        "avg: mean over turns; weighted avg: appendix E weights "
        + ", ".join(f"h={h}: {_num(_get_turn(results['turn_weights'], h), '{:.2f}')}" for h in range(1, H + 1))
        + "; full dialogue: each pair at its last turn. RM score: mean environment reward of the full dialogues "
        "(KL penalty off). KL: Monte-Carlo estimate of KL(pi || pi_ref) at temperature 1 (the models themselves), "
        "from dialogues the policy sampled at T = 1 (sum over turns of log pi - log pi_ref). "
        "Length: mean words per response.",
        "",
        "## 95 % Wilson intervals per turn",
        "",
        "| policy | " + " | ".join(f"h={h}" for h in range(1, H + 1)) + " |",
        "|---|" + "---|" * H,
    ]
    for name, p in results["policies"].items():
        cells = []
        for h in range(1, H + 1):
            t = _get_turn(p["win_rate"]["per_turn"], h)
            cells.append(f"{_pct(t['ci_low'])}–{_pct(t['ci_high'])} (n={t['n']})" if t and t["n"] else "-")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [f"- {name}: KL {p['kl_note']}" for name, p in results["policies"].items() if p.get("kl_note")]
    notes += [f"- {name}: {p['truncated_pairs']} pair(s) with a dialogue the environment truncated: judged at the "
              "turns both reached, no full-dialogue judgement"
              for name, p in results["policies"].items() if p["truncated_pairs"]]
    notes += [f"- {name}: {p['win_rate']['failures']} comparison(s) without an outcome "
              f"({p['win_rate']['parse_failures']} unparsed judge answers)"
              for name, p in results["policies"].items() if p["win_rate"]["failures"]]
    notes += [f"- {name}: avg and weighted avg cover turns {p['win_rate']['turns_in_average']} only (no judgement "
              "at the others)" for name, p in results["policies"].items()
              if len(p["win_rate"]["turns_in_average"]) < H]
    if notes:
        out += ["", *notes]
    return "\n".join(out) + "\n"


def plot_win_rates(results: Mapping[str, Any], path: str | Path) -> Path:
    """Win rate by turn, one line per policy with its 95 % interval as a band; 50 % dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H = int(results["config"]["horizon"])
    fig, ax = plt.subplots(figsize=(6, 4))
    turns = list(range(1, H + 1))
    for name, p in results["policies"].items():
        rows = [_get_turn(p["win_rate"]["per_turn"], h) for h in turns]
        xs = [h for h, t in zip(turns, rows) if t and t["n"]]
        ts = [t for t in rows if t and t["n"]]
        if not xs:
            continue
        line, = ax.plot(xs, [100 * t["win_rate"] for t in ts], marker="o", label=name)
        ax.fill_between(xs, [100 * t["ci_low"] for t in ts], [100 * t["ci_high"] for t in ts],
                        color=line.get_color(), alpha=0.2)
    ax.axhline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(turns)
    ax.set_ylim(0, 100)
    ax.set_xlabel("turn h")
    ax.set_ylabel("win rate against the reference (%)")
    ax.set_title(f"Win rate by turn vs {Path(str(results['config']['reference'])).name} (95 % Wilson bands)", fontsize=10)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def write_reports(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.md, results.json (NaN as null) and winrate_by_turn.png; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "json": out / "results.json", "plot": out / "winrate_by_turn.png"}
    paths["markdown"].write_text(markdown_report(results))
    paths["json"].write_text(json.dumps(_jsonable(results), indent=1, ensure_ascii=False))
    plot_win_rates(results, paths["plot"])
    return paths


__all__ = [
    "Comparison", "HH_JUDGE_TEMPLATE", "JUDGE_TEMPLATES", "Judge", "ModelSpec", "PairwiseJudge",
    "RewardJudge", "SPEC_HELP", "SpecError", "ULTRAINTERACT_JUDGE_TEMPLATE", "build_judge", "check_spec", "evaluate_policies",
    "TEMPLATE_HELP", "comparison_order", "kl_estimate", "length_weights", "load_generator", "load_judge_template",
    "play_for_evaluation", "markdown_report", "markdown_table", "parse_preference",
    "parse_spec", "plot_win_rates", "render_dialogue", "response_logprobs", "split_named_spec", "template_for_dataset", "truncate_dialogue",
    "turn_pairs", "weighted_average", "wilson_interval", "win_rates", "write_reports",
]
