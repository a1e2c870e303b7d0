"""Data parallelism across the ranks of a launcher (torchrun, deepspeed, accelerate launch).

With W ranks, an iteration's prompts are split into W disjoint, contiguous shards
(:func:`shard`); each rank collects its shard, the kept rows of all ranks are shared out so
that every rank trains on its slice of each update of one order over all of them
(:func:`rank_slices`, :func:`share_rows`), and DeepSpeed averages the gradients. The helpers
here are the few collectives that the trainer needs around that (counts, small Python objects),
the layout of the per-rank tuple folders (:func:`shard_dir`, :func:`load_tuples`), and
:func:`full_weights`, which lets one rank
run the trained module a number of times that differs from the other ranks' under ZeRO-3.

On one rank every helper is the identity or a no-op, and the tuples keep their single-rank
layout: ``iteration_<t>/tuples`` is one ``datasets`` folder. With W ranks it holds one folder
per rank, ``rank_<r>-of-<W>``; :func:`load_tuples` reads either as one ``datasets.Dataset``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size): from torch.distributed once initialised, else from the launcher's
    environment variables (RANK / WORLD_SIZE), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank ``rank``'s contiguous block of ``n`` items; block sizes differ by at most 1."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard(items: Sequence, rank: int, world: int) -> tuple[int, list]:
    """(start, rank ``rank``'s block of ``items``): W disjoint blocks that cover ``items`` in order."""
    start, end = shard_bounds(len(items), rank, world)
    return start, list(items[start:end])


def rank_prompts(indices: Sequence[int], rank: int, world: int, seed: int, iteration: int) -> tuple[list[int], int]:
    """Rank ``rank``'s shard of an iteration's prompts and its collection seed.

    With W ranks the prompts are cut into W contiguous blocks. A rank's seed is the iteration's
    ``seed`` plus the position of its block, so the environment seeds each prompt's
    sub-environment (seed + i) as a one-rank run does; the collector's own draws (h, branch and
    sampling seeds) follow the rank's seed. One rank: all prompts, the iteration's seed.
    """
    if len(indices) < world:
        raise ValueError(f"iteration {iteration} has {len(indices)} prompts for {world} ranks: every rank needs at "
                         f"least one; raise --prompts-per-iteration to {world} or more")
    start, mine = shard(indices, rank, world)
    return mine, seed + start


# ------------------------------------------------------------------------------ collectives


def _reduce(value: float, op: Any, device: torch.device | str) -> float:
    if rank_and_world()[1] == 1 or not torch.distributed.is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=op)
    return t.item()


def all_sum(value: float, device: torch.device | str = "cpu") -> float:
    """The sum of ``value`` over all ranks."""
    return _reduce(value, torch.distributed.ReduceOp.SUM, device)


def all_min(value: float, device: torch.device | str = "cpu") -> float:
    """The minimum of ``value`` over all ranks."""
    return _reduce(value, torch.distributed.ReduceOp.MIN, device)


def all_max(value: float, device: torch.device | str = "cpu") -> float:
    """The maximum of ``value`` over all ranks."""
    return _reduce(value, torch.distributed.ReduceOp.MAX, device)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if rank_and_world()[1] == 1 or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def merge_stats(parts: Sequence[Any]) -> Any:
    """One stats dataclass (``CollectionStats`` / ``ModeStats``) from every rank's: counts and
    Counters add up; fields that describe the dataset rather than the shard (the mode, the usable
    items) are the same on every rank and are taken from rank 0."""
    first = parts[0]
    if len(parts) == 1 or not is_dataclass(first):
        return first
    merged = {}
    for f in fields(first):
        values = [getattr(p, f.name) for p in parts]
        if f.name in ("mode", "usable_items", "unusable_items"):
            merged[f.name] = values[0]
        elif isinstance(values[0], Counter):
            merged[f.name] = sum(values, Counter())
        elif isinstance(values[0], int | float):
            merged[f.name] = sum(values)
        else:
            merged[f.name] = values[0]
    return type(first)(**merged)


# ------------------------------------------------------------------------------ ZeRO-3


