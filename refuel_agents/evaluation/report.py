"""Reports of an evaluation: the Markdown table and report, the win-rate plot, the JSON file."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------ reports


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _get_turn(table: Mapping[Any, Any], h: int) -> Any:
    return table.get(h, table.get(str(h)))


def markdown_table(results: Mapping[str, Any]) -> str:
    """Rows = policies (and the reference), columns h=1..H, avg, weighted avg, full, RM score, KL, length."""
    H = int(results["config"]["horizon"])
    head = ["policy", *[f"h={h}" for h in range(1, H + 1)], "avg", "weighted avg", "full dialogue",
            "RM score", "KL(pi‖ref)", "length (words)", "n", "parse failures"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, p in results["policies"].items():
        wr = p["win_rate"]
        cells = [name]
        for h in range(1, H + 1):
            t = _get_turn(wr["per_turn"], h)
            cells.append(_pct(t["win_rate"]) if t and t["n"] else "-")
        kl = p.get("kl")
        cells += [_pct(wr["average"]), _pct(wr["weighted_average"]), _pct(wr["full_dialogue"]["win_rate"]),
                  _num(p["rm_score"]), _num(kl["mean"], "{:.2f}") if kl else "-", _num(p["length_words"], "{:.1f}"),
                  str(wr["n"]), str(wr["parse_failures"])]
        lines.append("| " + " | ".join(cells) + " |")
    ref = results["reference"]
    lines.append("| " + " | ".join([f"{ref['name']} (reference)", *["-"] * H, "-", "-", "-",
                                    _num(ref["rm_score"]), "0", _num(ref["length_words"], "{:.1f}"), "-", "-"]) + " |")
    return "\n".join(lines)


def _limit_sentence(cfg: Mapping[str, Any]) -> str:
    used, configured = cfg.get("max_dialogue_tokens"), cfg.get("env_max_dialogue_tokens")
    limit = "no dialogue length limit" if used is None else f"dialogues limited to {used} tokens"
    if configured is not None and configured != used:
        return f" Played with {limit} (the environment's training-data limit max_dialogue_tokens={configured} is off)."
    return f" Played with {limit}." if used is not None else ""


def markdown_report(results: Mapping[str, Any]) -> str:
    """The table with what it measures, the intervals and the run's configuration."""
    cfg = results["config"]
    judge = cfg["judge"]
    H = int(cfg["horizon"])
    out = [
        f"# Win rates against the reference ({cfg['reference']})",
        "",
        f"Environment `{cfg['env_id']}` (test split), {cfg['num_prompts']} held-out prompts, H = {H}, seed {cfg['seed']}; "
        f"judge: {judge.get('kind', '')} `{judge.get('name')}`" + (" (both orders)" if cfg["both_orders"] else "") + "."
        + _limit_sentence(cfg),
        "",
        markdown_table(results),
        "",
        "Win rates in % (ties count one half) of the policy's dialogue truncated at turn h against the reference's; "
        "avg: mean over turns; weighted avg: appendix E weights "
        + ", ".join(f"h={h}: {_num(_get_turn(results['turn_weights'], h), '{:.2f}')}" for h in range(1, H + 1))
        + "; full dialogue: each pair at its last turn. RM score: mean environment reward of the full dialogues "
        "(KL penalty off). KL: Monte-Carlo estimate of KL(pi || pi_ref) at temperature 1 (the models themselves), "
        "from dialogues the policy sampled at T = 1 (sum over turns of log pi - log pi_ref). "
        "Length: mean words per response.",
        "",
        "## 95 % Wilson intervals per turn",
        "",
        "| policy | " + " | ".join(f"h={h}" for h in range(1, H + 1)) + " |",
        "|---|" + "---|" * H,
    ]
    for name, p in results["policies"].items():
        cells = []
        for h in range(1, H + 1):
            t = _get_turn(p["win_rate"]["per_turn"], h)
            cells.append(f"{_pct(t['ci_low'])}–{_pct(t['ci_high'])} (n={t['n']})" if t and t["n"] else "-")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [f"- {name}: KL {p['kl_note']}" for name, p in results["policies"].items() if p.get("kl_note")]
    notes += [f"- {name}: {p['truncated_pairs']} pair(s) with a dialogue the environment truncated: judged at the "
              "turns both reached, no full-dialogue judgement"
              for name, p in results["policies"].items() if p["truncated_pairs"]]
    notes += [f"- {name}: {p['win_rate']['failures']} comparison(s) without an outcome "
              f"({p['win_rate']['parse_failures']} unparsed judge answers)"
              for name, p in results["policies"].items() if p["win_rate"]["failures"]]
    notes += [f"- {name}: avg and weighted avg cover turns {p['win_rate']['turns_in_average']} only (no judgement "
              "at the others)" for name, p in results["policies"].items()
              if len(p["win_rate"]["turns_in_average"]) < H]
    if notes:
        out += ["", *notes]
    return "\n".join(out) + "\n"


def plot_win_rates(results: Mapping[str, Any], path: str | Path) -> Path:
    """Win rate by turn, one line per policy with its 95 % interval as a band; 50 % dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H = int(results["config"]["horizon"])
    fig, ax = plt.subplots(figsize=(6, 4))
    turns = list(range(1, H + 1))
    for name, p in results["policies"].items():
        rows = [_get_turn(p["win_rate"]["per_turn"], h) for h in turns]
        xs = [h for h, t in zip(turns, rows) if t and t["n"]]
        ts = [t for t in rows if t and t["n"]]
        if not xs:
            continue
        line, = ax.plot(xs, [100 * t["win_rate"] for t in ts], marker="o", label=name)
        ax.fill_between(xs, [100 * t["ci_low"] for t in ts], [100 * t["ci_high"] for t in ts],
                        color=line.get_color(), alpha=0.2)
    ax.axhline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(turns)
    ax.set_ylim(0, 100)
    ax.set_xlabel("turn h")
    ax.set_ylabel("win rate against the reference (%)")
    ax.set_title(f"Win rate by turn vs {Path(str(results['config']['reference'])).name} (95 % Wilson bands)", fontsize=10)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def write_reports(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.md, results.json (NaN as null) and winrate_by_turn.png; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "json": out / "results.json", "plot": out / "winrate_by_turn.png"}
    paths["markdown"].write_text(markdown_report(results))
    paths["json"].write_text(json.dumps(_jsonable(results), indent=1, ensure_ascii=False))
    plot_win_rates(results, paths["plot"])
    return paths
