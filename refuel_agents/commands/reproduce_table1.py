"""Reproduce table 1: train REFUEL and the eight baselines on one configuration, then evaluate
every trained policy against the base model, per turn, on the same held-out prompts.

    python scripts/reproduce_table1.py                                   # embedded default, CPU (see docs/evaluation.md for the time)
    refuel-reproduce-table1 --methods refuel                             # the same, installed (pip install .)
    python scripts/reproduce_table1.py --methods refuel rebel-lt-online  # a subset of the rows
    python scripts/reproduce_table1.py --preset paper-setting-one --judge openai:gpt-4-0613 --both-orders \\
        --eval-prompts 500 --benchmark llama-3.1-8b-it=hf:meta-llama/Llama-3.1-8B-Instruct \\
        --train-launcher "deepspeed --num_gpus 8" --train-args "--deepspeed refuel_agents/configs/deepspeed_zero3.json"

Each method is trained by ``scripts/train_agent.py`` and all of them are evaluated in one run of
``scripts/evaluate.py`` (installed: the modules ``refuel_agents.commands.train`` and ``.evaluate``) (same prompts, same seeds, same judge), each in a subprocess whose exact
command line is written to ``<output-dir>/commands.sh`` before it runs. Rerunning the same command
continues an interrupted reproduction: a method whose ``final_model`` exists is not trained
again, and one with a run folder is resumed (from its last checkpoint, or from its start with the
tuples it stored when it was interrupted before its first checkpoint). A folder that is not a run
(no config.json) is renamed ``<method>.not-a-run-<time>`` and the method trained afresh; nothing is
deleted. Before reusing or resuming a run, its ``config.json`` is compared with the
configuration the flags give now; any difference is an error that names the fields. The flags
of --train-args are checked as train_agent.py checks them, for every method, before anything
runs (--dry-run too).

Writes ``<output-dir>/``: one run folder per method, ``commands.sh``, ``eval/`` (results.md,
results.json, winrate_by_turn.png) and ``table1.md`` (rows: methods; columns: h = 1..H and avg).
On the embedded default the models are tiny and trained for a few steps: the run checks that the
whole pipeline works, and its numbers say nothing about the methods.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from refuel_agents import checkpoint as ckpt
from refuel_agents.cli import StrictParser, check_output_dir
from refuel_agents.commands import evaluate as evaluate_command
from refuel_agents.commands import train as train_agent
from refuel_agents.modes import BASELINE_MODES

#: The checkout (scripts/ beside the package), or the folder the package is installed in.
ROOT = Path(__file__).resolve().parents[2]
CHECKOUT = (ROOT / "scripts" / "train_agent.py").is_file()
#: What each subprocess runs: the checkout's scripts, or the installed commands' modules.
TRAIN_SCRIPT = ROOT / "scripts" / "train_agent.py" if CHECKOUT else Path(train_agent.__file__)
EVAL_SCRIPT = ROOT / "scripts" / "evaluate.py" if CHECKOUT else Path(evaluate_command.__file__)
RUN_LOCAL_FIELDS = ckpt.RUN_LOCAL_FIELDS
config_differences = ckpt.config_differences

#: Table 1's rows, in its order: (row name, agent, mode).
METHODS: dict[str, tuple[str, str | None]] = {
    **{f"dpo-{m}": ("dpo", m) for m in BASELINE_MODES},
    **{f"rebel-{m}": ("rebel", m) for m in BASELINE_MODES},
    "refuel": ("refuel", None),
}

#: Per preset: the environment of the evaluation, the reference policy, and extra training flags.
SETUPS: dict[str, dict] = {
    # A bounded CPU run: one short iteration per method, H <= 3.
    "embedded": {
        "env_id": "UltraInteractDialogue-v0", "env_preset": None, "reference": "embedded", "horizon": 3,
        "env_kwargs": {"max_turns": 3, "user_max_new_tokens": 24},
        "train_args": ["--iterations", "1", "--prompts-per-iteration", "4", "--batch-size", "4",
                       "--micro-batch-size", "2", "--max-new-tokens", "24", "--eval-prompts", "0"],
        "eval_max_new_tokens": 24,
    },
    "paper-setting-one": {
        "env_id": "UltraInteractDialogue-v0", "env_preset": "paper-setting-one", "env_kwargs": {},
        "reference": "hf:meta-llama/Meta-Llama-3-8B-Instruct", "horizon": 5, "train_args": [],
        "eval_max_new_tokens": 1024,
    },
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(SETUPS), default="embedded",
                        help="the configuration: training preset of train_agent.py and evaluation environment "
                             "(default: %(default)s)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD",
                        help="rows to train and evaluate (default: all nine: " + ", ".join(METHODS) + ")")
    parser.add_argument("--seed", type=int, default=1, help="seed of every training run and of the evaluation (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the runs and the table go (default: runs/table1-<preset>-seed<seed>)")
    parser.add_argument("--train-args", default="",
                        help="extra flags for every train_agent.py run, one quoted string, e.g. \"--lr 2e-6 --eta 5\" "
                             "(they come after the preset's own and override them)")
    parser.add_argument("--train-launcher", default="",
                        help="command that starts each training, e.g. \"deepspeed --num_gpus 8\" "
                             "(default: this Python interpreter)")
    parser.add_argument("--judge", default="reward",
                        help="evaluate.py's judge: 'reward' (the environment's reward model) or a model spec such as "
                             "openai:gpt-4-0613 (the paper's judge) (default: %(default)s)")
    parser.add_argument("--both-orders", action="store_true",
                        help="judge every comparison in both A/B orders (LLM judges only; refused with --judge reward)")
    parser.add_argument("--judge-template", default="auto", metavar="auto|hh|ultrainteract|PATH",
                        help="evaluate.py's judge prompt: a built-in one, or a text file with the placeholders "
                             "{dialogue_a} and {dialogue_b} (or appendix C.5's {{dialoguea}} and {{dialogueb}}), "
                             "e.g. appendix C.5's exact text (default: %(default)s)")
    parser.add_argument("--eval-prompts", type=int, default=4, help="held-out prompts in the evaluation (default: %(default)s)")
    parser.add_argument("--horizon", type=int, default=None, help="turns H of the evaluation (default: the preset's)")
    parser.add_argument("--benchmark", action="append", default=[], metavar="NAME=SPEC",
                        help="also evaluate an untrained model as a row, e.g. llama-3.1-70b-it=vllm:meta-llama/"
                             "Llama-3.1-70B-Instruct (repeatable; environment-only benchmarking)")
    parser.add_argument("--dry-run", action="store_true", help="write and print the commands without running them")
    return parser


def train_arguments(args: argparse.Namespace, setup: dict, method: str, run_dir: Path) -> list[str]:
    """train_agent.py's arguments for one method (without --resume)."""
    agent, mode = METHODS[method]
    cmd = ["--agent", agent]
    if mode is not None:
        cmd += ["--mode", mode]
    if args.preset != "embedded":
        cmd += ["--preset", args.preset]
    cmd += [*setup["train_args"], "--seed", str(args.seed), "--output-dir", str(run_dir.parent),
            "--run-name", run_dir.name, "--no-progress", *shlex.split(args.train_args)]
    if setup["env_kwargs"]:
        cmd += ["--env-kwargs", json.dumps(setup["env_kwargs"])]
    return cmd


