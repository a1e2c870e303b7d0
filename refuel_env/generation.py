"""Text generation: batched chat completion behind one interface.

A :class:`TextGenerator` takes a batch of conversations (lists of chat messages) and returns one
:class:`Completion` per conversation. The simulated user uses one; the agents use one as the
policy. Every request can carry its own integer seed: a seeded request gives the same text
whatever else is in its batch, so a single environment and a batched vector environment agree,
and a branch restored from a snapshot replays exactly.

:class:`TransformersGenerator` is the transformers implementation: the model's own chat
template, left padding, batched ``generate``, and stop at the end of the assistant's turn.
Per-request seeds: each row samples from its own ``torch.Generator`` by inverse CDF (see
:class:`SeededSampler`), so a row's tokens depend only on its own seed and logits.

Prefix reuse: requests of a batch that share a long token prefix (the two branches of a snapshot
share the whole dialogue; all simulated-user prompts share the user's instructions) have that
prefix prefilled once. :func:`group_by_prefix` partitions a batch into such groups;
:func:`pack_prompts` lays each row out as ``[pads, shared prefix | pads, own suffix]`` so that every
group's prefix ends at the same column; the prefixes' KV cache is computed once per group and
copied to the group's rows, and ``generate`` continues from it over the suffix columns. Pads
are masked and position ids follow the attention mask, so each row sees exactly the positions
and tokens it would see alone: the output is the same as without reuse, up to floating-point
rounding (token-identical in the tests, which run the model in float64: in float32 a random
tiny model's flat distribution lets a rounding difference move a seeded draw to the next token).

Reuse across calls: a dialogue's next prompt extends what an earlier call already computed (the
policy's next turn starts with its previous prompt and reply; the simulated user's rendering of
the dialogue grows the same way; both branches of a snapshot start from the roll-in). After each
``generate`` the generator keeps every row's KV, prompt and sampled tokens without pads, in a
byte-bounded LRU store (:mod:`refuel_env.kv_store`, ``kv_cache_bytes``); at the next call a prompt
that shares at least ``min_prefix_tokens`` tokens with a stored sequence takes their KV from it,
right-aligned in the prefix columns of the same layout, and prefills only the rest. A batch uses
whichever of stored prefixes, within-call groups (among the rows without a stored prefix), both
or neither prefills the fewest positions (:func:`layout_cost`). The store is emptied when the
weights change (a fingerprint of the parameters, read at each call): the policy generator wraps
the very module that training updates in place.
"""

from __future__ import annotations

import abc
import inspect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch

from refuel_env.kv_store import KVEntry, KVStore, weights_fingerprint
from refuel_env.types import Message

_ROLES = ("system", "user", "assistant")


class GenerationError(ValueError):
    """A request a generator cannot serve (bad input, or longer than the model's context)."""


class ContextLengthError(GenerationError):
    """A prompt that leaves no room to generate within the model's context."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")


@dataclass(frozen=True)
class Completion:
    """One generated assistant message.

    ``token_ids`` are the tokens the model sampled, in order, with the end-of-turn token last when
    one was sampled (``finish_reason="stop"`` on it) and none when the budget ran out
    (``"length"``); ``None`` where the backend does not report tokens (an HTTP endpoint).
    ``text`` is their decoding without special tokens, stripped of surrounding whitespace, so it
    re-tokenises to these tokens only up to that stripping: training scores ``token_ids``.
    ``completion_tokens`` leaves the end-of-turn token out.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    token_ids: tuple[int, ...] | None = None


