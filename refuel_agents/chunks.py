"""Collection stored chunk by chunk, so that a run stopped mid-collection resumes without collecting again.

:func:`collect_in_chunks` runs a collector on consecutive chunks of an iteration's prompts, writes each
chunk's rows and stats atomically as it ends, and reads back the chunks a folder already holds, after
checking that they are of the same prompts and seed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from refuel_agents.checkpoint import write_text_atomic
from refuel_agents.collection import CollectionStats
from refuel_agents.distributed import merge_stats

#: Collects the given prompts with the given seed: (prompt indices, seed) -> (rows, stats).
ChunkCollector = Callable[[list[int], int], tuple[list[dict[str, Any]], CollectionStats]]


def collect_in_chunks(collect: ChunkCollector, folder: Path | None, indices: Sequence[int], seed: int,
                      chunk_prompts: int) -> tuple[list[dict[str, Any]], CollectionStats]:
    """Collect ``indices`` chunk by chunk, each chunk stored in ``folder`` as soon as it ends.

    Chunk k holds the prompts ``indices[k * c : (k + 1) * c]`` (c = ``chunk_prompts``; 0: all in one chunk) and
    is collected with the seed ``seed`` + its start, so each prompt's sub-environment is seeded with ``seed`` +
    its position, as in one collection of all the prompts; the collector's own draws (h, branch and sampling
    seeds) follow the chunk's seed. A chunk that ``folder`` holds already (``chunk_<k>.json``, written
    atomically) is read back instead of collected, after checking that it is of the same prompts and seed.
    Rows are used as they read back from the file, so a resumed collection and an uninterrupted one give the
    same rows; ``folder=None`` stores nothing (the rows still go through the file's form). Returns the rows and
    the stats summed over the chunks; prints how many chunks were read back.
    """
    size = chunk_prompts or max(1, len(indices))
    starts = range(0, max(1, len(indices)), size)
    rows: list[dict[str, Any]] = []
    parts: list[CollectionStats] = []
    stored = 0
    for k, start in enumerate(starts):
        chunk, chunk_seed = [int(i) for i in indices[start : start + size]], seed + start
        path, text = None if folder is None else folder / f"chunk_{k:04d}.json", None
        if path is not None and path.exists():
            stored += 1
        else:
            chunk_rows, stats = collect(chunk, chunk_seed)
            text = json.dumps({"prompt_indices": chunk, "seed": chunk_seed, "rows": chunk_rows,
                               "stats": _stats_record(stats)}, default=_json_scalar)
            if path is not None:
                write_text_atomic(path, text)
        chunk_rows, stats = _read_chunk(path, text, chunk, chunk_seed)
        rows += chunk_rows
        parts.append(stats)
    if stored:
        print(f"{folder}: {stored} of {len(starts)} chunks of collection read back from disk, not collected again",
              flush=True)
    return rows, merge_stats(parts)


def _json_scalar(value: Any) -> Any:
    """NumPy scalars as the Python numbers they hold; anything else JSON cannot hold is an error, not a string."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a collected row holds a {type(value).__name__}, which a stored chunk cannot hold: {value!r}")


def _stats_record(stats: CollectionStats) -> dict[str, Any]:
    """The stats' fields as JSON can hold them; a Counter as its (key, count) pairs, so that int keys stay ints."""
    out = {}
    for f in fields(stats):
        value = getattr(stats, f.name)
        out[f.name] = {"counter": [[k, n] for k, n in value.items()]} if isinstance(value, Counter) else value
    return out


def _read_chunk(path: Path | None, text: str | None, prompts: list[int],
                seed: int) -> tuple[list[dict[str, Any]], CollectionStats]:
    """A chunk's rows and stats (``text``, else the file ``path``), after checking that it is complete and of
    ``prompts`` collected with ``seed``."""
    fix = "" if path is None else f"delete {path} to collect its prompts again (or {path.parent} for all its chunks)"
    try:
        record = json.loads(text if text is not None else path.read_text())
        stats = CollectionStats(**{name: Counter(dict((k, n) for k, n in value["counter"]))
                                   if isinstance(value, dict) else value for name, value in record["stats"].items()})
        rows, stored_prompts, stored_seed = record["rows"], record["prompt_indices"], record["seed"]
        if not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows) and len(rows) == stats.tuples):
            raise ValueError(f"{len(rows)} rows for {stats.tuples} tuples")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"{path}: a stored chunk of collection that cannot be read ({type(err).__name__}: {err}); "
                         + fix) from err
    if stored_prompts != prompts or stored_seed != seed:
        raise ValueError(f"{path} holds the tuples of prompts {stored_prompts} collected with seed {stored_seed}, but "
                         f"this run collects prompts {prompts} with seed {seed} in it: the folder was collected with "
                         f"other settings; resume with the flags it was collected with, or {fix}")
    return rows, stats
