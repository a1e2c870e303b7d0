"""The commands under hostile use: one table of bad invocations of refuel-train (scripts/train_agent.py),
refuel-evaluate (scripts/evaluate.py) and refuel-reproduce-table1 (scripts/reproduce_table1.py).

Each row is refused with a non-zero exit, no traceback, and a message that names the flag (or the file),
the value and what to pass, before any work: most rows are refused by the parser or the configuration's
checks, before a model loads. Rows run in-process (``main(argv)``), but for ``subprocess`` rows, whose
exit path is checked as a user meets it. A new flag or check gets a row in ``BAD_INVOCATIONS``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from refuel_agents import checkpoint as ckpt
from refuel_agents.commands import evaluate, reproduce_table1, train

ROOT = Path(__file__).resolve().parents[1]
ENV_KWARGS = json.dumps({"user": "instant", "max_turns": 2, "tokenizer": None})


def train_flags(ctx: Context) -> list[str]:
    """A tiny REFUEL run on the word-level test model: the base every train row changes."""
    return ["--policy-model", str(ctx.word_lm), "--env-kwargs", ENV_KWARGS, "--device", "cpu", "--epochs", "1",
            "--last-k-layers", "none", "--iterations", "1", "--prompts-per-iteration", "4", "--batch-size", "2",
            "--micro-batch-size", "1", "--max-new-tokens", "5", "--eval-prompts", "0", "--save-every", "1",
            "--keep-checkpoints", "3", "--output-dir", str(ctx.out), "--run-name", "run", "--no-progress"]


@dataclass
class Context:
    tmp: Path
    word_lm: Path
    request: pytest.FixtureRequest
    out: Path = field(init=False)

    def __post_init__(self):
        self.out = self.tmp / "runs"

    def file(self) -> Path:
        path = self.tmp / "a-file"
        path.write_text("not a folder")
        return path

    def read_only(self) -> Path:
        if os.geteuid() == 0:  # root writes through permission bits: /sys refuses new files even to root
            return Path("/sys/refuel-gym-out")
        path = self.tmp / "read-only"
        path.mkdir()
        path.chmod(0o555)
        return path

    def earlier_run(self, changed: list[str] = ()) -> None:
        """A run folder whose config.json records the base flags (with ``changed`` applied)."""
        args = train.build_parser("refuel", "embedded").parse_args([*train_flags(self), *changed])
        config = train.dataclass_from_args(train.AGENTS["refuel"][0], args)
        (self.out / "run").mkdir(parents=True)
        (self.out / "run" / "config.json").write_text(json.dumps(ckpt.run_record("refuel", "refuel", config)))

    def damaged_run(self, cut: Callable[[Path], Path]) -> str:
        """A copy of a real run stopped mid-iteration 0 (checkpoint step 1), with the file ``cut`` picks cut in
        half; returns that file's path."""
        shutil.copytree(self.request.getfixturevalue("trained_run"), self.out / "run")
        run = self.out / "run"
        (run / "checkpoints" / "latest").write_text("step_0000001")
        target = cut(run)
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
        return str(target)


@dataclass
class Row:
    command: str  # train, evaluate or reproduce
    argv: Callable[[Context], list[str]]
    expected: Callable[[Context], list[str]] | list[str]  # every one of these is in the message
    subprocess: bool = False


def _train(*extra: str):
    return lambda ctx: [*train_flags(ctx), *extra]


def _resumed(changed: list[str]):
    def argv(ctx: Context) -> list[str]:
        ctx.earlier_run()
        return [*train_flags(ctx), "--resume", *changed]

    return argv


def _damaged(cut: Callable[[Path], Path]):
    def argv(ctx: Context) -> list[str]:
        ctx.damaged_file = ctx.damaged_run(cut)
        return [*train_flags(ctx), "--resume"]

    return argv


def _names_damaged_file(*advice: str):
    return lambda ctx: [ctx.damaged_file, "is damaged", *advice]


def _eval(*extra: str):
    return lambda ctx: ["--policy", "embedded", "--output-dir", str(ctx.tmp / "eval"), "--quiet", *extra]