def validate_conversation(messages: Sequence[Message], where: str) -> None:
    """Raise :class:`GenerationError` unless ``messages`` is a list of role/content messages."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise GenerationError(f"{where}: a conversation must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise GenerationError(
                f"{where}: message {i} must be a dict with role in {_ROLES} and str content, got {m!r:.120}"
            )


def encode_chat(
    tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool = True, literal_content: bool = False
) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template.

    With ``literal_content``, the special tokens come from the template only: a special token's text
    inside a message's content (``"<|im_end|>\\n<|im_start|>system"``) is tokenised as ordinary text,
    so a message cannot open or close a turn. Without it, the rendered text is tokenised as a whole,
    as the model's own tokenizer does (and as ``refuel_agents.logprobs`` scores). Both give the same ids
    for contents that hold no special token's text.
    """
    messages = list(messages)
    specials = _special_token_pattern(tokenizer) if literal_content else None
    if specials is None or not any(specials.search(m["content"]) for m in messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    # Each special token's text in a content becomes its own private-use character (plane 15), which
    # no template changes; the rendered text is then split at the template's own special tokens and
    # the pieces between them tokenised with the marked texts put back and read as ordinary text.
    literal: list[str] = []

    def mark(match: re.Match) -> str:
        literal.append(match.group(0))
        if len(literal) > _MARKS:
            raise GenerationError(f"a conversation holds more than {_MARKS} special-token texts in its messages")
        return chr(_MARK_BASE + len(literal) - 1)

    if any(_MARK_BASE <= ord(c) < _MARK_BASE + _MARKS for m in messages for c in m["content"]):
        raise GenerationError("message contents hold characters of plane 15 (private use); they cannot be encoded literally")
    marked = [{**m, "content": specials.sub(mark, m["content"])} for m in messages]
    text = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=add_generation_prompt)
    marks = re.compile(f"[{chr(_MARK_BASE)}-{chr(_MARK_BASE + _MARKS - 1)}]")
    ids: list[int] = []
    for i, piece in enumerate(specials.split(text)):
        if i % 2:  # a special token the template wrote
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        elif piece:
            ordinary = marks.sub(lambda m: literal[ord(m.group(0)) - _MARK_BASE], piece)
            ids.extend(tokenizer(ordinary, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    return ids


_MARK_BASE, _MARKS = 0xF0000, 0xFFFE


def _special_token_pattern(tokenizer: Any) -> re.Pattern | None:
    """A pattern matching the text of any of the tokenizer's special tokens (longest first), in a group."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {t.content for t in decoder.values() if t.special} | set(getattr(tokenizer, "all_special_tokens", []))
    texts = sorted((t for t in texts if t), key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, texts)) + ")") if texts else None


def validate_request(conversations: Sequence[Sequence[Message]], seeds: Sequence[int] | None, backend: str) -> None:
    """Every backend's checks of a ``chat`` call: a non-empty batch, valid messages, int seeds."""
    if len(conversations) == 0:
        raise GenerationError(f"{backend}: empty batch; pass at least one conversation")
    for i, conv in enumerate(conversations):
        validate_conversation(conv, f"{backend}, conversation {i}")
    validate_seeds(seeds, len(conversations), backend)


def validate_seeds(seeds: Sequence[int] | None, n: int, backend: str) -> None:
    if seeds is None:
        return
    if len(seeds) != n:
        raise GenerationError(f"{backend}: got {len(seeds)} seeds for {n} conversations")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int):
            raise GenerationError(f"{backend}: seed {i} must be an int, got {type(s).__name__} {s!r}")


class TextGenerator(abc.ABC):
    """Batched chat completion: messages in, text out."""

    name: str
    max_context: int

    @abc.abstractmethod
    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        """Complete each conversation with one assistant message."""

    @abc.abstractmethod
    def count_tokens(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> int:
        """Tokens of ``messages`` under the model's chat template."""


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf; rows are independent."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class SeededSampler:
    """A ``generate`` logits processor that samples each row with its own seeded generator.

    Used with greedy decoding: each step draws one uniform number u per row from that row's
    generator and keeps only the token where the row's cumulative probability (after temperature,
    top-k and top-p) first exceeds u, an exact inverse-CDF sample. One random number per row and
    step keeps sampling cheap at large batch sizes, and a row's draws never depend on the others.
    """

    def __init__(self, seeds: Sequence[int], params: SamplingParams):
        self.params = params
        self.generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = filter_logits(scores.float() / self.params.temperature, self.params.top_k, self.params.top_p)
        cdf = torch.softmax(logits.double(), dim=-1).cumsum(dim=-1)
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators]).to(cdf.device)
        chosen = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp_(max=cdf.shape[-1] - 1)
        # A token of zero probability can never be chosen, even at a rounding edge.
        chosen = torch.where(torch.gather(logits, -1, chosen) == float("-inf"), logits.argmax(-1, keepdim=True), chosen)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, chosen, 0.0)