@contextmanager
def full_weights(engine: Any, enabled: bool = True, module: Any = None) -> Iterator[None]:
    """Hold the trained module's full weights on every rank while the body runs (ZeRO-3, W > 1);
    with ``module``, those of a frozen copy that ``engine.match_precision`` sharded (pi_0) instead.

    Under ZeRO-3 every forward pass gathers each layer's shards from all ranks, so all ranks
    must run the same number of forward passes. Sharded collection, scoring and evaluation do
    not (each rank generates its own dialogues), so around them the parameters are gathered
    once and ZeRO-3's per-module hooks are taken off, then put back: what TRL does for
    generation under ZeRO-3 (``unwrap_model_for_generation``). Costs one full copy of the
    weights per rank for the duration. Every rank must enter it. A no-op elsewhere, and with
    ``enabled=False`` (a body that does not run the trained module).
    """
    if not enabled or engine is None or getattr(engine, "zero_stage", 0) != 3 or engine.world_size == 1:
        yield
        return
    import deepspeed

    if module is None:
        offload, target = engine.model.optimizer.parameter_offload, engine.unwrapped
    elif id(module) in engine.frozen_engines:
        offload, target = engine.frozen_engines[id(module)].optimizer, module  # (DeepSpeedZeRoOffload)
    else:  # a full copy: nothing to gather
        yield
        return
    params = list(target.parameters())
    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            p.ds_active_sub_modules.clear()
        # The module's start-of-forward hook too: until the first update has recorded ZeRO-3's trace, it
        # compares the trace across ranks (a collective) at every forward pass.
        start = offload.fwd_pre_hook.hooks_dict_ref()[offload.fwd_pre_hook.id]
        for hook in [offload.fwd_pre_hook, *offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload.fwd_pre_hook = offload.module.register_forward_pre_hook(start)
            offload._register_deepspeed_module(offload.module)


def push_weights(engine: Any, generator: Any, group_bytes: int = 2**30) -> int:
    """Copy the trained weights into this rank's vLLM engine; returns the most elements gathered at once.

    The parameters go in groups of whole decoder layers of about ``group_bytes`` (vLLM fuses a
    layer's projections and reloads them together: ``VLLMGenerator.update_weights``). Under
    ZeRO-3 each group is gathered from the shards (``deepspeed.zero.GatheredParameters``, every
    rank taking part), loaded, and released before the next, so no rank ever holds the whole
    model twice. The engine's prefix cache is reset after each group. Tied weights (an
    ``lm_head`` sharing the embedding) are pushed once.
    """
    from refuel_env.backends.vllm_backend import layer_chunks

    module = engine.unwrapped
    zero3 = getattr(engine, "zero_stage", 0) == 3
    named = list(module.named_parameters())
    size = {id(p): int(getattr(p, "ds_numel", p.numel())) * p.element_size() for _, p in named}
    # layer_chunks sizes groups by numel * element size of the tensors it is given: hand it stand-ins of the full size
    stand_ins = [(n, torch.empty((), dtype=p.dtype).expand(size[id(p)] // p.element_size())) for n, p in named]
    by_name = dict(named)
    peak = 0
    for chunk in layer_chunks(stand_ins, group_bytes):
        params = [by_name[n] for n, _ in chunk]
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                generator.update_weights([(n, p.data) for (n, _), p in zip(chunk, params)])
        else:
            generator.update_weights([(n, p.data) for (n, _), p in zip(chunk, params)])
        peak = max(peak, sum(int(getattr(p, "ds_numel", p.numel())) for p in params))
    return peak


# ------------------------------------------------------------------------------ storage


SHARED_MARKER = ".shared-filesystem"


def check_shared_folder(folder: Path, rank: int, world: int) -> None:
    """Fail on every rank, before any work, unless all ranks see ``folder`` as one folder.

    Checkpoints of several nodes need a filesystem they all share: every rank writes its shard
    into the same temporary folder, which rank 0 then renames. Rank 0 writes a marker holding a
    fresh token into ``folder``, and every rank reads it back; a rank that does not find the
    token (a node-local disk) makes every rank stop with an error that says so. The marker is
    removed afterwards. One rank: nothing to check.
    """
    if world == 1 or not torch.distributed.is_initialized():
        return
    import secrets

    from refuel_agents.checkpoint import write_json_atomic

    marker = Path(folder) / SHARED_MARKER
    token = all_gather_objects(secrets.token_hex(16))[0]  # rank 0's
    if rank == 0:
        write_json_atomic(marker, {"token": token})
    torch.distributed.barrier()
    try:
        seen = json.loads(marker.read_text()).get("token") == token
    except (OSError, ValueError):
        seen = False
    blind = [r for r, ok in enumerate(all_gather_objects(seen)) if not ok]  # (every rank has read before the removal)
    if rank == 0:
        marker.unlink(missing_ok=True)
    torch.distributed.barrier()  # removed before any rank goes on
    if blind:
        raise RuntimeError(
            f"rank(s) {blind} of {world} cannot see the marker rank 0 wrote to {marker}: the run folder is not on a "
            "filesystem that every node shares, so checkpoints would be lost (each rank writes its shard there, rank 0 "
            "renames the folder). Pass --output-dir on a shared filesystem (NFS, Lustre, ...) mounted at the same path "
            "on every node")


def shard_dir(tuples_dir: Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` stores its tuples of one iteration."""
    return Path(tuples_dir) if world == 1 else Path(tuples_dir) / f"rank_{rank}-of-{world}"


EMPTY_SHARD = "no-rows.json"


def store_empty_shard(folder: Path) -> None:
    """Record that a rank kept no row in an iteration (``datasets`` does not load an empty dataset back):
    a folder holding only :data:`EMPTY_SHARD`, written atomically, so a resume does not collect again."""
    from refuel_agents.checkpoint import atomic_dir

    with atomic_dir(Path(folder)) as tmp:
        (tmp / EMPTY_SHARD).write_text("{}\n")


def load_tuples(tuples_dir: str | os.PathLike) -> Any:
    """An iteration's tuples as one ``datasets.Dataset``: the folder itself (one rank), or its
    ``rank_<r>-of-<W>`` folders concatenated in rank order (W ranks; all W must be there). A rank
    that kept no row (:func:`store_empty_shard`) adds none."""
    import datasets

    path = Path(tuples_dir)
    if (path / "state.json").exists():
        return datasets.load_from_disk(str(path))
    if (path / EMPTY_SHARD).exists():
        return datasets.Dataset.from_list([])
    shards = sorted(path.glob("rank_*-of-*"), key=lambda p: int(p.name.split("_")[1].split("-")[0]))
    if not shards:
        raise FileNotFoundError(f"{path} holds neither a dataset nor rank_<r>-of-<W> shards")
    world = int(shards[0].name.rsplit("-", 1)[1])
    if len(shards) != world:
        have = [p.name for p in shards]
        raise FileNotFoundError(f"{path} holds {len(shards)} of {world} rank shards ({have}); a rank has not written yet")
    parts = [datasets.load_from_disk(str(p)) for p in shards if not (p / EMPTY_SHARD).exists()]
    return datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_list([])


def rank_batch_size(batch_size: int, micro_batch_size: int, world: int) -> int:
    """Each rank's share of the global batch; an error naming a batch size that works when W does not divide it."""
    if batch_size % (world * micro_batch_size):
        fit = world * micro_batch_size * max(1, round(batch_size / (world * micro_batch_size)))
        raise ValueError(
            f"batch_size={batch_size} is the global batch over {world} ranks: it must be a multiple of world size x "
            f"micro_batch_size = {world} x {micro_batch_size}; pass e.g. --batch-size {fit}")
    return batch_size // world


def start_policy_replica(path: str, vllm_kwargs: dict[str, Any], rank: int, world: int, *, sleep: bool) -> Any:
    """The vLLM policy engine of this rank. With several ranks each has its own replica, started
    through vLLM's external launcher (it joins the launcher's process group instead of spawning
    workers); unseeded requests draw from a seed of the rank's own."""
    from refuel_env.backends.vllm_backend import VLLMGenerator

    kwargs = dict(vllm_kwargs)
    if world > 1:
        kwargs.setdefault("distributed_executor_backend", "external_launcher")
        kwargs.setdefault("seed", rank)
    if sleep:
        kwargs["enable_sleep_mode"] = True
    return VLLMGenerator(path, name=path, **kwargs)


def global_pairs(pairs: int, device: torch.device) -> int:
    """The pairs kept by all ranks together. A rank may keep none: the rows are shared out before
    training (:func:`rank_slices`, :func:`share_rows`), so every rank trains on as many as the others."""
    return int(all_sum(pairs, device))


def global_order(seed: int, iteration: int, n: int, steps: int, batch_size: int) -> list[int]:
    """The iteration's row order over all ``n`` rows of all ranks, ``steps`` updates of ``batch_size`` rows, as
    one rank draws it: a permutation per epoch seeded by (seed, iteration); a short last pass wraps around."""
    rng = np.random.default_rng([seed, iteration])
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(rng.permutation(n).tolist())
    return order[: steps * batch_size]


def scoring_batches(every_rank: Sequence[int], mine: Sequence[int], rank: int, batch_size: int, world: int,
                    micro: int, held: range) -> list[tuple[list[int], set[int]]]:
    """(the rows of a micro-batch, those of them scored there) for each micro-batch this rank scores.

    ``every_rank``: the global order (:func:`global_order`); ``mine``: this rank's slices of it
    (:func:`rank_slices`); ``held``: the indices of the rows this rank collected. A row is scored in
    the first micro-batch, over all ranks' micro-batches in order, that holds it, by the rank that
    trains that micro-batch; rows that no update uses are scored by the rank that holds them, in
    micro-batches of consecutive rows.
    """
    per = batch_size // world
    first: dict[int, int] = {}
    for k, i in enumerate(every_rank):
        first.setdefault(i, k // micro)
    batches = []
    for m in range(0, len(mine), micro):
        k = ((m // per) * batch_size + rank * per + m % per) // micro  # its place over all ranks' micro-batches
        members = list(mine[m : m + micro])
        batches.append((members, {i for i in members if first[i] == k}))
    unused = [i for i in held if i not in first]
    batches += [(unused[m : m + micro], set(unused[m : m + micro])) for m in range(0, len(unused), micro)]
    return [(members, scored) for members, scored in batches if scored]


def rank_slices(order: Sequence[int], batch_size: int, rank: int, world: int) -> list[int]:
    """Rank ``rank``'s part of a global row order cut into steps of ``batch_size`` rows: the r-th of
    ``world`` equal slices of each step (``batch_size`` is a multiple of ``world``). The slices of one
    step, in rank order, are that step's rows in the global order, so the averaged gradient of a step
    is that of one rank on all of them."""
    per = batch_size // world
    return [i for s in range(0, len(order), batch_size) for i in order[s + rank * per : s + (rank + 1) * per]]


def rank_rows(rows: Sequence[dict], rank: int, world: int, order_for: Any) -> tuple[int, list[int], dict[int, dict]]:
    """(index of this rank's first row among the rows of all ranks, this rank's training order over those indices,
    the rows it trains on by index). ``rows`` are this rank's own; ``order_for(n, r)`` is rank r's order over all
    ``n`` rows. The rows another rank collected come from it (:func:`share_rows`), so that every rank trains on as
    many rows as the others, in one order over all of them. Every rank must call it."""
    counts = [int(c) for c in all_gather_objects(len(rows))]
    start, total = sum(counts[:rank]), sum(counts)
    if not total:
        return start, [], {}
    wanted = [order_for(total, r) for r in range(world)]
    return start, wanted[rank], share_rows(rows, start, wanted)


def share_rows(rows: Sequence[dict], start: int, wanted: Sequence[Any]) -> dict[int, dict]:
    """The rows that this rank wants, by their index in the rows of all ranks (in rank order).

    This rank holds ``rows``, indices ``start`` to ``start + len(rows)``; ``wanted[r]`` holds the
    indices rank r needs (the same on every rank). Each rank sends the rows that another rank wants
    (:func:`all_gather_objects`) and keeps, of what it receives, only what it wants; its own rows
    are not copied. Every rank must call it.
    """
    rank = rank_and_world()[0]
    mine = range(start, start + len(rows))
    others = set().union(*(set(w) for r, w in enumerate(wanted) if r != rank))
    want = set(wanted[rank])
    got = {i: rows[i - start] for i in mine if i in want}
    for part in all_gather_objects({i: rows[i - start] for i in mine if i in others}):
        got.update({i: row for i, row in part.items() if i in want and i not in got})
    return got
