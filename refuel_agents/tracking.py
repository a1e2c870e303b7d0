"""Metrics: one line per step to stdout, a JSONL file, TensorBoard, and a PNG plot at the end.

Tags follow CleanRL's habit: ``losses/...`` for what is optimised, ``charts/...`` for what is
watched. Only the main process writes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Steps after the checkpoint are done again: drop their old lines so none repeats.
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any], *, echo: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        if echo:
            shown = "  ".join(f"{k.split('/')[-1]}={_fmt(v)}" for k, v in metrics.items() if isinstance(v, int | float))
            print(f"step {step:>5}  {shown}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