@dataclass(frozen=True)
class PrefixGroup:
    """Requests of a batch (indices) whose prompts share their first ``prefix_len`` tokens.

    ``prefix_len`` is 0 for a request that shares nothing worth reusing; otherwise it is shorter
    than every member's prompt, so each member keeps at least one token to feed ``generate``.
    """

    members: tuple[int, ...]
    prefix_len: int


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def group_by_prefix(
    prompts: Sequence[Sequence[int]], min_prefix_tokens: int, max_group_size: int | None = None
) -> list[PrefixGroup]:
    """Partition ``prompts`` into groups that share a prefix of at least ``min_prefix_tokens``.

    Sorted lexicographically, prompts with a common prefix are neighbours; the sorted list is cut
    into runs (a run shares the smallest prefix of its neighbour pairs) so as to save the most
    prefill tokens, ``(len(run) - 1) * shared``, by dynamic programming. So four pairs that each
    share 400 tokens stay four groups, rather than one group sharing the 30 tokens common to all.
    Every index appears in exactly one group; a request alone in its run gets ``prefix_len=0``.
    Groups hold at most ``max_group_size`` requests (one generation batch), which also bounds the
    work to ``len(prompts) * max_group_size`` steps.
    """
    if min_prefix_tokens < 1:
        raise GenerationError(f"min_prefix_tokens must be >= 1, got {min_prefix_tokens!r}")
    if max_group_size is not None and max_group_size < 1:
        raise GenerationError(f"max_group_size must be >= 1, got {max_group_size!r}")
    longest_run = max_group_size or len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    neighbour_lcp = [common_prefix_len(prompts[a], prompts[b]) for a, b in zip(order, order[1:])]
    # best[j]: most tokens saved on order[:j]; start[j], shared[j]: the last run order[start:j].
    best, start, shared = [0] * (len(order) + 1), [0] * (len(order) + 1), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        best[j], start[j], shared[j] = best[j - 1], j - 1, 0
        run_shared = len(prompts[order[j - 1]]) - 1
        for i in range(j - 2, max(j - 1 - longest_run, -1), -1):
            run_shared = min(run_shared, neighbour_lcp[i], len(prompts[order[i]]) - 1)
            if run_shared < min_prefix_tokens:
                break
            if best[i] + (j - 1 - i) * run_shared > best[j]:
                best[j], start[j], shared[j] = best[i] + (j - 1 - i) * run_shared, i, run_shared
    groups = []
    j = len(order)
    while j > 0:
        groups.append(PrefixGroup(members=tuple(order[start[j] : j]), prefix_len=shared[j]))
        j = start[j]
    return groups[::-1]


def prefix_reuse_pays(prompts: Sequence[Sequence[int]], groups: Sequence[PrefixGroup]) -> bool:
    """Whether prefilling the shared prefixes once costs fewer token positions than plain padding.

    Plain: every row is padded to the longest prompt. With reuse: one row per shared prefix over
    the prefix columns, plus every row over the suffix columns (see :func:`pack_prompts`).
    """
    prefix_lens = prefix_lengths(len(prompts), groups)
    shared = [g for g in groups if g.prefix_len > 0]
    if not shared:
        return False
    suffix_width = max(len(p) - k for p, k in zip(prompts, prefix_lens))
    reuse = len(shared) * max(prefix_lens) + len(prompts) * suffix_width
    return reuse < len(prompts) * max(len(p) for p in prompts)


def prefix_lengths(n: int, groups: Sequence[PrefixGroup]) -> list[int]:
    """Each of ``n`` requests' shared prefix length, from its group."""
    lengths = [0] * n
    for g in groups:
        for i in g.members:
            lengths[i] = g.prefix_len
    return lengths