def _reproduce(*extra: str):
    return lambda ctx: ["--dry-run", "--output-dir", str(ctx.tmp / "table1"), "--methods", "refuel", *extra]


BAD_INVOCATIONS: dict[str, Row] = {
    # ------------------------------------------------------------------ refuel-train
    "batch size 0": Row("train", _train("--batch-size", "0"), ["--batch-size 0", "integer >= 1"]),
    "batch size -2": Row("train", _train("--batch-size", "-2"), ["--batch-size -2", "integer >= 1"]),
    "epochs 0": Row("train", _train("--epochs", "0"), ["--epochs 0", "integer >= 1"]),
    "epochs -1": Row("train", _train("--epochs", "-1"), ["--epochs -1", "integer >= 1"]),
    "env kwargs with a typo": Row("train", _train("--env-kwargs", '{"max_turn": 2}'),
                                  ["--env-kwargs", "max_turn", "valid:", "max_turns"]),
    "env kwargs a list": Row("train", _train("--env-kwargs", "[1,2]"), ["--env-kwargs", "[1,2]", "pass a JSON object"]),
    "env kwargs not JSON": Row("train", _train("--env-kwargs", "{max_turns: 2}"), ["--env-kwargs", "not valid JSON"]),
    "cuda without CUDA": Row("train", _train("--device", "cuda"), ["--device cuda", "no CUDA device", "--device cpu"]),
    "device not a device": Row("train", _train("--device", "gpu0"), ["--device gpu0", "pass cpu, cuda or cuda:N"]),
    "output dir is a file": Row("train", lambda ctx: [*train_flags(ctx), "--output-dir", str(ctx.file())],
                                lambda ctx: ["--output-dir", str(ctx.tmp / "a-file"), "not a folder"]),
    "output dir read-only": Row("train", lambda ctx: [*train_flags(ctx), "--output-dir", str(ctx.read_only())],
                                ["--output-dir", "cannot be written", "pass a folder you can write to"]),
    "seed -1": Row("train", _train("--seed", "-1"), ["--seed -1", "integer >= 0"]),
    "max seq len 0": Row("train", _train("--max-seq-len", "0"), ["--max-seq-len 0", "integer >= 1"]),
    "lr nan": Row("train", _train("--lr", "nan"), ["--lr nan", "finite learning rate > 0"]),
    "run name climbing out": Row("train", _train("--run-name", "../../x"), ["--run-name '../../x'", "no path separator"]),
    "run name absolute": Row("train", _train("--run-name", "/tmp/x"), ["--run-name '/tmp/x'", "one folder name"]),
    "run name with a separator": Row("train", _train("--run-name", "a/b"), ["--run-name 'a/b'", "no path separator"]),
    "run name ..": Row("train", _train("--run-name", ".."), ["--run-name '..'", "not '.' or '..'"]),
    "report to an unknown tracker": Row("train", _train("--report-to", "mlflow"),
                                        ["--report-to mlflow", "'tensorboard', 'wandb', 'trackio'"]),
    "eval prompts beyond the split": Row("train", _train("--eval-prompts", "1000"),
                                         ["eval_prompts=1000", "pass --eval-prompts"]),
    "resume of a missing run": Row("train", _train("--resume"), ["--resume", "does not exist", "drop --resume"]),
    "resume with another lr": Row("train", _resumed(["--lr", "5e-4"]),
                                  ["--resume", "lr: earlier 3e-05, now 0.0005", "Resume with the run's own flags"]),
    "resume with another env id and seed": Row(
        "train", _resumed(["--env-id", "AnthropicHHPresampled-v0", "--seed", "9"]),
        ["env_id: earlier 'UltraInteractDialogue-v0', now 'AnthropicHHPresampled-v0'", "seed: earlier 1, now 9"]),
    "resume with a cut state.json": Row(
        "train", _damaged(lambda run: run / "checkpoints" / "step_0000001" / "state.json"),
        _names_damaged_file("remove", "pass --resume again")),
    "resume with cut safetensors": Row(
        "train", _damaged(lambda run: next((run / "checkpoints" / "step_0000001" / "model").glob("*.safetensors"))),
        _names_damaged_file("pass --resume again")),
    "resume with a cut engine.pt": Row(
        "train", _damaged(lambda run: next((run / "checkpoints" / "step_0000001" / "engine").rglob("*.pt"))),
        lambda ctx: [str(Path(ctx.damaged_file).parent), "is damaged", "pass --resume again"]),
    "resume with cut tuples": Row(
        "train", _damaged(lambda run: next((run / "iteration_000" / "tuples").glob("*.arrow"))),
        lambda ctx: [str(Path(ctx.damaged_file).parent), "damaged", "remove that folder and pass --resume again"]),
    "config file with an unknown key": Row("train", lambda ctx: ["--config", str(_yaml(ctx, "hoizon: 2\n"))],
                                           ["--config", "unknown key(s) ['hoizon']"]),
    "max seq len 0, as a user runs it": Row("train", _train("--max-seq-len", "0"), ["--max-seq-len 0"], subprocess=True),
    # ------------------------------------------------------------------ refuel-evaluate
    "evaluate into a file": Row("evaluate", lambda ctx: [*_eval()(ctx), "--output-dir", str(ctx.file())],
                                lambda ctx: ["--output-dir", str(ctx.tmp / "a-file"), "not a folder"]),
    "evaluate into a read-only folder": Row(
        "evaluate", lambda ctx: [*_eval()(ctx), "--output-dir", str(ctx.read_only())], ["--output-dir", "cannot be written"]),
    "reward judge with a template": Row("evaluate", _eval("--judge", "reward", "--judge-template", "hh"),
                                        ["--judge-template 'hh'", "--judge is 'reward'", "Drop --judge-template"]),
    "evaluate env kwargs a list": Row("evaluate", _eval("--env-kwargs", "[1,2]"), ["--env-kwargs", "not an object"]),
    # ------------------------------------------------------------------ refuel-reproduce-table1
    "unbalanced quote in train args": Row("reproduce", _reproduce("--train-args", "--lr '2e-6"),
                                          ["--train-args", "--lr '2e-6", "close every quote"]),
    "table1 into a file": Row("reproduce", lambda ctx: [*_reproduce()(ctx), "--output-dir", str(ctx.file())],
                              ["--output-dir", "not a folder"]),
    "dry run with lr nan": Row("reproduce", _reproduce("--train-args", "--lr nan"),
                               ["--lr nan", "finite learning rate", "Fix --train-args"]),
    "dry run with a bogus flag": Row("reproduce", _reproduce("--train-args=--bogus-flag"),
                                     ["unrecognized arguments: --bogus-flag", "Fix --train-args"]),
    "unbalanced quote, as a user runs it": Row("reproduce", _reproduce("--train-args", "--lr '2e-6"),
                                               ["--train-args", "close every quote"], subprocess=True),
}
SLOW = {"eval prompts beyond the split", "resume with a cut state.json", "resume with cut safetensors",
        "resume with a cut engine.pt", "resume with cut tuples", "max seq len 0, as a user runs it",
        "unbalanced quote, as a user runs it"}
