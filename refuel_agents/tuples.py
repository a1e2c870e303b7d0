"""REFUEL's tuples as training data: token ids and response masks, pair batches, stored rows.

A tuple (s_h, y_h, y'_h, r, r') becomes two encoded sequences, state + y and state + y', whose
masks cover the response's tokens (:mod:`refuel_agents.logprobs`). A micro-batch scores every y
first and then every y' (:func:`pair_batch`: s_h once per tuple, or 2n rows), the layout in which
training and the pi_t / pi_0 scores both run.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refuel_agents import checkpoint as ckpt
from refuel_agents.logprobs import (
    EncodedResponse,
    ResponseEncodingError,
    SequenceTooLongError,
    collate,
    collate_shared_prefix,
    encode_response,
    encode_sampled_response,
)


def encode_pair_response(tokenizer: Any, row: dict, suffix: str, max_seq_len: int | None) -> EncodedResponse:
    """s_h and one of the row's responses as token ids with its response mask.

    A sampled response is scored on exactly its sampled tokens (``response{suffix}_token_ids``:
    the end-of-turn token only when it was sampled; nothing re-tokenised). A response without
    them (a dataset reply, a backend that reports no tokens) is tokenised through the template,
    end-of-turn token included.
    """
    ids = row.get(f"response{suffix}_token_ids")
    if ids is not None:
        return encode_sampled_response(tokenizer, row["state"], ids, row[f"response{suffix}_finish_reason"],
                                       max_length=max_seq_len)
    return encode_response(tokenizer, row["state"], row[f"response{suffix}"], max_length=max_seq_len)


def encode_tuples(rows: list[dict], tokenizer: Any, max_seq_len: int,
                  unencodable: Counter | None = None) -> tuple[list[dict], int]:
    """Add token ids and turn-h response masks for y and y'; drop (and count) tuples too long.

    A tuple whose response cannot be encoded (:class:`ResponseEncodingError`: e.g. a reply that ended on a
    token the chat template does not know as an end of turn) is dropped too, not the iteration: counted by
    reason in ``unencodable``, or, without it, named in a warning.
    """
    kept, too_long = [], 0
    failed: Counter = Counter()
    for row in rows:
        try:
            a = encode_pair_response(tokenizer, row, "", max_seq_len)
            b = encode_pair_response(tokenizer, row, "_prime", max_seq_len)
        except SequenceTooLongError:
            too_long += 1
            continue
        except ResponseEncodingError as error:
            failed[str(error).split(";")[0]] += 1
            continue
        kept.append({**row, "input_ids": a.input_ids, "response_mask": a.response_mask,
                     "input_ids_prime": b.input_ids, "response_mask_prime": b.response_mask})
    if unencodable is not None:
        unencodable.update(failed)
    elif failed:
        warnings.warn(f"dropped {sum(failed.values())} of {len(rows)} tuples whose responses cannot be encoded: "
                      + "; ".join(f"{n} x {why}" for why, n in failed.items()), stacklevel=2)
    return kept, too_long


def pair_batch(rows: list[dict], pad_id: int, device: torch.device, *, shared: bool = False) -> dict[str, torch.Tensor]:
    """One forward batch scoring every y first and then every y' of the rows.

    ``shared``: one packed row s_h, y, y' per tuple, so s_h runs once (:func:`collate_shared_prefix`),
    when both responses of every row follow the same state tokens; otherwise (or ``shared=False``)
    2n right-padded rows [s_h + y ..., s_h + y' ...] (:func:`collate`).
    """
    ys = [EncodedResponse(r["input_ids"], r["response_mask"]) for r in rows]
    primes = [EncodedResponse(r["input_ids_prime"], r["response_mask_prime"]) for r in rows]
    batch = collate_shared_prefix(list(zip(ys, primes)), pad_id) if shared else None
    return {k: v.to(device) for k, v in (batch or collate(ys + primes, pad_id)).items()}


def light_row(row: dict) -> dict:
    """What the iteration's metrics read from a row: gathered from every rank (no token ids or texts)."""
    return {"h": row["h"], "H": row["H"], "reward": row["reward"], "reward_prime": row["reward_prime"],
            "kl": [row[f"logp_t{s}"] - row[f"logp_ref{s}"] for s in ("", "_prime") if f"logp_ref{s}" in row]}


def storable_row(row: dict) -> dict:
    """A row as ``datasets`` stores it: nested reward parts as JSON text (their keys vary)."""
    return {k: json.dumps(v) if k.startswith("reward_parts") else v for k, v in row.items()}


def store_rows(rows: list[dict], keys: list[str], folder: Path) -> None:
    """Write rows atomically as a ``datasets.Dataset``, every row with every one of ``keys`` (those of
    all ranks' rows: ``from_list`` reads the first row's keys only, and the shards must concatenate)."""
    import datasets

    keys = list(dict.fromkeys([*keys, *(k for r in rows for k in r)]))
    with ckpt.atomic_dir(folder) as tmp:
        datasets.Dataset.from_list([storable_row({k: r.get(k) for k in keys}) for r in rows]).save_to_disk(str(tmp))


def collection_metrics(light: list[dict], stats: Any, too_long: int, max_turns: int) -> dict[str, float]:
    """What an iteration's collection logs, from every rank's :func:`light_row` rows and the merged stats."""
    by_h = {h: float(np.mean([r["reward"] - r["reward_prime"] for r in light if r["h"] == h] or [math.nan]))
            for h in range(1, max_turns + 1)}
    drop_rate = stats.as_dict().get("drop_rate_by_h", {})
    kl = [x for r in light for x in r["kl"]]
    return {"collect/tuples": len(light), "collect/dropped": stats.dropped_truncated + too_long,
            "collect/reward_mean": float(np.mean([r["reward"] for r in light] or [math.nan])),
            "collect/user_parse_failures": stats.user_parse_failures,
            # Monte-Carlo KL(pi_t || pi_0) per response: y ~ pi_t, scored at the sampling temperature
            "collect/kl_pi_t_pi_0": float(np.mean(kl)) if kl else math.nan,
            **{f"collect/reward_gap_h{h}": v for h, v in by_h.items()},
            **{f"collect/drop_rate_h{h}": float(v) for h, v in drop_rate.items()}}
