"""The installed commands: a wheel built from this tree and installed in a fresh virtual environment runs
``refuel-train --help`` and a ``--config`` run, from the installed package (not the checkout).

The fresh environment sees this environment's packages through a ``.pth`` line, so nothing is
downloaded; the wheel itself is installed with ``--no-deps --no-index``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("refuel_env", "refuel_agents"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                    str(source)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp / "dist").glob("refuel_gym-*.whl"))
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, capture_output=True,
                   timeout=600)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "outer_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # this environment's pip installs into the fresh one (--python): its console scripts run the fresh Python
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=600)
    return env_dir


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(list(args), cwd=cwd, env={**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True, timeout=900)


def test_every_command_of_pyproject_is_installed_and_imports_the_installed_package(venv, tmp_path):
    listed = _run(venv, str(venv / "bin" / "python"), "-c", "from importlib.metadata import distribution; "
                  "print(' '.join(e.name for e in distribution('refuel-gym').entry_points if e.group == 'console_scripts'))",
                  cwd=tmp_path)
    commands = listed.stdout.split()
    assert {"refuel-train", "refuel-evaluate", "refuel-reproduce-table1"} <= set(commands)
    for command in commands:
        assert (venv / "bin" / command).read_text().startswith(f"#!{venv / 'bin' / 'python'}"), command
    result = _run(venv, str(venv / "bin" / "refuel-train"), "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--config FILE" in result.stdout and "--report-to" in result.stdout, result.stderr
    where = _run(venv, str(venv / "bin" / "python"), "-c", "import refuel_agents; print(refuel_agents.__file__)",
                 cwd=tmp_path).stdout
    assert str(venv) in where and str(ROOT) not in where  # the wheel's copy, not this checkout


def test_a_config_file_run_with_an_explicit_flag_over_it(venv, word_lm_dir, tmp_path):
    config = {"policy_model": str(word_lm_dir), "env_kwargs": {"user": "instant", "max_turns": 2, "tokenizer": None},
              "iterations": 1, "prompts_per_iteration": 2, "batch_size": 2, "micro_batch_size": 1, "epochs": 1,
              "max_new_tokens": 4, "eval_prompts": 0, "last_k_layers": None, "device": "cpu", "lr": 1.0e-3,
              "output_dir": str(tmp_path / "runs"), "run_name": "from-config", "progress": False}
    (tmp_path / "run.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()) + "\n")
    result = _run(venv, str(venv / "bin" / "refuel-train"), "--config", "run.yaml", "--lr", "2e-3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "from-config"
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["lr"] == 2e-3 and recorded["prompts_per_iteration"] == 2  # the flag over the file
    assert recorded["env_kwargs"] == config["env_kwargs"] and (run / "final_model" / "config.json").is_file()
