"""Log-probabilities of one assistant turn under a chat model: log pi(y_h | s_h).

REFUEL, REBEL and DPO all score a response y_h to a state s_h (the transcript ending with a
user turn) by the SUM of the log-probabilities of the response's tokens, its end-of-turn token
included, under the model's own chat template. Nothing here knows token ids or header lengths
of a model family: the response is located by rendering the template twice,

* the state with ``add_generation_prompt=True`` (what the policy was prompted with), and
* the state plus ``{"role": "assistant", "content": y_h}`` with ``add_generation_prompt=False``,

checking that the first is a token prefix of the second, and taking the tokens after that
prefix up to and including the first end-of-turn token. (Where the tokenizer merges tokens
across that boundary, the response is tokenized on its own after the prompt's tokens, as the
policy generated it; see :func:`_split_tokens`.) The end-of-turn tokens are the
tokenizer's eos and the template's own turn terminator, found by rendering a probe assistant
message and taking the first special token after it (``<|im_end|>`` for ChatML,
``<|eot_id|>`` for Llama-3). Whatever the template writes after that token (ChatML's newline)
is not part of the response and is dropped.

:func:`sequence_logprobs` divides the logits by the sampling temperature before the
log-softmax when ``temperature != 1``, as the original REFUEL release did, so that the
log-probabilities are those of the distribution the responses were sampled from.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from refuel_env.types import Message

_PROBE = "refuel-probe-response-7d1c"


class ResponseEncodingError(ValueError):
    """A response cannot be located in the chat template's rendering of the dialogue."""


class SequenceTooLongError(ResponseEncodingError):
    """The prompt plus the response is longer than the allowed number of tokens."""


@dataclass(frozen=True)
class EncodedResponse:
    """The tokens of prompt + response, with a 0/1 mask over the response's tokens."""

    input_ids: list[int]
    response_mask: list[int]

    @property
    def num_response_tokens(self) -> int:
        return sum(self.response_mask)


def _render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    # The rendered template already holds its special tokens (bos included): add none again.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _special_ids(tokenizer: Any) -> set[int]:
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


def end_of_turn_token_ids(tokenizer: Any) -> frozenset[int]:
    """The tokens that end an assistant turn: eos plus the template's turn terminator.

    The terminator is the first special token that the chat template writes after the content
    of a probe assistant message.
    """
    if tokenizer.chat_template is None:
        raise ResponseEncodingError("the tokenizer has no chat_template; set one (a chat model's) first")
    probe = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": _PROBE}]
    rendered = _render(tokenizer, probe, add_generation_prompt=False)
    at = rendered.rfind(_PROBE)
    if at < 0:
        raise ResponseEncodingError("the chat template does not render the content of an assistant message")
    special = _special_ids(tokenizer)
    after = [i for i in _tokenize(tokenizer, rendered[at + len(_PROBE) :]) if i in special][:1]
    ids = {*after, tokenizer.eos_token_id} - {None}
    if not ids:
        raise ResponseEncodingError(
            "the chat template writes no special token after an assistant message and the tokenizer "
            "has no eos token: the end of a response cannot be located"
        )
    return frozenset(ids)


def generation_eos_ids(tokenizer: Any) -> frozenset[int]:
    """The eos ids listed by the generation config saved with the tokenizer's checkpoint
    (``generation_config.json`` beside it, read from local files only); empty when there is none."""
    return _generation_eos_ids(str(getattr(tokenizer, "name_or_path", "") or ""))


@functools.lru_cache(maxsize=16)
def _generation_eos_ids(path: str) -> frozenset[int]:
    if not path:
        return frozenset()
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
    except (OSError, ValueError):
        return frozenset()
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return frozenset(int(i) for i in eos)


def _split_tokens(tokenizer: Any, prompt_text: str, full_text: str) -> tuple[list[int], list[int]]:
    """The generation prompt's tokens and the tokens that follow them in the full rendering.

    Normally the prompt's tokens are a prefix of the full text's tokens. Where the tokenizer merges
    across the boundary (a GPT-2-style pre-tokenizer after a prompt ending in a blank line, or a
    response starting with whitespace), the continuation is tokenized on its own after the
    prompt's tokens, as the policy generated it, provided the two decode to the same text.
    """
    prompt_ids = _tokenize(tokenizer, prompt_text)
    full_ids = _tokenize(tokenizer, full_text)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full_ids[len(prompt_ids) :]
    tail = _tokenize(tokenizer, full_text[len(prompt_text) :])
    if tokenizer.decode(prompt_ids + tail) != tokenizer.decode(full_ids):
        raise ResponseEncodingError(
            "the prompt's tokens are not a prefix of the prompt+response tokens, and tokenizing the response "
            "on its own changes the text (a tokenizer that adds a prefix space to every string?): the "
            f"response {full_text[len(prompt_text) :][:30]!r} cannot be tokenized as a continuation of "
            f"{prompt_text[-30:]!r}"
        )
    return prompt_ids, tail


