"""Metrics: one line per step to stdout, a JSONL file, the trackers of ``--report-to`` (TensorBoard,
Weights & Biases, Trackio, each in its offline mode with its files in the run folder), and a PNG plot
at the end.

Tags follow CleanRL's habit: ``losses/...`` for what is optimised, ``charts/...`` for what is
watched. Only the main process writes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

#: --report-to's trackers, and the pip extra that installs each one's library (None: a required dependency).
TRACKERS = {"tensorboard": None, "wandb": "wandb", "trackio": "trackio"}


def parse_report_to(text: str) -> list[str]:
    """The trackers of a ``--report-to`` value ('none', one name, or several comma-separated)."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or not names:
        raise ValueError(f"pass 'none' or one or more of {list(TRACKERS)}, comma-separated")
    for name in names:
        extra = TRACKERS[name]
        if extra and importlib.util.find_spec(name) is None:
            raise ValueError(f"the {name} package is not installed; install the extra (pip install "
                             f"'refuel-gym[{extra}]') or pass --report-to tensorboard")
    return names


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool = True, resume_step: int | None = None,
                 report_to: str = "tensorboard"):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.trackers: list[Any] = []
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Steps after the checkpoint are done again: drop their old lines so none repeats.
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.trackers = [_TRACKER_CLASSES[name](run_dir) for name in parse_report_to(report_to)]

    def log(self, step: int, metrics: dict[str, Any], *, echo: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items()
                   if k not in ("step", "time") and isinstance(v, int | float) and math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(scalars, step)
        if echo:
            shown = "  ".join(f"{k.split('/')[-1]}={_fmt(v)}" for k, v in metrics.items() if isinstance(v, int | float))
            print(f"step {step:>5}  {shown}", flush=True)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


class _TensorBoard:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """Weights & Biases in offline mode (``wandb sync <run>/wandb/offline-run-*`` uploads it later);
    a WANDB_MODE set in the environment wins."""

    def __init__(self, run_dir: Path):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "refuel-gym"), name=run_dir.name,
                              dir=str(run_dir), mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    """Trackio, local (its SQLite database in <run>/trackio unless TRACKIO_DIR is set)."""

    def __init__(self, run_dir: Path):
        os.environ.setdefault("TRACKIO_DIR", str(run_dir / "trackio"))
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "refuel-gym"), name=run_dir.name, resume="allow")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


_TRACKER_CLASSES = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio}


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except json.JSONDecodeError:
        return math.inf  # a line cut by a crash is dropped


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_run(metrics_path: Path, out_path: Path, *, keys: tuple[str, ...] = ("losses/loss", "charts/reward_mean")) -> Path | None:
    """A PNG with one panel per key against the step; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), int | float)] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def reward_table(rows: list[dict], key: str, max_turns: int) -> dict[int, tuple[int, float]]:
    """Mean of ``key`` (a reward) grouped by the dialogue length H: {H: (count, mean)}."""
    table = {}
    for H in range(1, max_turns + 1):
        values = [r[key] for r in rows if r["H"] == H and r.get(key) is not None]
        table[H] = (len(values), float(np.mean(values)) if values else math.nan)
    return table


def format_summary(summary: list[dict], max_turns: int) -> str:
    """A Markdown table: mean reward by dialogue length H, before training and after each iteration."""
    header = "| H | " + " | ".join(
        f"iter {s['iteration']} eval" + ("" if s["iteration"] == 0 else f" / iter {s['iteration']} collected")
        for s in summary) + " |"
    lines = [header, "|---" * (len(summary) + 1) + "|"]
    for H in range(1, max_turns + 1):
        cells = []
        for s in summary:
            ev = s.get("eval", {}).get(H) or s.get("eval", {}).get(str(H))
            cell = _cell(ev)
            if s["iteration"] > 0:
                co = s.get("collected", {}).get(H) or s.get("collected", {}).get(str(H))
                cell += " / " + _cell(co)
            cells.append(cell)
        lines.append(f"| {H} | " + " | ".join(cells) + " |")
    return "Mean reward by dialogue length H (eval: held-out prompts at fixed H; collected: tuples of that H)\n" + "\n".join(lines)


def _cell(entry: Any) -> str:
    if not entry or not entry[0]:
        return "-"
    n, mean = entry
    return f"{mean:+.3f} (n={n})"


def report_run(run_dir: Path, final: Path, summary: list[dict], max_turns: int, seed: int, report_to: str) -> None:
    """At a run's end (main rank): write the held-out summary and the plots, and print where everything is."""
    from refuel_agents import heldout

    results = heldout.write_summary(run_dir, summary, max_turns, seed)
    plot = plot_run(run_dir / "metrics.jsonl", run_dir / "reward_loss.png",
                    keys=("losses/loss", "charts/reward_mean", "charts/logratio_to_init"))
    trackers = "".join(f", {name}: {run_dir / name}" for name in parse_report_to(report_to) if name != "wandb")
    print(f"{heldout.improvement_line(results.get('heldout_improvement'))}\nfinal model: {final}\nsummary: "
          f"{run_dir / 'summary.md'}\nmetrics: {run_dir / 'metrics.jsonl'}{trackers}"
          + (f"\nplots: {plot}, {run_dir / 'heldout_reward.png'}" if plot else ""), flush=True)
