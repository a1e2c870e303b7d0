"""scripts/reproduce_table1.py: the commands it runs for each row, resuming, and the table it prints."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def script():
    from refuel_agents.commands import reproduce_table1

    return reproduce_table1


def _flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_dry_run_writes_one_training_per_row_and_one_evaluation(script, tmp_path, capsys):
    script.main(["--dry-run", "--output-dir", str(tmp_path), "--seed", "7", "--train-args", "--lr 2e-6"])
    lines = (tmp_path / "commands.sh").read_text().splitlines()
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert len(commands) == 10 and capsys.readouterr().out.strip().splitlines() == lines[1:]
    trained = {}
    for cmd in commands[:9]:
        assert cmd[1].endswith("scripts/train_agent.py") and _flag(cmd, "--seed") == "7"
        assert _flag(cmd, "--lr") == "2e-6" and "--resume" not in cmd
        trained[_flag(cmd, "--run-name")] = (_flag(cmd, "--agent"), _flag(cmd, "--mode"))
    assert trained == {
        **{f"{agent}-{mode}": (agent, mode) for agent in ("dpo", "rebel")
           for mode in ("lt-offline", "lt-mixed", "lt-online", "mt-mixed")},
        "refuel": ("refuel", None),
    }
    evaluation = commands[9]
    assert evaluation[1].endswith("scripts/evaluate.py")
    policies = [evaluation[i + 1] for i, a in enumerate(evaluation) if a == "--policy"]
    assert policies == [f"{name}={tmp_path / name / 'final_model'}" for name in script.METHODS]
    assert _flag(evaluation, "--seed") == "7" and _flag(evaluation, "--judge") == "reward"


def _earlier_run(script, out: Path, method: str, argv: list[str], *, checkpoint: bool, **changed) -> Path:
    """A run folder as train_agent.py leaves it: config.json for ``argv`` (with ``changed`` fields),
    and with ``checkpoint`` a complete checkpoint named by checkpoints/latest."""
    args = script.build_parser().parse_args(argv)
    run_dir = out / method
    config = script.expected_run_config(script.train_arguments(args, script.SETUPS[args.preset], method, run_dir))
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({**config, **changed}))
    if checkpoint:
        step = run_dir / "checkpoints" / "step_0000002"
        step.mkdir(parents=True)
        (step / "state.json").write_text("{}")
        (run_dir / "checkpoints" / "latest").write_text("step_0000002")
    return run_dir


def _commands(out: Path) -> dict[str, list[str]]:
    commands = [shlex.split(line) for line in (out / "commands.sh").read_text().splitlines() if not line.startswith("#")]
    return {_flag(cmd, "--run-name") or "eval": cmd for cmd in commands}


def test_finished_rows_are_reused_and_checkpointed_ones_resumed(script, tmp_path):
    argv = ["--dry-run", "--output-dir", str(tmp_path), "--methods", "refuel", "rebel-lt-online", "dpo-lt-mixed"]
    (_earlier_run(script, tmp_path, "refuel", argv, checkpoint=True) / "final_model").mkdir()
    _earlier_run(script, tmp_path, "rebel-lt-online", argv, checkpoint=True)
    script.main(argv)
    by_name = _commands(tmp_path)
    assert set(by_name) == {"rebel-lt-online", "dpo-lt-mixed", "eval"}  # refuel's final model exists
    assert "--resume" in by_name["rebel-lt-online"] and "--resume" not in by_name["dpo-lt-mixed"]


def _fake_run(tmp_path: Path, method: str, seen: list):
    def fake_run(cmd, log):  # records the command; the evaluation writes a results.json
        seen.append(cmd)
        if cmd[1].endswith("evaluate.py"):
            eval_dir = tmp_path / "eval"
            eval_dir.mkdir()
            turn = {"win_rate": 0.5, "n": 4}
            results = {"config": {"horizon": 3}, "policies": {method: {"win_rate": {
                "per_turn": {"1": turn, "2": turn, "3": turn}, "average": 0.5}}}}
            (eval_dir / "results.json").write_text(json.dumps(results))

    return fake_run


def test_a_run_interrupted_before_its_first_checkpoint_is_resumed(script, tmp_path, monkeypatch):
    """config.json and collected tuples, no checkpoint: resumed (train_agent.py continues from the stored
    tuples), not moved aside and trained again."""
    argv = ["--output-dir", str(tmp_path), "--methods", "rebel-lt-online"]
    run_dir = _earlier_run(script, tmp_path, "rebel-lt-online", argv, checkpoint=False)
    (run_dir / "iteration_000").mkdir()
    seen: list[list[str]] = []
    monkeypatch.setattr(script, "run", _fake_run(tmp_path, "rebel-lt-online", seen))
    script.main(argv)
    train, evaluation = seen
    assert _flag(train, "--run-name") == "rebel-lt-online" and "--resume" in train and run_dir.is_dir()
    assert evaluation[1].endswith("evaluate.py")
    assert "| rebel-lt-online | 50.0 | 50.0 | 50.0 | 50.00 |" in (tmp_path / "table1.md").read_text()


def test_a_folder_that_is_not_a_run_is_moved_aside(script, tmp_path, monkeypatch):
    argv = ["--output-dir", str(tmp_path), "--methods", "refuel"]
    (tmp_path / "refuel").mkdir()
    (tmp_path / "refuel" / "notes.txt").write_text("mine")
    seen: list[list[str]] = []
    monkeypatch.setattr(script, "run", _fake_run(tmp_path, "refuel", seen))
    script.main(argv)
    assert "--resume" not in seen[0]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("refuel.not-a-run-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine"


def test_flags_that_differ_from_the_earlier_run_are_an_error_naming_the_fields(script, tmp_path):
    argv = ["--dry-run", "--output-dir", str(tmp_path), "--methods", "refuel", "rebel-lt-online"]
    (_earlier_run(script, tmp_path, "refuel", argv, checkpoint=True, lr=1e-3) / "final_model").mkdir()
    _earlier_run(script, tmp_path, "rebel-lt-online", argv, checkpoint=True, seed=5)
    with pytest.raises(SystemExit) as err:
        script.main(argv)
    message = str(err.value)
    assert "refuel" in message and "lr: earlier 0.001, now " in message
    assert "rebel-lt-online" in message and "seed: earlier 5, now 1" in message
    assert "--output-dir" in message and not (tmp_path / "commands.sh").exists()
    # the same flags as the earlier runs: accepted (the run-local fields may differ)
    script.main([*argv, "--seed", "1", "--train-args", "--lr 1e-3", "--methods", "refuel"])
    assert set(_commands(tmp_path)) == {"eval"}  # refuel's final model is reused


def test_table_has_table_1_layout(script):
    def turn(rate, n=4):
        return {"win_rate": rate, "n": n}

    results = {
        "config": {"horizon": 3},
        "policies": {
            "refuel": {"win_rate": {"per_turn": {"1": turn(0.5), "2": turn(0.75), "3": turn(1.0)}, "average": 0.75}},
            "dpo-lt-mixed": {"win_rate": {"per_turn": {"1": turn(0.25), "2": turn(None, 0), "3": turn(0.5)},
                                          "average": 0.375}},
        },
    }
    table = script.table1(results, ["dpo-lt-mixed", "refuel"]).splitlines()
    assert table[0] == "| Method | h=1 | h=2 | h=3 | avg |"
    assert table[2] == "| dpo-lt-mixed | 25.0 | - | 50.0 | 37.50 |"
    assert table[3] == "| refuel | 50.0 | 75.0 | 100.0 | 75.00 |"


def test_bad_arguments_are_refused(script, tmp_path):
    with pytest.raises(SystemExit):
        script.main(["--dry-run", "--output-dir", str(tmp_path), "--methods", "ppo"])
    with pytest.raises(SystemExit, match="--eval-prompts must be at least 1, got 0"):
        script.main(["--dry-run", "--output-dir", str(tmp_path), "--eval-prompts", "0"])
    with pytest.raises(SystemExit, match="--both-orders needs an LLM judge, but --judge is 'reward'"):
        script.main(["--dry-run", "--output-dir", str(tmp_path), "--both-orders"])
    with pytest.raises(SystemExit, match="--judge-template 'no-such-file.txt'"):
        script.main(["--dry-run", "--output-dir", str(tmp_path), "--judge", "embedded",
                     "--judge-template", "no-such-file.txt"])


def test_judge_template_file_reaches_the_evaluation(script, tmp_path):
    template = tmp_path / "c5.txt"
    template.write_text("Dialogue A:\n\n{{dialoguea}}\n\nDialogue B:\n\n{{dialogueb}}\n\nPreferred: <\"A\" or \"B\">\n")
    out = tmp_path / "out"
    script.main(["--dry-run", "--output-dir", str(out), "--methods", "refuel", "--judge", "embedded",
                 "--judge-template", str(template), "--both-orders"])
    evaluation = _commands(out)["eval"]
    assert _flag(evaluation, "--judge-template") == str(template) and "--both-orders" in evaluation
