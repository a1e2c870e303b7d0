"""scripts/reproduce_table1.py: the commands it runs for each row, resuming, and the table it prints."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("reproduce_table1", ROOT / "scripts" / "reproduce_table1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_finished_rows_are_reused_and_interrupted_ones_resumed(script, tmp_path):
    (tmp_path / "refuel" / "final_model").mkdir(parents=True)
    (tmp_path / "rebel-lt-online").mkdir()
    script.main(["--dry-run", "--output-dir", str(tmp_path), "--methods", "refuel", "rebel-lt-online", "dpo-lt-mixed"])
    commands = [shlex.split(line) for line in (tmp_path / "commands.sh").read_text().splitlines()
                if not line.startswith("#")]
    by_name = {_flag(cmd, "--run-name"): cmd for cmd in commands if _flag(cmd, "--run-name")}
    assert set(by_name) == {"rebel-lt-online", "dpo-lt-mixed"}  # refuel's final model exists
    assert "--resume" in by_name["rebel-lt-online"] and "--resume" not in by_name["dpo-lt-mixed"]


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
    with pytest.raises(SystemExit, match="--eval-prompts"):
        script.main(["--dry-run", "--output-dir", str(tmp_path), "--eval-prompts", "0"])