def train_command(args: argparse.Namespace, setup: dict, method: str, run_dir: Path, *, resume: bool = False) -> list[str]:
    launcher = shlex.split(args.train_launcher) or [sys.executable]
    cmd = [*launcher, str(TRAIN_SCRIPT), *train_arguments(args, setup, method, run_dir)]
    if resume:
        cmd.append("--resume")  # interrupted: continue from the last checkpoint, or from the stored tuples
    return cmd


def expected_run_config(train_argv: list[str]) -> dict:
    """The config.json that train_agent.py would write for these arguments (parsed and checked as it does)."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--agent", default="refuel")
    first.add_argument("--preset", default="embedded")
    first.add_argument("--mode", default=None)
    known, _ = first.parse_known_args(train_argv)
    strict = train_agent.build_parser(known.agent, known.preset, parser_class=StrictParser)
    try:
        parsed = strict.parse_args(train_argv)
        config_cls, _ = train_agent.AGENTS[parsed.agent]
        config = train_agent.dataclass_from_args(config_cls, parsed)
        config.validate()
    except ValueError as err:
        raise SystemExit(f"error: train_agent.py refuses these arguments ({err}):\n  {shlex.join(train_argv)}\n"
                         "Fix --train-args (or --preset).") from None
    mode = "refuel" if parsed.agent == "refuel" else config.mode
    return ckpt.run_record(parsed.agent, mode, config)


def run_state(run_dir: Path) -> str:
    """'new' (no folder, or an empty one), 'finished' (final_model), 'resume' (a run folder: a checkpoint,
    or config.json and what the run stored before its first checkpoint) or 'restart' (a folder that is
    not a run: no config.json)."""
    from refuel_agents.checkpoint import latest_checkpoint

    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "new"
    if (run_dir / "final_model").exists():
        return "finished"
    try:
        latest = latest_checkpoint(run_dir)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {run_dir.name}: {err}") from None
    return "resume" if latest is not None or (run_dir / "config.json").is_file() else "restart"


def eval_command(args: argparse.Namespace, setup: dict, out: Path, horizon: int) -> list[str]:
    cmd = [sys.executable, str(EVAL_SCRIPT)]
    for method in args.methods:
        cmd += ["--policy", f"{method}={out / method / 'final_model'}"]
    for spec in args.benchmark:
        cmd += ["--policy", spec]
    cmd += ["--reference", setup["reference"], "--judge", args.judge, "--env-id", setup["env_id"],
            "--num-prompts", str(args.eval_prompts), "--horizon", str(horizon), "--seed", str(args.seed),
            "--max-new-tokens", str(setup["eval_max_new_tokens"]), "--output-dir", str(out / "eval"), "--quiet"]
    if setup["env_preset"]:
        cmd += ["--env-preset", setup["env_preset"]]
    if setup["env_kwargs"]:
        cmd += ["--env-kwargs", json.dumps(setup["env_kwargs"])]
    if args.both_orders:
        cmd.append("--both-orders")
    if args.judge_template != "auto":
        template = Path(args.judge_template)
        cmd += ["--judge-template", str(template.resolve()) if template.is_file() else args.judge_template]
    return cmd


def table1(results: dict, rows: list[str]) -> str:
    """Table 1's layout: one row per method, win rate (%) at h = 1..H and their average."""
    H = int(results["config"]["horizon"])
    lines = ["| Method | " + " | ".join(f"h={h}" for h in range(1, H + 1)) + " | avg |", "|---" * (H + 2) + "|"]
    for name in rows:
        wr = results["policies"][name]["win_rate"]
        cells = []
        for h in range(1, H + 1):
            t = wr["per_turn"].get(str(h)) or wr["per_turn"].get(h)
            cells.append(f"{100 * t['win_rate']:.1f}" if t and t["n"] and t["win_rate"] is not None else "-")
        avg = wr["average"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if avg is None else f'{100 * avg:.2f}'} |")
    return "\n".join(lines)