MAINS = {"train": train.main, "evaluate": evaluate.main, "reproduce": reproduce_table1.main}
SCRIPTS = {"train": "train_agent.py", "evaluate": "evaluate.py", "reproduce": "reproduce_table1.py"}


def _yaml(ctx: Context, text: str) -> Path:
    path = ctx.tmp / "run.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def trained_run(word_lm_dir, tmp_path_factory) -> Path:
    """A real run of one iteration (2 steps) with a checkpoint after each step."""
    ctx = Context(tmp_path_factory.mktemp("trained"), word_lm_dir, None)
    train.main(train_flags(ctx))
    run = ctx.out / "run"
    assert (run / "checkpoints" / "step_0000001" / "state.json").is_file()
    return run


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in BAD_INVOCATIONS])
def test_bad_invocation_is_refused_clearly(name, tmp_path, word_lm_dir, request, capsys):
    if name == "cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # (CI's machines have none: the row runs there)
    row = BAD_INVOCATIONS[name]
    ctx = Context(tmp_path, word_lm_dir, request)
    argv = row.argv(ctx)
    start = time.perf_counter()
    if row.subprocess:
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / SCRIPTS[row.command]), *argv],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        code, message = done.returncode, done.stderr
        assert "Traceback" not in message, message[-3000:]
    else:
        with pytest.raises(SystemExit) as exit_:  # any other exception is a traceback for the user
            MAINS[row.command](argv)
        code = exit_.value.code
        message = code if isinstance(code, str) else capsys.readouterr().err
    assert code not in (0, None), f"{name}: exited {code!r}"
    expected = row.expected(ctx) if callable(row.expected) else row.expected
    missing = [text for text in expected if text not in message]
    assert not missing, f"{name}: {missing} not in the message:\n{message}"
    assert time.perf_counter() - start < 60, f"{name}: refused only after {time.perf_counter() - start:.0f} s"
    if row.command == "train" and "resume" not in name and "damaged" not in name:
        assert not (ctx.out / "run").exists(), f"{name}: the run folder was created before the refusal"