def encode_response(
    tokenizer: Any,
    prompt_messages: Sequence[Message],
    response: str,
    *,
    max_length: int | None = None,
) -> EncodedResponse:
    """Tokenize state + response through the chat template and mask the response's tokens.

    ``prompt_messages`` is the state s_h and must end with a user message. The mask covers the
    response's tokens and its end-of-turn token; nothing follows that token in ``input_ids``.
    Raises :class:`SequenceTooLongError` (never truncates) when the result has more than
    ``max_length`` tokens, and :class:`ResponseEncodingError` when the template does not let the
    response be located.
    """
    if not prompt_messages or prompt_messages[-1]["role"] != "user":
        raise ResponseEncodingError("prompt_messages must be a non-empty dialogue ending with a user message")
    if not isinstance(response, str):
        raise ResponseEncodingError(f"response must be a string, got {type(response).__name__}")
    end_ids = end_of_turn_token_ids(tokenizer)
    for token in tokenizer.convert_ids_to_tokens(sorted(end_ids)):
        if token in response:
            raise ResponseEncodingError(
                f"the response contains the end-of-turn token text {token!r}; remove it from the response"
            )

    prompt_text = _render(tokenizer, prompt_messages, add_generation_prompt=True)
    full_text = _render(
        tokenizer, [*prompt_messages, {"role": "assistant", "content": response}], add_generation_prompt=False
    )
    if not full_text.startswith(prompt_text):
        raise ResponseEncodingError(
            "chat template problem: the dialogue rendered with the assistant response does not start with "
            "the same dialogue rendered with add_generation_prompt=True, so the response cannot be located "
            f"(generation prompt ends with {prompt_text[-40:]!r})"
        )
    prompt_ids, tail = _split_tokens(tokenizer, prompt_text, full_text)
    end = next((k for k, i in enumerate(tail) if i in end_ids), None)
    if end is None:
        raise ResponseEncodingError(
            f"chat template problem: no end-of-turn token (ids {sorted(end_ids)}) follows the assistant response"
        )
    input_ids = prompt_ids + tail[: end + 1]
    if max_length is not None and len(input_ids) > max_length:
        raise SequenceTooLongError(
            f"prompt + response is {len(input_ids)} tokens ({len(prompt_ids)} prompt, {end + 1} response), "
            f"over the limit of {max_length}; drop this sample or raise max_length"
        )
    return EncodedResponse(input_ids=input_ids, response_mask=[0] * len(prompt_ids) + [1] * (end + 1))


def encode_sampled_response(
    tokenizer: Any,
    prompt_messages: Sequence[Message],
    token_ids: Sequence[int],
    finish_reason: str,
    *,
    max_length: int | None = None,
) -> EncodedResponse:
    """The generation prompt's tokens followed by exactly the tokens the policy sampled.

    ``token_ids`` and ``finish_reason`` come from a :class:`~refuel_env.generation.Completion`.
    A response that ended on its own (``"stop"``) must end with the end-of-turn token it sampled,
    which is scored: the template's terminator, the tokenizer's eos, or any other eos id that the
    checkpoint's generation config lists (:func:`generation_eos_ids`), since a generator stops on
    every one of them (Llama-3-Instruct lists ``<|end_of_text|>`` beside the template's
    ``<|eot_id|>``). A response cut by the token budget
    (``"length"``) is scored without one, since none was sampled. Nothing is re-tokenised, so the
    scored tokens are the sampled ones.
    """
    if not prompt_messages or prompt_messages[-1]["role"] != "user":
        raise ResponseEncodingError("prompt_messages must be a non-empty dialogue ending with a user message")
    ids = [int(i) for i in token_ids]
    end_ids = end_of_turn_token_ids(tokenizer)
    if finish_reason == "stop":
        listed = end_ids | generation_eos_ids(tokenizer)
        if not ids or ids[-1] not in listed:
            raise ResponseEncodingError(
                f"a response with finish_reason 'stop' must end with its sampled end-of-turn token (one of "
                f"{sorted(listed)}), got {ids[-3:]}; a response cut by a stop string has no token ids to score"
            )
    elif finish_reason != "length":
        raise ResponseEncodingError(f"finish_reason must be 'stop' or 'length', got {finish_reason!r}")
    if not ids:
        raise ResponseEncodingError("a response of no tokens has nothing to score")
    if any(i in end_ids for i in ids[:-1]):
        raise ResponseEncodingError("the sampled tokens hold an end-of-turn token before their last position")
    prompt_ids = _tokenize(tokenizer, _render(tokenizer, prompt_messages, add_generation_prompt=True))
    input_ids = prompt_ids + ids
    if max_length is not None and len(input_ids) > max_length:
        raise SequenceTooLongError(
            f"prompt + response is {len(input_ids)} tokens ({len(prompt_ids)} prompt, {len(ids)} response), "
            f"over the limit of {max_length}; drop this sample or raise max_length"
        )
    return EncodedResponse(input_ids=input_ids, response_mask=[0] * len(prompt_ids) + [1] * len(ids))