def run(cmd: list[str], log: Path) -> None:
    print(f"\n$ {shlex.join(cmd)}\n  (log: {log})", flush=True)
    start = time.perf_counter()
    with log.open("a") as f:
        proc = subprocess.run(cmd, cwd=ROOT if CHECKOUT else None, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"error: this command failed with exit code {proc.returncode}:\n{shlex.join(cmd)}\n"
                         f"last lines of {log}:\n{tail}")
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup = SETUPS[args.preset]
    horizon = args.horizon or setup["horizon"]
    if args.eval_prompts < 1:
        raise SystemExit(f"error: --eval-prompts must be at least 1, got {args.eval_prompts}")
    if args.horizon is not None and args.horizon < 1:
        raise SystemExit(f"error: --horizon must be at least 1, got {args.horizon}")
    if args.both_orders and args.judge == "reward":
        raise SystemExit("error: --both-orders needs an LLM judge, but --judge is 'reward': the reward model scores "
                         "each dialogue on its own, so there is no A/B order to swap. Drop --both-orders, or pass "
                         "a model spec to --judge (e.g. openai:gpt-4-0613).")
    if args.judge_template != "auto":
        from refuel_agents.evaluation import load_judge_template

        try:
            load_judge_template(args.judge_template)
        except ValueError as err:
            raise SystemExit(f"error: --judge-template {args.judge_template!r}: {err}") from None
    for flag in ("--train-args", "--train-launcher"):
        text = getattr(args, flag[2:].replace("-", "_"))
        try:
            shlex.split(text)
        except ValueError as err:
            raise SystemExit(f"error: {flag} {text!r} is not a valid shell-quoted string ({err}); close every "
                             "quote, e.g. --train-args \"--lr 2e-6 --eta 5\"") from None
    out = (args.output_dir or (ROOT if CHECKOUT else Path.cwd()) / "runs" / f"table1-{args.preset}-seed{args.seed}").resolve()
    try:
        check_output_dir(out)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for method in args.methods:  # every row's flags, checked as train_agent.py checks them, before anything runs
        expected_run_config(train_arguments(args, setup, method, out / method))
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    commands: list[tuple[str, list[str]]] = []
    notes: list[str] = []
    moves: list[tuple[Path, Path]] = []
    mismatches: list[str] = []
    for method in args.methods:
        run_dir = out / method
        state = run_state(run_dir)
        if state in ("finished", "resume"):
            config_file = run_dir / "config.json"
            if config_file.is_file():
                earlier = json.loads(config_file.read_text())
                differences = config_differences(earlier, expected_run_config(train_arguments(args, setup, method, run_dir)))
                if differences:
                    mismatches.append(f"{method} ({config_file}):\n    " + "\n    ".join(differences))
                    continue
            else:
                notes.append(f"{method}: {config_file} is missing, so its flags cannot be checked")
        if state == "finished":
            print(f"{method}: {run_dir / 'final_model'} exists, not trained again", flush=True)
            continue
        if state == "restart":
            aside = out / f"{method}.not-a-run-{stamp}"
            moves.append((run_dir, aside))
            notes.append(f"{method}: {run_dir} is not a run folder (no config.json); it is moved to {aside} "
                         "and the method is trained afresh")
        commands.append((method, train_command(args, setup, method, run_dir, resume=state == "resume")))
    if mismatches:
        raise SystemExit(
            "error: the flags differ from the earlier runs in " + str(out) + ", which would be continued or reused:\n  "
            + "\n  ".join(mismatches)
            + "\nRerun with the earlier flags, or pass another --output-dir to start a new reproduction."
        )
    commands.append(("eval", eval_command(args, setup, out, horizon)))
    for note in notes:
        print(note, flush=True)
    script = out / "commands.sh"
    with script.open("a") as f:
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} reproduce_table1.py {shlex.join(argv or sys.argv[1:])}\n")
        f.writelines(f"# {'would move' if args.dry_run else 'moved'} {src} -> {dst} (not a run)\n" for src, dst in moves)
        f.writelines(f"{shlex.join(cmd)}\n" for _, cmd in commands)
    if args.dry_run:
        print("\n".join(shlex.join(cmd) for _, cmd in commands))
        return
    for src, dst in moves:
        src.rename(dst)
    start = time.perf_counter()
    for step, (name, cmd) in enumerate(commands, 1):
        print(f"[{step}/{len(commands)}] {name}", flush=True)
        run(cmd, out / f"{name}.log")
    results = json.loads((out / "eval" / "results.json").read_text())
    rows = [*args.methods, *(spec.split("=", 1)[0] if "=" in spec else spec for spec in args.benchmark)]
    text = (f"Win rate (%) against {setup['reference']} at each turn h (judge: {args.judge}; "
            f"{args.eval_prompts} held-out prompts; seed {args.seed}; preset {args.preset})\n\n" + table1(results, rows))
    (out / "table1.md").write_text(text + "\n")
    print(f"\n{text}\n\nreward score, KL, length and 95 % intervals: {out / 'eval' / 'results.md'}\n"
          f"commands: {script}\ntotal {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