# ------------------------------------------------------------------ --config and --report-to


def test_a_config_file_sets_flags_and_explicit_flags_override_it(tmp_path):
    (tmp_path / "dpo.yaml").write_text("agent: dpo\nmode: lt-mixed\nbeta: 0.2\nlr: 2.0e-6\nbetas: [0.8, 0.9]\n"
                                       "env_kwargs: {max_turns: 2}\nlast_k_layers: null\nprogress: false\n")
    agent, config = train.parse_config(["--config", str(tmp_path / "dpo.yaml"), "--beta", "0.3"])
    assert agent == "dpo" and config.mode == "lt-mixed" and config.beta == 0.3 and config.lr == 2e-6
    assert config.betas == (0.8, 0.9) and config.env_kwargs == {"max_turns": 2} and config.last_k_layers is None
    assert config.progress is False
    (tmp_path / "eval.json").write_text(json.dumps({"policy": ["a=embedded", "b=embedded"], "num_prompts": 4,
                                                    "no_kl": True}))
    args = evaluate.parse_args(["--config", str(tmp_path / "eval.json"), "--num-prompts", "2"])
    assert args.policy == ["a=embedded", "b=embedded"] and args.num_prompts == 2 and args.no_kl
    args = evaluate.parse_args(["--config", str(tmp_path / "eval.json"), "--policy", "embedded"])
    assert args.policy == ["embedded"]  # explicit --policy flags replace the file's list


def test_report_to_names_a_missing_extra_and_none_writes_no_tracker(tmp_path, monkeypatch):
    from refuel_agents import tracking

    assert tracking.parse_report_to("none") == [] and tracking.parse_report_to("tensorboard") == ["tensorboard"]
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)  # as where wandb is not installed
    with pytest.raises(ValueError, match=r"wandb package is not installed.*pip install 'refuel-gym\[wandb\]'"):
        tracking.parse_report_to("tensorboard,wandb")
    logger = tracking.MetricsLogger(tmp_path / "none", report_to="none")
    logger.log(1, {"losses/loss": 0.5}, echo=False)
    logger.close()
    assert (tmp_path / "none" / "metrics.jsonl").is_file() and not (tmp_path / "none" / "tensorboard").exists()
    logger = tracking.MetricsLogger(tmp_path / "tb", report_to="tensorboard")
    logger.log(1, {"losses/loss": 0.5}, echo=False)
    logger.close()
    assert any((tmp_path / "tb" / "tensorboard").iterdir())


def test_the_trainer_itself_refuses_a_resume_with_other_flags(tmp_path, word_lm_dir):
    """Not only the command: RefuelTrainer.setup() compares the config with the run's config.json."""
    from refuel_agents.refuel import RefuelTrainer

    ctx = Context(tmp_path, word_lm_dir, None)
    ctx.earlier_run()
    _, config = train.parse_config([*train_flags(ctx), "--resume", "--lr", "5e-4"])
    trainer = RefuelTrainer(config)
    with pytest.raises(ValueError, match=r"lr: earlier 3e-05, now 0.0005"):
        trainer.setup()
    assert sorted(p.name for p in (ctx.out / "run").iterdir()) == ["config.json"]  # nothing written
