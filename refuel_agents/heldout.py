"""The held-out evaluation of a training run, and the run's summary.

Before training, after every ``eval_every``-th iteration and after the last, the trainer plays the
same held-out prompts, each at every dialogue length H in 1..max_turns that it allows (a
pre-sampled item has its own number of turns; ``n_by_H`` in ``summary.json`` counts the
dialogues of each H), with the same seeds (the
user's turns and the policy's sampling draws are seeded alike each time; ``eval_temperature`` 0
plays the policy greedily), so the i-th dialogue of one evaluation and the i-th
of another differ only by the policy's weights. The run's result is the mean paired change in
reward from the evaluation before training to the last one, with a 95 % percentile bootstrap
interval (:func:`~refuel_agents.evaluation.stats.bootstrap_interval`) that resamples prompts, each
with all its dialogue pairs: the dialogues of one prompt at H = 1, 2, 3 share their first turns
and are not independent draws.

The held-out prompts are the first ``eval_prompts`` items of the test split, or, with
``eval_split="train"``, ``eval_prompts`` items from the end of the train split
(:func:`split_train`): no two of them, and no training item, share a ``parent_id`` or a first user
message with one of them, and training (every data mode) never sees them: a validation set for
choosing hyperparameters without looking at the test split (``scripts/sweep_refuel.py``).

Written at the end of a run: ``summary.json`` (``heldout_improvement``: mean, ci_low, ci_high, n;
``heldout``: every evaluation's mean reward with its interval and its change from the first),
``summary.md`` (the same as text, and the reward table by H) and ``heldout_reward.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from refuel_agents.checkpoint import write_json_atomic, write_text_atomic
from refuel_agents.evaluation.stats import bootstrap_interval
from refuel_agents.tracking import format_summary, reward_table

EVAL_SPLITS = ("test", "train")
LEVEL = 0.95


def heldout_prompts(split: str, count: int, split_size: int) -> list[int]:
    """Indices of the held-out prompts in ``split`` (module docstring)."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"eval_split must be one of {list(EVAL_SPLITS)}, got {split!r}")
    if count > split_size or (split == "train" and count >= split_size):
        raise ValueError(f"eval_prompts={count} but the {split} split has {split_size} items"
                         + ("; some must be left for training" if split == "train" else "")
                         + f": pass --eval-prompts {split_size - (split == 'train')} or fewer")
    return list(range(split_size - count, split_size)) if split == "train" else list(range(count))


def item_keys(item: Any) -> set[tuple[str, str]]:
    """What ties a dataset item to others that ask the same thing: its ``parent_id`` (UltraInteract keeps it in
    ``meta``) and its first user message."""
    keys = {("first message", item.questions[0])}
    parent = dict(item.meta).get("parent_id")
    return keys | ({("parent_id", str(parent))} if parent is not None else set())


def split_train(keys: list[set], count: int) -> tuple[list[int], list[int]]:
    """(held-out, training) indices of a train split whose item i has the tie keys ``keys[i]`` (:func:`item_keys`).

    The held-out items are taken from the end of the split, skipping any that shares a key with one already
    taken, until there are ``count``; training keeps every item that shares no key with a held-out one.
    """
    held: list[int] = []
    taken: set = set()
    for i in range(len(keys) - 1, -1, -1):
        if len(held) == count:
            break
        if not keys[i] & taken:
            held.append(i)
            taken |= keys[i]
    training = [i for i in range(len(keys)) if not keys[i] & taken]
    if len(held) < count or not training:
        raise ValueError(f"eval_prompts={count} but the train split's {len(keys)} items hold "
                         f"{len(held)} unrelated prompts (no shared parent_id or first message)"
                         + ("" if training else " and none would be left for training")
                         + f": pass --eval-prompts {max(len(held) - (not training), 0)} or fewer")
    return sorted(held), training


