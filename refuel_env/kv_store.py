"""A byte-bounded store of KV caches kept between ``chat`` calls, keyed by the tokens that made them.

In a dialogue the next call's prompt extends the previous one: the policy's next turn is its
last prompt, its own reply and the user's answer; the simulated user's rendering of the dialogue
grows the same way. :class:`KVStore` keeps, for every sequence a generator has run, the keys and
values of its positions (prompt and generated tokens, one tensor pair per layer, without pads),
so that the next call prefills only what is new. A sequence's KV at position ``i`` depends only
on its tokens up to ``i`` (and on the weights), so any stored sequence that shares its first
``n`` tokens with a prompt supplies that prompt's first ``n`` positions: lookups take the longest
common prefix, not only a stored sequence that the prompt extends whole (the simulated user's
prompt, for one, ends with a cue that the next turn's rendering drops).

The store holds at most ``max_bytes`` of tensors and evicts the least recently used sequences.
A sequence whose tokens are a prefix of a newly stored one is dropped: the new one answers
every lookup it would have answered, at least as long. Stored KV is valid only for the weights
that computed it; :func:`weights_fingerprint` tells a generator when they changed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class KVEntry:
    """One stored sequence: its tokens and, per layer, keys and values of shape ``[heads, len, head_dim]``."""

    tokens: np.ndarray
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-d integer arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class KVStore:
    """Least-recently-used KV caches of whole sequences, at most ``max_bytes`` of tensors.

    Only sequences of at least ``min_tokens`` tokens are kept, and a lookup answers only with a
    prefix of at least that length: sequences are indexed by their first ``min_tokens`` tokens,
    so a lookup compares a prompt with the few sequences that start like it.
    """

    def __init__(self, max_bytes: int, min_tokens: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"KVStore: max_bytes must be an int >= 1, got {max_bytes!r}")
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
            raise ValueError(f"KVStore: min_tokens must be an int >= 1, got {min_tokens!r}")
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self.nbytes = 0
        self.evictions = 0
        self.invalidations = 0
        self._entries: OrderedDict[int, KVEntry] = OrderedDict()
        self._by_start: dict[tuple[int, ...], dict[int, None]] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every stored sequence (the weights changed)."""
        if self._entries:
            self.invalidations += 1
        self._entries.clear()
        self._by_start.clear()
        self.nbytes = 0

    def _candidates(self, tokens: np.ndarray) -> list[int]:
        if len(tokens) < self.min_tokens:
            return []
        return list(self._by_start.get(tuple(tokens[: self.min_tokens].tolist()), ()))

    def lookup(self, prompt: Sequence[int]) -> tuple[KVEntry | None, int]:
        """The stored sequence sharing the longest prefix with ``prompt``, and that prefix's length.

        The length is capped at ``len(prompt) - 1`` (generation needs one token to feed) and is at
        least ``min_tokens``; ``(None, 0)`` when no sequence qualifies. A hit counts as a use (LRU).
        """
        tokens = np.asarray(prompt, dtype=np.int64)
        best, best_len = None, 0
        for key in self._candidates(tokens):
            n = common_prefix_length(tokens, self._entries[key].tokens)
            if n > best_len or (n == best_len and best is not None):  # ties: the most recently stored
                best, best_len = key, n
        best_len = min(best_len, len(tokens) - 1)
        if best is None or best_len < self.min_tokens:
            return None, 0
        self._entries.move_to_end(best)
        return self._entries[best], best_len

    def put(self, tokens: Sequence[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Store a sequence's KV (``layers[i]`` = keys, values ``[heads, len(tokens), head_dim]``); True if kept.

        Not kept: a sequence shorter than ``min_tokens``, one larger than the whole budget, or one
        already covered by a stored sequence that it is a prefix of (that one counts as used).
        """
        array = np.asarray(tokens, dtype=np.int64)
        if len(array) < self.min_tokens:
            return False
        for k, v in layers:
            if k.shape[-2] != len(array) or v.shape[-2] != len(array):
                raise ValueError(f"KVStore.put: {len(array)} tokens but KV of {k.shape[-2]}/{v.shape[-2]} positions")
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if nbytes > self.max_bytes:
            return False
        start = tuple(array[: self.min_tokens].tolist())
        for key in self._candidates(array):
            old = self._entries[key].tokens
            n = common_prefix_length(array, old)
            if n == len(array):  # already covered by a longer (or equal) stored sequence
                self._entries.move_to_end(key)
                return False
            if n == len(old):  # the new sequence extends it: it answers every lookup the old one would
                self._remove(key)
        key, self._next_id = self._next_id, self._next_id + 1
        self._entries[key] = KVEntry(array, layers, nbytes)
        self._by_start.setdefault(start, {})[key] = None
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self._remove(next(iter(self._entries)))
            self.evictions += 1
        return True

    def _remove(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        start = tuple(entry.tokens[: self.min_tokens].tolist())
        bucket = self._by_start[start]
        del bucket[key]
        if not bucket:
            del self._by_start[start]


def weights_fingerprint(model: Any) -> tuple | None:
    """A value that changes whenever ``model``'s weights may have changed; None when it cannot be read.

    It combines the module's identity, each parameter's dtype, device, storage address and version
    counter (in-place updates bump it: optimizer steps, ``load_state_dict``, ``copy_`` under
    ``no_grad``) and two checksums of all of each parameter's values, which also catch writes that
    bypass the counters (through ``.data``, as DeepSpeed does) wherever they fall: the sum of every
    row and the sum weighted by the row's index (so that moving values between rows shows too).
    Reading it costs one pass over the weights (on their device) and one small transfer.
    """
    try:
        params = list(model.parameters())
        meta = tuple((p.dtype, p.device, p.data_ptr(), p._version) for p in params)
        sums = []
        with torch.no_grad():
            for p in params:
                if not p.numel():
                    continue
                values = p.detach()
                rows = values.reshape(values.shape[0] if values.dim() > 1 else 1, -1)
                wide = torch.float64 if values.dtype == torch.float64 else torch.float32
                per_row = rows.sum(dim=1, dtype=wide).double()
                weight = torch.arange(1, len(per_row) + 1, dtype=torch.float64, device=per_row.device)
                sums.append(torch.stack([per_row.sum(), (per_row * weight).sum()]))
            sample = torch.cat(sums).tolist() if sums else []
    except RuntimeError:  # inference tensors keep no version counter
        return None
    return (id(model), meta, tuple(sample))
