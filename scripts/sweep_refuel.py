"""Choose REFUEL's hyperparameters on the train split only: a grid of runs, each scored on a validation set.

    python scripts/sweep_refuel.py --grid lr=1e-5,3e-5 last-k-layers=4,8 --base iterations=3
    python scripts/sweep_refuel.py --grid eta=0.3,1 --seeds 1 2 --json sweep.json --markdown sweep.md

Every point of the grid (every combination of the ``--grid`` values, for every seed) is one run of
``scripts/train_agent.py --agent refuel`` with ``--eval-split train``: the last ``--eval-prompts``
items of the train split are held back from training and played, at every H, before training and
after the iterations that ``--eval-every`` names (always after the last), with the same seeds. A
point's score is its validation improvement, the mean paired change in reward from before
training to the end, with its 95 % bootstrap interval over prompts (``summary.json`` of the run).
The test split is never read.

Each run goes in ``<output-dir>/<point name>``; a point whose run already finished is read, not
run again, and one that was interrupted is resumed (``--resume``), so the sweep can be stopped and
started again. Wall time (this machine, whatever else ran on it) and the run folder's size are
reported beside the score.

The choice (fixed before any point ran): among the points that finished within
``--budget-minutes``, the one with the highest mean validation improvement, averaged over seeds.
The table, the choice and the JSON are printed and written (``--markdown``, ``--json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train_agent.py"


def parse_setting(text: str, *, many: bool) -> tuple[str, list[str] | str]:
    """'lr=1e-5,3e-5' -> ('lr', ['1e-5', '3e-5']) (``many``), 'lr=1e-5' -> ('lr', '1e-5'); a flag without its dashes."""
    key, sep, values = text.partition("=")
    key = key.strip().lstrip("-").replace("_", "-")
    items = [v.strip() for v in values.split(",")] if many else [values.strip()]
    if not sep or not key or not all(items):
        raise argparse.ArgumentTypeError(f"expected FLAG=VALUE{',VALUE...' if many else ''} (a train_agent.py flag "
                                         f"without its dashes, e.g. lr=1e-5{',3e-5' if many else ''}), got {text!r}")
    return key, items if many else items[0]


def point_name(settings: dict[str, str], seed: int) -> str:
    return "__".join(f"{k}={v}" for k, v in settings.items()).replace("/", "_") + f"__seed={seed}"


def run_point(args: argparse.Namespace, settings: dict[str, str], seed: int) -> dict:
    """Run (or read, or resume) one point; returns its row of the table."""
    name = point_name(settings, seed)
    run_dir = args.output_dir / name
    summary_path = run_dir / "summary.json"
    seconds = None
    if not summary_path.exists():
        flags = {**dict(args.base), **settings, "seed": str(seed), "eval-split": "train",
                 "eval-prompts": str(args.eval_prompts)}
        argv = [sys.executable, str(TRAIN), "--agent", "refuel", "--output-dir", str(args.output_dir), "--run-name", name,
                *[x for k, v in flags.items() for x in (f"--{k}", v)]]
        if run_dir.exists():
            argv.append("--resume")
        print(f"[sweep] {name}: running", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        seconds = time.perf_counter() - start
        (args.output_dir / f"{name}.log").write_text(result.stdout)
        if result.returncode != 0:
            print(f"[sweep] {name}: failed (exit {result.returncode}); log: {args.output_dir / (name + '.log')}\n"
                  + result.stdout[-2000:], flush=True)
            return {"name": name, "settings": settings, "seed": seed, "failed": True, "seconds": seconds}
        (run_dir / "sweep_seconds.txt").write_text(f"{seconds:.1f}\n")
    elif (run_dir / "sweep_seconds.txt").exists():
        seconds = float((run_dir / "sweep_seconds.txt").read_text())
    summary = json.loads(summary_path.read_text())
    size = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
    return {"name": name, "settings": settings, "seed": seed, "failed": False, "seconds": seconds, "bytes": size,
            "improvement": summary.get("heldout_improvement"), "heldout": summary.get("heldout")}


def choose(rows: list[dict], budget_s: float) -> dict | None:
    """The settings with the highest mean improvement over seeds, among points all finished within the budget."""
    by_settings: dict[str, list[dict]] = {}
    for row in rows:
        by_settings.setdefault(json.dumps(row["settings"], sort_keys=True), []).append(row)
    best = None
    for key, group in by_settings.items():
        if any(r["failed"] or r["improvement"] is None or (r["seconds"] or 0) > budget_s for r in group):
            continue
        mean = sum(r["improvement"]["mean"] for r in group) / len(group)
        if best is None or mean > best["mean"]:
            best = {"settings": json.loads(key), "mean": mean, "seeds": [r["seed"] for r in group]}
    return best


def markdown(rows: list[dict], keys: list[str], chosen: dict | None, budget_s: float) -> str:
    header = [*keys, "seed", "validation change [95 % CI]", "n", "final validation reward", "minutes", "GiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["settings"][k] for k in keys] + [str(r["seed"])]
        if r["failed"]:
            cells += ["failed", "-", "-"]
        else:
            imp, last = r["improvement"] or {}, (r["heldout"] or [{}])[-1]
            cells += [f"{imp.get('mean', float('nan')):+.3f} [{imp.get('ci_low') or float('nan'):+.3f}, "
                      f"{imp.get('ci_high') or float('nan'):+.3f}]", str(imp.get("n", "-")), f"{last.get('mean', float('nan')):+.3f}"]
        cells += [f"{r['seconds'] / 60:.1f}" if r.get("seconds") else "-", f"{r.get('bytes', 0) / 2**30:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    verdict = (f"Chosen (highest mean validation change among points within {budget_s / 60:.0f} minutes): "
               + (", ".join(f"{k}={v}" for k, v in chosen["settings"].items()) + f" (mean change {chosen['mean']:+.3f})"
                  if chosen else "none: no point finished within the budget"))
    return "\n".join(lines) + "\n\n" + verdict + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--grid", nargs="+", type=lambda t: parse_setting(t, many=True), required=True,
                   help="FLAG=V1,V2,...: train_agent.py flags (without dashes) and the values to try; every combination runs")
    p.add_argument("--base", nargs="*", type=lambda t: parse_setting(t, many=False), default=[],
                   help="FLAG=VALUE: train_agent.py flags shared by every point (default: none, the embedded defaults)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1], help="seeds of every point (default: %(default)s)")
    p.add_argument("--eval-prompts", type=int, default=8,
                   help="train-split items held back as the validation set, each played at every H (default: %(default)s)")
    p.add_argument("--budget-minutes", type=float, default=13.0,
                   help="a point counts for the choice only if it finished within this wall time (default: %(default)s)")
    p.add_argument("--parallel", type=int, default=1,
                   help="points run at the same time (default: %(default)s; with 2 cores, 2 points of --threads 1 each)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of each run (OMP_NUM_THREADS; default: torch's own choice)")
    p.add_argument("--output-dir", type=Path, default=Path("runs/sweep"), help="where the runs go (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="also write every point's results and the choice here")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table and the choice here")
    args = p.parse_args(argv)
    keys = [k for k, _ in args.grid]
    if len(set(keys)) != len(keys) or set(keys) & {k for k, _ in args.base}:
        p.error(f"each flag may appear once in --grid and --base together, got --grid {keys} --base {[k for k, _ in args.base]}")
    if {"seed", "eval-split", "eval-prompts", "output-dir", "run-name", "agent"} & set(keys + [k for k, _ in args.base]):
        p.error("--grid/--base cannot set seed, eval-split, eval-prompts, output-dir, run-name or agent: the sweep sets them")
    if args.parallel < 1 or (args.threads is not None and args.threads < 1):
        p.error(f"--parallel and --threads must be at least 1, got {args.parallel} and {args.threads}")
    if args.eval_prompts < 1:
        p.error(f"--eval-prompts must be at least 1 (the validation set), got {args.eval_prompts}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    keys = [k for k, _ in args.grid]
    points = [(dict(zip(keys, values)), seed) for values in itertools.product(*[v for _, v in args.grid]) for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        rows = list(pool.map(lambda point: run_point(args, *point), points))
    budget_s = args.budget_minutes * 60
    chosen = choose(rows, budget_s)
    table = markdown(rows, keys, chosen, budget_s)
    print(table, flush=True)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps({"base": dict(args.base), "points": rows, "chosen": chosen}, indent=1))


if __name__ == "__main__":
    main()