def plan(prompts: list[int], max_turns: int, longest: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(horizons, prompt indices) of one evaluation: every prompt at every H in 1..max_turns, or, with
    ``longest`` (the longest H each prompt allows: a pre-sampled item has its own number of turns), at
    every H it has, up to max_turns."""
    longest = [max_turns] * len(prompts) if longest is None else [min(n, max_turns) for n in longest]
    if len(longest) != len(prompts):
        raise ValueError(f"plan: {len(longest)} longest horizons for {len(prompts)} prompts")
    pairs = [(H, i) for H in range(1, max_turns + 1) for i, n in zip(prompts, longest) if H <= n]
    return [H for H, _ in pairs], [i for _, i in pairs]


def dialogues_by_h(entry: dict) -> dict[int, int]:
    """How many held-out dialogues an evaluation (a :func:`record` entry) played at each H."""
    counts: dict[int, int] = {}
    for _, H, _ in entry["eval_rewards"]:
        counts[int(H)] = counts.get(int(H), 0) + 1
    return dict(sorted(counts.items()))


def record(iteration: int, rows: list[dict], max_turns: int, collected: list[dict] | None = None) -> dict:
    """One evaluation's entry in the run's summary: the table by H and every dialogue's reward."""
    entry: dict[str, Any] = {"iteration": iteration, "eval": reward_table(rows, "reward", max_turns),
                             "eval_rewards": [[r.get("item_id"), r["H"], r.get("reward")] for r in rows]}
    if collected is not None:
        entry["collected"] = reward_table(collected, "reward", max_turns)
    return entry


def paired_change(before: dict, after: dict, seed: int = 0) -> dict[str, Any]:
    """Mean change in reward from ``before`` to ``after`` (two :func:`record` entries), paired by dialogue.

    A pair in which either dialogue has no reward (truncated by the environment) is left out and
    counted as ``dropped``.
    """
    a, b = before["eval_rewards"], after["eval_rewards"]
    if [x[:2] for x in a] != [x[:2] for x in b]:
        raise ValueError("the two evaluations did not play the same prompts at the same H: they cannot be paired")
    kept = [(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x[2] is not None and y[2] is not None]
    diffs = [y[2] - x[2] for _, x, y in kept]
    return {**bootstrap_interval(diffs, level=LEVEL, seed=seed, groups=_prompts([(i, x) for i, x, _ in kept])),
            "dropped": len(a) - len(diffs),
            "level": LEVEL, "from_iteration": before["iteration"], "to_iteration": after["iteration"]}


def _prompts(indexed: list[tuple[int, list]]) -> list:
    """The bootstrap's cluster of each dialogue: its prompt (the dialogues of one prompt at H = 1, 2, ... share
    their first turns, and under greedy decoding share them exactly), or the dialogue itself without an item id."""
    return [("item", x[0]) if x[0] is not None else ("row", i) for i, x in indexed]


def heldout_results(summary: list[dict], seed: int = 0) -> dict[str, Any]:
    """The held-out part of ``summary.json``: every evaluation and the improvement over the run."""
    evals = [s for s in summary if s.get("eval_rewards")]
    if not evals:
        return {}
    rows = []
    for s in evals:
        kept = [(i, x) for i, x in enumerate(s["eval_rewards"]) if x[2] is not None]
        rows.append({"iteration": s["iteration"], **bootstrap_interval([x[2] for _, x in kept], level=LEVEL, seed=seed,
                                                                      groups=_prompts(kept)),
                     "n_by_H": dialogues_by_h(s), "change": paired_change(evals[0], s, seed)})
    return {"heldout_improvement": rows[-1]["change"] if len(rows) > 1 else None, "heldout": rows}


def improvement_line(result: dict[str, Any] | None) -> str:
    """One sentence for the console and ``summary.md``."""
    if not result:
        return "Held-out improvement: no evaluation after training (eval_prompts = 0 or no iteration)."
    if result["ci_low"] is None or math.isnan(result["ci_low"]):
        verdict = "no interval: it needs at least 2 prompts"
    else:
        verdict = "above 0" if result["ci_low"] > 0 else "below 0" if result["ci_high"] < 0 else "includes 0"
    return (f"Held-out improvement (iteration {result['from_iteration']} -> {result['to_iteration']}, paired over "
            f"{result['n']} dialogues of {result.get('clusters', result['n'])} prompts): {result['mean']:+.3f}, 95 % bootstrap interval "
            f"[{result['ci_low']:+.3f}, {result['ci_high']:+.3f}] ({verdict})")


def write_summary(run_dir: Path, summary: list[dict], max_turns: int, seed: int, extra: dict | None = None) -> dict:
    """Write ``summary.json``, ``summary.md`` and ``heldout_reward.png``; returns the JSON object."""
    results = {**heldout_results(summary, seed), **(extra or {})}
    table = format_summary(summary, max_turns)
    lines = [improvement_line(results.get("heldout_improvement")), ""]
    if results.get("heldout"):
        lines += ["Held-out dialogues per H: " + ", ".join(f"H={H}: {n}" for H, n in results["heldout"][0]["n_by_H"].items()),
                  ""]
    for row in results.get("heldout", []):
        change = row["change"]
        lines.append(f"- after iteration {row['iteration']}: mean held-out reward {row['mean']:+.3f} "
                     f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}], change {change['mean']:+.3f} "
                     f"[{change['ci_low']:+.3f}, {change['ci_high']:+.3f}] (n={row['n']})")
    write_text_atomic(run_dir / "summary.md", "\n".join(lines) + "\n\n" + table + "\n")
    write_json_atomic(run_dir / "summary.json", _finite(results))
    if len(results.get("heldout", [])) > 1:
        plot_heldout(results["heldout"], run_dir / "heldout_reward.png")
    return results


def _finite(obj: Any) -> Any:
    """NaN as null, so that summary.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def plot_heldout(rows: list[dict], path: Path) -> Path:
    """Held-out reward by iteration, and its paired change from the first evaluation, with interval bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], None, "held-out reward (mean, 95 % bootstrap band)"),
                           (axes[1], "change", "paired change from iteration 0 (95 % band)")):
        points = [r[key] if key else r for r in rows]
        mean = [p["mean"] for p in points]
        low = [p["ci_low"] if p["ci_low"] is not None else math.nan for p in points]
        high = [p["ci_high"] if p["ci_high"] is not None else math.nan for p in points]
        ax.plot(its, mean, marker="o")
        ax.fill_between(its, low, high, alpha=0.25)
        if key:
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_xticks(its)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_summary(run_dir: Path) -> dict:
    """A finished run's ``summary.json``."""
    return json.loads((Path(run_dir) / "summary.json").read_text())
