"""KL(pi || pi_ref) of two local models, estimated from dialogues the policy sampled."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from refuel_agents.logprobs import batched_logprobs, encode_response
from refuel_env.generation import TextGenerator, TransformersGenerator
from refuel_env.types import Message

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