def pack_prompts(
    prompts: Sequence[Sequence[int]], prefix_lens: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lay prompts out as ``[pads, prefix | pads, suffix]`` rows: (input_ids, attention_mask, prefix width).

    Each prompt is split after its ``prefix_lens[i]`` tokens; prefixes are right-aligned in the
    first ``max(prefix_lens)`` columns and suffixes in the rest, pads masked. With no prefixes this
    is plain left padding. Position ids taken from the mask's running sum (as ``generate`` does)
    give every real token the position it has in its own prompt.
    """
    prefix_width = max(prefix_lens, default=0)
    suffix_width = max(len(p) - k for p, k in zip(prompts, prefix_lens))
    input_ids = torch.full((len(prompts), prefix_width + suffix_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, (ids, k) in enumerate(zip(prompts, prefix_lens)):
        if k:
            input_ids[row, prefix_width - k : prefix_width] = torch.tensor(ids[:k])
            attention_mask[row, prefix_width - k : prefix_width] = 1
        input_ids[row, prefix_width + suffix_width - (len(ids) - k) :] = torch.tensor(ids[k:])
        attention_mask[row, prefix_width + suffix_width - (len(ids) - k) :] = 1
    return input_ids, attention_mask, prefix_width


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip pads, the rule ``generate`` applies: running count of real tokens minus one."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def supports_prefix_reuse(model: Any) -> bool:
    """True for decoder models whose default cache is a plain full-attention ``DynamicCache``.

    Sliding-window, chunked or linear-attention layers count cached columns, pads included, so a
    pad in the middle of a row would change what they see; such models generate without reuse.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    # generate refuses a cache object when the generation config names a cache implementation.
    if getattr(getattr(model, "generation_config", None), "cache_implementation", None) is not None:
        return False
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _cache_kwarg(model: Any) -> str:
    """The name under which ``model.forward`` takes a KV cache: ``cache`` in recent 5.x releases, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def layout_cost(prompts: Sequence[Sequence[int]], prefix_lens: Sequence[int], groups: Sequence[PrefixGroup]) -> int:
    """Token positions that a :func:`pack_prompts` layout prefills.

    Each shared group's first member over the groups' prefix columns, every row over the suffix
    columns; prefixes that come from stored KV (:class:`refuel_env.kv_store.KVStore`) cost nothing.
    Without prefixes this is plain padding: every row over the longest prompt.
    """
    suffix_width = max(len(p) - k for p, k in zip(prompts, prefix_lens))
    group_width = max((g.prefix_len for g in groups), default=0)
    return len(groups) * group_width + len(prompts) * suffix_width


#: Default byte budget of the KV kept between ``chat`` calls (:class:`TransformersGenerator`).
DEFAULT_KV_CACHE_BYTES = 2**30


class TransformersGenerator(TextGenerator):
    """A transformers causal LM generating with its chat template, batched with left padding.

    ``prefix_cache`` (default on) prefills a prefix of at least ``min_prefix_tokens`` tokens once
    for all requests of a batch that share it (see the module docstring); it is off for models
    whose cache cannot take it (:func:`supports_prefix_reuse`), and ``prefix_cache`` then reads
    False. ``prefix_tokens_reused`` counts the prompt tokens whose prefill was skipped so far.

    ``kv_cache_bytes`` (default 1 GiB; 0 = off) bounds the KV kept between calls: every generated
    sequence's KV is stored (:attr:`kv_store`, least recently used evicted first) and a later
    prompt that starts with at least ``min_prefix_tokens`` of the same tokens prefills only the
    rest. ``kv_tokens_reused`` counts the prompt tokens served from it. The store is emptied
    whenever the model's weights change (checked at each call), and is None for models whose
    cache cannot take reuse.

    ``literal_content`` tokenises special tokens' text inside message contents as ordinary text
    (:func:`encode_chat`): on for the simulated user (``refuel_env.components`` builds it so), whose
    prompt holds the policy's actions; off by default, so that a policy's prompts are tokenised as
    the training code scores them.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 32,
        max_context: int | None = None,
        name: str | None = None,
        prefix_cache: bool = True,
        min_prefix_tokens: int = 32,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        literal_content: bool = False,
    ):
        if tokenizer.chat_template is None:
            raise GenerationError(f"transformers backend: tokenizer of {name or 'the model'} has no chat template")
        if not isinstance(min_prefix_tokens, int) or min_prefix_tokens < 1:
            raise GenerationError(f"transformers backend: min_prefix_tokens must be an int >= 1, got {min_prefix_tokens!r}")
        if isinstance(kv_cache_bytes, bool) or not isinstance(kv_cache_bytes, int) or kv_cache_bytes < 0:
            raise GenerationError(
                f"transformers backend: kv_cache_bytes must be an int >= 0 (bytes of KV kept between calls, e.g. "
                f"2**30; 0 turns cross-call reuse off), got {kv_cache_bytes!r}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.literal_content = bool(literal_content)
        self.batch_size = batch_size
        self.name = name or getattr(model.config, "_name_or_path", "model")
        config_context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_context = int(max_context or min(config_context, tokenizer.model_max_length))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_token_ids = end_of_turn_token_ids(model, tokenizer)
        reusable = supports_prefix_reuse(model)
        self.prefix_cache = bool(prefix_cache) and reusable
        self.min_prefix_tokens = min_prefix_tokens
        self.prefix_tokens_reused = 0
        self.kv_store = KVStore(kv_cache_bytes, min_prefix_tokens) if kv_cache_bytes and reusable else None
        self.kv_tokens_reused = 0
        self._weights: tuple | None = None
        self._rng = torch.Generator().manual_seed(torch.initial_seed() % (2**63))

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        **kwargs: Any,
    ) -> TransformersGenerator:
        model, tokenizer = load_causal_lm(str(path), device or default_device(), _dtype_name(dtype))
        return cls(model, tokenizer, name=str(path), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        return encode_chat(
            self.tokenizer, messages, add_generation_prompt=add_generation_prompt, literal_content=self.literal_content
        )

    def count_tokens(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> int:
        return len(self.encode(messages, add_generation_prompt=add_generation_prompt))

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        backend = f"transformers backend ({self.name})"
        validate_request(conversations, seeds, backend)
        if seeds is None and params.temperature > 0:
            seeds = torch.randint(0, 2**31 - 1, (len(conversations),), generator=self._rng).tolist()

        prompts = [self.encode(conv) for conv in conversations]
        for i, ids in enumerate(prompts):
            if len(ids) >= self.max_context:
                raise ContextLengthError(
                    f"{backend}: conversation {i} has {len(ids)} prompt tokens, at or beyond the model's "
                    f"context of {self.max_context}; shorten the dialogue or use a longer-context model"
                )
        self._check_weights()
        results: list[Completion | None] = [None] * len(prompts)
        order = self._batch_order(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            chunk_seeds = [seeds[i] for i in chunk] if seeds is not None else None
            for i, completion in zip(chunk, self._generate([prompts[i] for i in chunk], params, chunk_seeds)):
                results[i] = completion
        return results  # type: ignore[return-value]

    def clear_kv_cache(self) -> None:
        """Drop the KV kept between calls (done automatically when the weights change)."""
        if self.kv_store is not None:
            self.kv_store.clear()

    def _check_weights(self) -> None:
        """Empty the KV store when the weights are not those that computed it (:func:`weights_fingerprint`)."""
        if self.kv_store is None:
            return
        fingerprint = weights_fingerprint(self.model)
        if fingerprint is None or fingerprint != self._weights:
            self.kv_store.clear()
        self._weights = fingerprint

    def _batch_order(self, prompts: list[list[int]]) -> list[int]:
        """Order requests so that a batch wastes little on padding and keeps prefix groups together.

        Requests with stored KV come first, by the length of what is left to prefill; the others
        follow, without prefix reuse by prompt length, with it group by group (members by length,
        the groups by their shortest prompt), so that a group's members land in the same batch.
        """
        stored = [self.kv_store.lookup(p)[1] if self.kv_store is not None else 0 for p in prompts]
        hits = sorted((i for i in range(len(prompts)) if stored[i]), key=lambda i: len(prompts[i]) - stored[i])
        rest = [i for i in range(len(prompts)) if not stored[i]]
        if not self.prefix_cache:
            return hits + sorted(rest, key=lambda i: len(prompts[i]))
        groups = group_by_prefix([prompts[i] for i in rest], self.min_prefix_tokens, self.batch_size)
        members = [sorted((rest[j] for j in g.members), key=lambda i: len(prompts[i])) for g in groups]
        members.sort(key=lambda m: len(prompts[m[0]]))
        return hits + [i for m in members for i in m]

    def _layout(
        self, prompts: list[list[int]]
    ) -> tuple[list[int], list[PrefixGroup], dict[int, tuple[KVEntry, int]]]:
        """Each row's prefix length, the shared groups and the stored prefixes of the cheapest layout.

        Candidates: no reuse, groups among all rows (the within-call reuse), stored prefixes alone,
        stored prefixes plus groups among the other rows; the one that prefills the fewest
        positions (:func:`layout_cost`) wins, a tie to the one with less reuse.
        """
        n = len(prompts)
        hits = [self.kv_store.lookup(p) if self.kv_store is not None else (None, 0) for p in prompts]
        stored = {i: (entry, k) for i, (entry, k) in enumerate(hits) if entry is not None}

        def shared_groups(rows: list[int]) -> list[PrefixGroup]:
            if not self.prefix_cache or len(rows) < 2:
                return []
            groups = group_by_prefix([prompts[i] for i in rows], self.min_prefix_tokens)
            return [PrefixGroup(tuple(rows[j] for j in g.members), g.prefix_len) for g in groups if g.prefix_len]

        candidates = [([], {}), (shared_groups(list(range(n))), {})]
        if stored:
            candidates += [([], stored), (shared_groups([i for i in range(n) if i not in stored]), stored)]
        best = None
        for groups, rows in candidates:
            lengths = [0] * n
            for g in groups:
                for i in g.members:
                    lengths[i] = g.prefix_len
            for i, (_, k) in rows.items():
                lengths[i] = k
            cost = layout_cost(prompts, lengths, groups)
            if best is None or cost < best[0]:
                best = (cost, lengths, groups, rows)
        _, lengths, groups, rows = best
        return lengths, groups, rows

    @torch.inference_mode()
    def _prefix_cache(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix_width: int,
        groups: list[PrefixGroup],
        stored: dict[int, tuple[KVEntry, int]],
    ) -> Any:
        """The KV cache of the prefix columns, in the :func:`pack_prompts` layout.

        Stored prefixes are copied in; each group's prefix is computed once, by its first member,
        and copied to its rows. Pad columns hold zeros (masked, they are never read).
        """
        from transformers import DynamicCache

        if prefix_width == 0:
            return DynamicCache(config=self.model.config)
        group_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        group_width = max((g.prefix_len for g in groups), default=0)
        if groups:
            leaders = [g.members[0] for g in groups]
            columns = slice(prefix_width - group_width, prefix_width)
            mask = attention_mask[leaders, columns].to(self.device)
            computed = DynamicCache(config=self.model.config)
            self.model.base_model(
                input_ids=input_ids[leaders, columns].to(self.device),
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
                use_cache=True,
                **{_cache_kwarg(self.model.base_model): computed},
            )
            group_kv = [(layer.keys, layer.values) for layer in computed.layers]
        template = group_kv or next(iter(stored.values()))[0].layers
        rows = input_ids.shape[0]
        layers = []
        for layer, (key_like, value_like) in enumerate(template):
            keys = key_like.new_zeros((rows, key_like.shape[-3], prefix_width, key_like.shape[-1]))
            values = value_like.new_zeros((rows, value_like.shape[-3], prefix_width, value_like.shape[-1]))
            for row, (entry, k) in stored.items():
                keys[row, :, prefix_width - k :] = entry.layers[layer][0][:, :k]
                values[row, :, prefix_width - k :] = entry.layers[layer][1][:, :k]
            for g_index, g in enumerate(groups):
                for row in g.members:
                    keys[row, :, prefix_width - group_width :] = group_kv[layer][0][g_index]
                    values[row, :, prefix_width - group_width :] = group_kv[layer][1][g_index]
            layers.append((keys, values))
        return DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _store(
        self, prompts: list[list[int]], attention_mask: torch.Tensor, sampled: list[list[int]], width: int, cache: Any
    ) -> None:
        """Keep each row's KV (prompt and sampled tokens, pads left out) in :attr:`kv_store`.

        ``generate`` never feeds its last sampled token, so that token has no KV and is left out.
        """
        computed_steps = cache.get_seq_length() - width
        if self.kv_store is None or computed_steps < 0:
            return
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        for row, (ids, tokens) in enumerate(zip(prompts, sampled)):
            kept = min(len(tokens), computed_steps)
            columns = torch.cat([attention_mask[row].nonzero().squeeze(1), torch.arange(width, width + kept)])
            if len(columns) != len(ids) + kept:
                raise RuntimeError(f"row {row}: {len(columns)} KV columns for {len(ids) + kept} tokens")
            columns = columns.to(self.device)
            self.kv_store.put(list(ids) + list(tokens[:kept]), [(k[row][:, columns], v[row][:, columns]) for k, v in layers])

    @torch.inference_mode()
    def _generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None
    ) -> list[Completion]:
        longest = max(len(p) for p in prompts)
        budget = min(params.max_new_tokens, self.max_context - longest)
        pad = self.tokenizer.pad_token_id
        prefix_lens, groups, stored = self._layout(prompts)
        input_ids, attention_mask, prefix_width = pack_prompts(prompts, prefix_lens, pad)
        cache_kwargs = {}
        cache = None
        if groups or stored or self.kv_store is not None:
            cache = self._prefix_cache(input_ids, attention_mask, prefix_width, groups, stored)
            cache_kwargs[_cache_kwarg(self.model)] = cache
            self.prefix_tokens_reused += sum((len(g.members) - 1) * g.prefix_len for g in groups)
            self.kv_tokens_reused += sum(k for _, k in stored.values())
        width = input_ids.shape[1]
        processors = []
        if params.temperature > 0:
            processors.append(SeededSampler(seeds or [], params))
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            max_new_tokens=budget,
            do_sample=False,
            num_beams=1,
            logits_processor=processors,
            eos_token_id=self.eos_token_ids,
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
            **cache_kwargs,
        )
        completions = []
        samples = []
        for row, ids in enumerate(prompts):
            new = output[row, width:].tolist()
            finish: Literal["stop", "length"] = "length"
            sampled = new
            for pos, tok in enumerate(new):
                if tok in self.eos_token_ids:
                    new, sampled, finish = new[:pos], new[: pos + 1], "stop"
                    break
            samples.append(sampled)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            text, stopped = apply_stop_strings(text, params.stop)
            completions.append(
                Completion(
                    text=text.strip(),
                    prompt_tokens=len(ids),
                    completion_tokens=len(new),
                    finish_reason="stop" if stopped else finish,
                    token_ids=None if stopped else tuple(sampled),
                )
            )
        if cache is not None and self.kv_store is not None:
            self._store(prompts, attention_mask, samples, width, cache)
        return completions


def apply_stop_strings(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string; report whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def end_of_turn_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end an assistant turn: eos of the tokenizer and of the generation config."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    ids.discard(None)
    if not ids:
        raise GenerationError("the tokenizer and generation config name no end-of-turn (eos) token")
    return sorted(ids)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype_name(dtype: str | torch.dtype | None) -> str:
    if dtype is None:
        return "auto"
    return str(dtype).removeprefix("torch.")


@lru_cache(maxsize=8)
def load_causal_lm(path: str, device: str, dtype: str) -> tuple[Any, Any]:
    """Load (and cache per process) a causal LM and its tokenizer; fp32 on CPU, bf16 on GPU by default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except OSError as err:
        raise GenerationError(
            f"cannot load the model {path!r}: {err}. This machine may have no network or no access to the "
            "hub; download it where you can (`hf download <id>`), copy it here and pass its local path, "
            "or set HF_HOME to a cache that holds it."
        ) from err
    tokenizer.padding_side = "left"
    return model.to(device).eval(), tokenizer