def collate(encoded: Sequence[EncodedResponse], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``response_mask``, each (B, T) long."""
    if not encoded:
        raise ValueError("collate needs at least one encoded response")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set the tokenizer's pad token (often its eos) first")
    longest = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    response_mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        attention_mask[row, :n] = 1
        response_mask[row, :n] = torch.tensor(e.response_mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per row of (N, V) logits, in float32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per row of (N, V) logits, in float32, without grad."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _prompt_length(e: EncodedResponse) -> int | None:
    """Tokens before the response, when the response is one block that runs to the end (else None)."""
    p = e.response_mask.index(1) if 1 in e.response_mask else 0
    return p if p > 0 and all(e.response_mask[p:]) and not any(e.response_mask[:p]) else None


def collate_shared_prefix(pairs: Sequence[tuple[EncodedResponse, EncodedResponse]],
                          pad_token_id: int) -> dict[str, torch.Tensor] | None:
    """Pack each pair (s + y, s + y') into one row s, y, y' that runs the state s once; None when a pair's
    two sequences do not start with the same state tokens (then :func:`collate` them as two rows).

    Row i is ``s_i y_i y'_i``, right-padded. Positions restart after s for y', and ``segment`` (0 for s,
    1 for y, 2 for y', -1 for padding) gives the attention mask that :func:`_shared_response_logits` builds:
    each response sees s and its own earlier tokens, never the other response, so every token has exactly
    the context and position it has in its own unshared sequence. The result has :func:`collate`'s keys
    (``attention_mask`` marks the tokens that run, ``response_mask`` the scored ones) plus ``position_ids``
    and ``segment``; its rows score 2n sequences, every y first and then every y', as :func:`collate`'s do.
    """
    if not pairs:
        raise ValueError("collate_shared_prefix needs at least one pair")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set the tokenizer's pad token (often its eos) first")
    parts = []
    for a, b in pairs:
        p = _prompt_length(a)
        if p is None or _prompt_length(b) != p or a.input_ids[:p] != b.input_ids[:p]:
            return None
        parts.append((a.input_ids[:p], a.input_ids[p:], b.input_ids[p:]))
    longest = max(len(s) + len(y) + len(y2) for s, y, y2 in parts)
    shape = (len(parts), longest)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids, segment = torch.zeros(shape, dtype=torch.long), torch.full(shape, -1, dtype=torch.long)
    response_mask = torch.zeros(shape, dtype=torch.long)
    for row, (s, y, y2) in enumerate(parts):
        p, n = len(s), len(s) + len(y) + len(y2)
        input_ids[row, :n] = torch.tensor(s + y + y2)
        position_ids[row, :n] = torch.cat([torch.arange(p + len(y)), torch.arange(p, p + len(y2))])
        segment[row, :n] = torch.tensor([0] * p + [1] * len(y) + [2] * len(y2))
        response_mask[row, p:n] = 1
    return {"input_ids": input_ids, "attention_mask": (segment >= 0).long(), "response_mask": response_mask,
            "position_ids": position_ids, "segment": segment}


def _unwrapped(model: Any) -> Any:
    return getattr(model, "module", model)  # a DeepSpeed engine holds the transformers model as .module


@functools.lru_cache(maxsize=32)
def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def attention_windows(model: Any) -> dict[str, int | None] | int | None:
    """How the model's layers limit attention, as a custom mask must reproduce it.

    None: every layer attends to the whole causal past. An int w: every layer sees the last w positions
    (Mistral, Mixtral, Phi-3, Starcoder2: one mask for all layers, windowed when ``config.sliding_window`` is
    set). A dict: the model takes one mask per layer type (``config.layer_types``: Gemma 2 / 3, Qwen2, ...),
    each type's window (None = full). Raises ``ValueError`` naming the model type when a window is set but
    the model's masking is neither of these, since a packed row's mask would then silently drop the window.
    """
    unwrapped = _unwrapped(model)
    config = getattr(unwrapped, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    source = _forward_source(type(getattr(unwrapped, "base_model", unwrapped)))
    types = set(getattr(config, "layer_types", None) or ())
    if "causal_mask_mapping := attention_mask" in source and types <= {"full_attention", "sliding_attention"} and types:
        if types == {"full_attention"}:
            return None
        return {t: window if t == "sliding_attention" else None for t in sorted(types)}
    if "causal_mask_mapping" not in source and "create_sliding_window_causal_mask" in source:
        return int(window)
    raise ValueError(f"shared-prefix scoring builds its own attention mask, and cannot reproduce the sliding-window "
                     f"attention of model type {getattr(config, 'model_type', '?')!r} (sliding_window={window}, "
                     f"layer_types={sorted(types) or None}); turn shared_prefix off (--no-shared-prefix)")


def _shared_prefix_mask(model: Any, segment: torch.Tensor, position_ids: torch.Tensor | None = None) -> Any:
    """The (B, 1, T, T) attention mask of a packed row: causal, within s or the query's own response.

    Padding attends to itself only (no row is fully masked). sdpa takes it as booleans (True = attend); the
    eager implementation adds it to the scores, so it gets 0 / the dtype's minimum. A sliding-window layer
    also drops the keys w or more positions back (:func:`attention_windows`; positions from
    ``position_ids``, which restart for y' as they do in its own sequence); a model with several layer
    types gets one mask per type, as a dict.
    """
    attention = getattr(getattr(_unwrapped(model), "config", None), "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"shared-prefix scoring packs y and y' into one row under a custom attention mask, which "
                         f"attn_implementation={attention!r} does not take; load the model with 'sdpa' or 'eager', or "
                         "turn shared_prefix off (--no-shared-prefix)")
    n = segment.shape[1]
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)
    causal = torch.ones(n, n, dtype=torch.bool, device=segment.device).tril()
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    pad_self = torch.eye(n, dtype=torch.bool, device=segment.device) & (query < 0)
    windows = attention_windows(model)
    if windows is not None and position_ids is None:
        raise ValueError("a sliding-window model's packed mask needs the rows' position_ids")

    def finish(window: int | None) -> torch.Tensor:
        mask = allowed
        if window is not None:
            mask = mask & (position_ids.unsqueeze(1) > position_ids.unsqueeze(2) - window)
        mask = (mask | pad_self).unsqueeze(1)
        if attention == "sdpa":
            return mask
        dtype = next(_unwrapped(model).parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=segment.device).masked_fill(~mask, torch.finfo(dtype).min)

    if isinstance(windows, dict):
        return {layer_type: finish(w) for layer_type, w in windows.items()}
    return finish(windows)


def _shared_response_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """:func:`_response_logits` for :func:`collate_shared_prefix`'s packed rows; row ids 0..2B-1 (y, then y')."""
    input_ids, segment = batch["input_ids"], batch["segment"]
    n, length = input_ids.shape
    response = segment > 0
    first_response = response.float().argmax(dim=1)  # = the state's length in every row
    # Token t of a response is predicted at t - 1, but y''s first token at s's last position, not y's.
    starts = (segment == 2) & (segment.roll(1, dims=1) != 2)
    source = torch.arange(length, device=input_ids.device).expand(n, -1) - 1
    source = torch.where(starts, (first_response - 1).unsqueeze(1).expand(n, -1), source)
    first = int(first_response.min()) - 1  # the output layer runs from here to the end only
    logits = model(input_ids=input_ids, attention_mask=_shared_prefix_mask(model, segment, batch["position_ids"]),
                   position_ids=batch["position_ids"], logits_to_keep=length - first, use_cache=False).logits
    rows = torch.arange(n, device=input_ids.device).unsqueeze(1).expand(n, length)
    kept = logits[rows[response], source[response] - first]
    out_rows = rows[response] + n * (segment[response] == 2).long()
    return kept, input_ids[response], out_rows


def _num_sequences(batch: dict[str, torch.Tensor]) -> int:
    """Sequences scored by a batch: one per row of :func:`collate`, two per packed row."""
    return len(batch["input_ids"]) * (2 if "segment" in batch else 1)


def _response_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Logits at the positions that predict response tokens, as (N, V), with targets and row ids."""
    if "segment" in batch:
        return _shared_response_logits(model, batch)
    input_ids, response_mask = batch["input_ids"], batch["response_mask"].bool()
    if not response_mask.any(dim=1).all():
        raise ValueError("every row of the batch needs at least one response token")
    if response_mask[:, 0].any():
        raise ValueError("a response cannot start at position 0: nothing precedes it to predict it")
    length = input_ids.shape[1]
    # The logit at position t predicts token t + 1; keep only the positions from just before the
    # earliest response start, so the output layer runs on no more positions than needed.
    first = int(response_mask.float().argmax(dim=1).min())
    keep = length - first + 1
    logits = model(
        input_ids=input_ids, attention_mask=batch["attention_mask"], logits_to_keep=keep, use_cache=False
    ).logits[:, :-1]
    targets, mask = input_ids[:, first:], response_mask[:, first:]
    rows = torch.arange(len(input_ids), device=input_ids.device).unsqueeze(1).expand_as(mask)
    return logits[mask], targets[mask], rows[mask]


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def sequence_logprobs(model: Any, batch: dict[str, torch.Tensor], *, temperature: float = 1.0) -> torch.Tensor:
    """Summed response log-probabilities, shape (B,), float32; differentiable when grad is enabled.

    ``batch`` comes from :func:`collate` or :func:`collate_shared_prefix` (then (2B,): every y, then every
    y'). ``model`` is a causal LM that takes ``logits_to_keep``
    (every transformers causal LM does).
    """
    _check_temperature(temperature)
    logits, targets, rows = _response_logits(model, batch)
    per_token = token_logprobs(logits, targets, temperature)
    return torch.zeros(_num_sequences(batch), device=per_token.device).index_add(0, rows, per_token)


def sequence_logprobs_and_entropy(
    model: Any, batch: dict[str, torch.Tensor], *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_logprobs` and the mean per-token entropy of each response (B,), for logging."""
    _check_temperature(temperature)
    logits, targets, rows = _response_logits(model, batch)
    per_token = token_logprobs(logits, targets, temperature)
    n = _num_sequences(batch)
    summed = torch.zeros(n, device=per_token.device).index_add(0, rows, per_token)
    entropy = torch.zeros(n, device=per_token.device).index_add(0, rows, token_entropy(logits, temperature))
    return summed, entropy / torch.bincount(rows, minlength=n)


@torch.no_grad()
def response_rows(tokenizer: Any, states: list[list[dict]], responses: list[str],
                  completions: list[Any] | None = None) -> list[dict]:
    """Rows for :func:`batched_logprobs` of each response after its state: the sampled token ids where a
    completion reports them (as training scores them), else the text through the chat template."""
    completions = completions or [None] * len(responses)
    encoded = [encode_sampled_response(tokenizer, s, c.token_ids, c.finish_reason)
               if c is not None and c.token_ids is not None else encode_response(tokenizer, s, r)
               for s, r, c in zip(states, responses, completions)]
    return [{"input_ids": e.input_ids, "response_mask": e.response_mask} for e in encoded]


def batched_logprobs(model: Any, rows: list[dict], pad_id: int, *, suffix: str = "", batch_size: int,
                     temperature: float, device: torch.device) -> list[float]:
    """log pi(y|s) of each row's encoded response (keys ``input_ids{suffix}`` and
    ``response_mask{suffix}``, ``suffix`` '' or '_prime'), in batches, in eval mode, with
    :func:`sequence_logprobs` (the training function)."""
    out: list[float] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = collate([EncodedResponse(r[f"input_ids{suffix}"], r[f"response_mask{suffix}"]) for r in chunk], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        out.extend(sequence_logprobs(model, batch, temperature=temperature).float().cpu().tolist())
    model.train(was_training)
    return out
