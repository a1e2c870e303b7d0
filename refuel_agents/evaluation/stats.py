"""Statistics of judgements and rewards: Wilson intervals, bootstrap intervals, the appendix E turn weights, win rates."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------ aggregation


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % by default); ties count 0.5 toward ``successes``."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(values: Sequence[float], *, level: float = 0.95, resamples: int = 10_000,
                       seed: int = 0, groups: Sequence[Any] | None = None) -> dict[str, float]:
    """Mean of ``values`` with a percentile bootstrap interval: {"mean", "ci_low", "ci_high", "n", "clusters"}.

    For a paired comparison pass the per-pair differences. With ``groups`` (one label per value)
    the bootstrap resamples whole groups, not values (a cluster bootstrap): values of one group
    that are not independent, such as the dialogues of one prompt at several lengths, then count
    as the one draw they are, and the interval is not narrowed by their repetition. The statistic
    is the mean over every value of the resampled groups. The resamples are drawn from a generator
    seeded with ``seed``, so the interval is reproducible. With fewer than 2 values or groups the
    interval is NaN.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or not np.isfinite(x).all():
        raise ValueError(f"bootstrap_interval needs a flat sequence of finite numbers, got {values!r:.80}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if groups is not None and len(groups) != len(x):
        raise ValueError(f"groups needs one label per value: {len(groups)} labels for {len(x)} values")
    labels = list(range(len(x))) if groups is None else list(groups)
    index = {label: i for i, label in enumerate(dict.fromkeys(labels))}
    of = np.array([index[label] for label in labels], dtype=np.int64)
    sums, counts = np.bincount(of, weights=x, minlength=len(index)), np.bincount(of, minlength=len(index))
    out = {"mean": float(x.mean()) if len(x) else math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "n": len(x), "clusters": len(index)}
    if len(index) < 2:
        return out
    draws = np.random.default_rng(seed).integers(0, len(index), size=(resamples, len(index)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    out["ci_low"], out["ci_high"] = (float(q) for q in np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))
    return out


def length_weights(lengths: Iterable[int], horizon: int) -> dict[int, float]:
    """Appendix E weights: the share of dataset dialogues of each length 1..horizon.

    Dialogues longer than ``horizon`` count at ``horizon`` (an evaluation at horizon H truncates
    them there).
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    counts = {h: 0 for h in range(1, horizon + 1)}
    total = 0
    for length in lengths:
        if length < 1:
            raise ValueError(f"a dialogue length must be >= 1, got {length}")
        counts[min(int(length), horizon)] += 1
        total += 1
    if total == 0:
        raise ValueError("length_weights needs at least one dialogue length")
    return {h: c / total for h, c in counts.items()}


def weighted_average(per_turn: Mapping[int, float], weights: Mapping[int, float]) -> float:
    """sum_h w_h * winrate_h / sum_h w_h over the turns that have a win rate (appendix E)."""
    pairs = [(float(weights.get(h, 0.0)), rate) for h, rate in per_turn.items() if rate is not None and not math.isnan(rate)]
    total = sum(w for w, _ in pairs)
    if total <= 0:
        return math.nan
    return sum(w * rate for w, rate in pairs) / total


def win_rates(records: Sequence[Mapping[str, Any]], *, horizon: int | None = None,
              weights: Mapping[int, float] | None = None) -> dict[str, Any]:
    """Aggregate judgement records into table 1's layout.

    Returns ``per_turn`` ({h: {win_rate, n, wins, ties, losses, ci_low, ci_high, failures,
    parse_failures}}; win rates are fractions in [0, 1], ties count one half), ``average`` (the
    mean of the per-turn win rates over the turns with judgements), ``weighted_average`` (with
    ``weights``, see :func:`weighted_average`; None without), ``full_dialogue`` (records with
    ``full``: each pair at its own last turn), ``n``, ``failures`` and ``parse_failures``.
    """
    turns = sorted({int(r["turn"]) for r in records})
    horizon = horizon or (max(turns) if turns else 0)
    per_turn: dict[int, dict[str, Any]] = {}
    for h in range(1, horizon + 1):
        per_turn[h] = _summarise([r for r in records if int(r["turn"]) == h])
    rates = {h: s["win_rate"] for h, s in per_turn.items() if s["n"] > 0}
    return {
        "per_turn": per_turn,
        "average": float(np.mean(list(rates.values()))) if rates else math.nan,
        "turns_in_average": sorted(rates),
        "weighted_average": weighted_average(rates, weights) if weights is not None else None,
        "full_dialogue": _summarise([r for r in records if r.get("full")]),
        "n": sum(s["n"] for s in per_turn.values()),
        "failures": sum(s["failures"] for s in per_turn.values()),
        "parse_failures": sum(s["parse_failures"] for s in per_turn.values()),
    }


def _summarise(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    outcomes = [float(r["outcome"]) for r in records if r.get("outcome") is not None]
    n = len(outcomes)
    wins = sum(1 for o in outcomes if o == 1.0)
    ties = sum(1 for o in outcomes if o == 0.5)
    score = sum(outcomes)
    low, high = wilson_interval(score, n)
    return {"win_rate": score / n if n else math.nan, "n": n, "wins": wins, "ties": ties,
            "losses": n - wins - ties, "ci_low": low, "ci_high": high,
            "failures": sum(1 for r in records if r.get("outcome") is None),
            "parse_failures": sum(int(r.get("parse_failures", 0)) for r in records)}
