"""Atomic files and checkpoints: a crash at any point leaves either the old or the new state.

A checkpoint is a folder ``checkpoints/step_<global step>`` holding the model
(``save_pretrained``), the optimizer and scheduler (``engine/``), and ``state.json`` (iteration,
step within it, global step, RNG states). Every folder is written under a temporary name and
renamed into place when complete; the file ``latest`` names the newest complete checkpoint and
is itself replaced atomically, last. A resume trusts only what ``latest`` names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; rename it to ``path`` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def rng_states() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def set_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(
            f"{pointer} names {path.name}, which is incomplete or missing; the run folder was changed by hand. "
            "Point 'latest' at a complete checkpoint or start a new run."
        )
    return path


def save_checkpoint(run_dir: Path, name: str, *, model: Any, engine: Any, state: dict[str, Any], keep: int = 2) -> Path:
    """Write a checkpoint atomically, point ``latest`` at it, and keep the newest ``keep``.

    Every rank calls this (under ZeRO-3 the weights are gathered from all ranks and DeepSpeed's
    own checkpoint is collective); only the main rank writes the model, the state and ``latest``.
    """
    root = run_dir / "checkpoints"
    target = root / name
    partial = root / f".{name}.tmp-partial"  # the same name on every rank
    weights = engine.unwrapped_model_state()
    if engine.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    engine.barrier()
    engine.save(partial / "engine")
    engine.barrier()
    if engine.is_main:
        model.save_pretrained(partial / "model", state_dict=weights)
        write_json_atomic(partial / "state.json", {**state, "rng": rng_states()})
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
        write_text_atomic(root / "latest", name)
        complete = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    return target


def save_final_model(final: Path, model: Any, weights: dict | None, tokenizer: Any, latest: Path | None, step: int) -> None:
    """Write ``final`` (loadable with ``from_pretrained``) atomically.

    When the latest checkpoint holds the weights of step ``step`` (the end of the last iteration),
    its weight files are hard-linked rather than written again, so the final model takes no
    further disk space; otherwise (or where the file system refuses links) they are written.
    """
    source = latest / "model" if latest is not None and latest.name == f"step_{step:07d}" else None
    with atomic_dir(final) as tmp:
        linked = False
        if source is not None and source.is_dir():
            try:
                for f in source.iterdir():
                    os.link(f, tmp / f.name)
                linked = True
            except OSError:
                for f in tmp.iterdir():
                    f.unlink()
        if not linked:
            model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)


def remove_partial_writes(run_dir: Path) -> list[Path]:
    """Delete temporary folders and files a crash left behind (never trusted, only in the way)."""
    removed = []
    for path in run_dir.rglob(".*.tmp-*"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def load_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "state.json"
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is damaged ({err}); {damaged_advice(checkpoint)}") from None


def damaged_advice(checkpoint: Path) -> str:
    """What to do about a damaged checkpoint: an older complete one, or a restart from the stored tuples."""
    root = checkpoint.parent
    older = sorted(p.name for p in root.glob("step_*") if p.name < checkpoint.name and (p / "state.json").is_file())
    if older:
        return f"write {older[-1]!r} into {root / 'latest'} to resume from the previous checkpoint"
    return (f"remove {root} and pass --resume again: the run restarts from its first iteration, using the "
            "tuples already stored in its iteration_* folders")


#: config.json fields that may differ between a run and its continuation.
RUN_LOCAL_FIELDS = ("output_dir", "run_name", "resume", "progress", "report_to")


def run_record(agent: str, mode: str, config: Any) -> dict[str, Any]:
    """What ``config.json`` holds for a run: the agent, its data mode and every config field (as JSON reads back)."""
    return json.loads(json.dumps({"agent": agent, "mode": mode, **dataclasses.asdict(config)}, default=str))


def config_differences(earlier: dict, now: dict) -> list[str]:
    """'field: earlier X, now Y' for every field (but the run-local ones) that differs."""
    out = []
    for key in sorted(set(earlier) | set(now)):
        if key in RUN_LOCAL_FIELDS or (key not in now and key == "mode"):
            continue
        if key not in earlier:
            out.append(f"{key}: not in the earlier run's config.json, now {now[key]!r}")
        elif key not in now:
            out.append(f"{key}: earlier {earlier[key]!r}, not a field now")
        elif earlier[key] != now[key]:
            out.append(f"{key}: earlier {earlier[key]!r}, now {now[key]!r}")
    return out


def check_resumable(run_dir: Path, record: dict[str, Any]) -> None:
    """Refuse ``--resume`` of ``run_dir`` unless it is a run folder whose config.json matches ``record``."""
    config_file = run_dir / "config.json"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--resume: {run_dir} does not exist, so there is no run to continue; drop --resume "
                                "to start it, or pass the --output-dir and --run-name of an existing run")
    if not config_file.is_file():
        raise FileNotFoundError(f"--resume: {run_dir} has no config.json, so it is not a training run folder; pass "
                                "the --run-name of a run, or another --run-name to start a new one")
    try:
        earlier = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--resume: {config_file} is damaged ({err}); it records the run's flags, so the run "
                         "cannot be checked: start a new run with another --run-name") from None
    differences = config_differences(earlier, record)
    if differences:
        raise ValueError(f"--resume: the flags differ from those of the run in {run_dir} ({config_file}):\n    "
                         + "\n    ".join(differences)
                         + "\nResume with the run's own flags, or start a new run with another --run-name.")


def load_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Load a checkpoint's safetensors weights in place; only tied weights may be absent."""
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):  # a LoRA policy: the checkpoint holds its adapter
        from refuel_agents.lora import load_adapter

        return load_adapter(model, model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no safetensors weights; the checkpoint is incomplete")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as err:  # safetensors raises its own SafetensorError (and OSError) on a cut file
            raise ValueError(f"{f} is damaged ({err}); {damaged_advice(model_dir.parent)}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"checkpoint {model_dir} does not match the policy model: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; resume with the same --policy-model"
        )


def resume_point(run_dir: Path, record: dict[str, Any], start: dict[str, Any], model: torch.nn.Module | None,
                 shard_dir: Any) -> tuple[Path | None, dict[str, Any]]:
    """(latest checkpoint or None, loop state) of a run to resume, every check done before anything trains.

    The run's flags must equal ``record`` (:func:`check_resumable`). With a checkpoint, its state is
    returned and its weights are loaded into ``model`` (None: the engine's checkpoint restores them).
    Without one, the run starts over from ``start`` with the initial weights. The tuples the resumed
    iteration trains on (``shard_dir(iteration folder / "tuples")``), if stored, are refused now when damaged.
    """
    check_resumable(run_dir, record)
    latest, state = latest_checkpoint(run_dir), start
    if latest is not None:
        state = load_state(latest)
        if model is not None:
            load_weights(model, latest / "model")
    check_stored_tuples(shard_dir(run_dir / f"iteration_{state['iteration']:03d}" / "tuples"))
    return latest, state


def load_engine(engine: Any, checkpoint: Path) -> None:
    """Load the optimizer and scheduler (DeepSpeed: and the shards) of ``checkpoint``; a cut file is named, with what to do."""
    try:
        engine.load(checkpoint / "engine")
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:  # torch.load / DeepSpeed on a cut file: EOFError, RuntimeError, UnpicklingError
        raise ValueError(f"{checkpoint / 'engine'} is damaged ({type(err).__name__}: {err}); "
                         f"{damaged_advice(checkpoint)}") from None


def start_run(run_dir: Path, record: dict[str, Any], engine: Any) -> None:
    """Create a new run's folder with its ``config.json`` (the main rank writes); an existing, non-empty folder is refused
    on every rank, which all look before the main rank writes."""
    taken = run_dir.exists() and any(run_dir.iterdir())
    engine.barrier()
    if taken:
        raise FileExistsError(f"{run_dir} exists and is not empty; pass --resume to continue it or pick another --run-name")
    if engine.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", record)
    engine.barrier()


def check_stored_tuples(folder: Path) -> None:
    """Refuse a damaged tuples dataset (one rank's ``iteration_*/tuples``) before a resume trains on it."""
    from refuel_agents.distributed import EMPTY_SHARD

    if not folder.exists() or (folder / EMPTY_SHARD).is_file():  # (a rank that kept no row)
        return
    import datasets

    try:
        datasets.load_from_disk(str(folder)).data.validate(full=True)
    except Exception as err:  # datasets / pyarrow on a cut file: ArrowInvalid, OSError, ValueError
        raise ValueError(f"the stored tuples in {folder} are damaged ({type(err).__name__}: {err}); remove that "
                         "folder and pass --resume again: the iteration collects its tuples again") from None
