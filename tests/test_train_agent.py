"""scripts/train_agent.py end to end: its files, --help, bad flags, and kill -9 then --resume."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "train_agent.py")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def flags(word_lm_dir, out, name):
    env_kwargs = {"user": "instant", "max_turns": 2, "tokenizer": None}
    return ["--agent", "refuel", "--policy-model", str(word_lm_dir), "--env-kwargs", json.dumps(env_kwargs),
            "--iterations", "2", "--prompts-per-iteration", "8", "--batch-size", "2", "--micro-batch-size", "1",
            "--max-new-tokens", "5", "--eval-prompts", "2", "--save-every", "2", "--lr", "1e-3", "--device", "cpu",
            "--epochs", "1", "--last-k-layers", "none",  # the embedded preset's 2 epochs and 8 layers do not fit this model
            "--eval-every", "1",  # (the embedded preset evaluates after every second iteration)
            "--output-dir", str(out), "--run-name", name, "--no-progress"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((run / "final_model").glob("*.safetensors"))))


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "losses/loss" in line]


@pytest.fixture(scope="module")
def reference_run(word_lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = subprocess.run([sys.executable, SCRIPT, *flags(word_lm_dir, out, "straight")], capture_output=True,
                            text=True, timeout=900, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "straight", result.stdout


def test_a_run_writes_everything(reference_run):
    run, stdout = reference_run
    for name in ("config.json", "metrics.jsonl", "summary.md", "summary.json", "reward_loss.png", "heldout_reward.png",
                 "tensorboard", "iteration_000/tuples", "iteration_001/tuples", "final_model/config.json"):
        assert (run / name).exists(), name
    assert steps(run) == list(range(1, 9))  # 2 iterations x 8 prompts / batch 2
    assert "Mean reward by dialogue length H" in stdout and "final model:" in stdout
    summary = json.loads((run / "summary.json").read_text())
    improvement = summary["heldout_improvement"]
    assert improvement["n"] == 4 and improvement["clusters"] == 2  # 2 prompts at H = 1 and 2
    assert improvement["ci_low"] <= improvement["mean"] <= improvement["ci_high"]
    assert [e["iteration"] for e in summary["heldout"]] == [0, 1, 2]  # after each iteration
    assert "Held-out improvement" in (run / "summary.md").read_text() and "Held-out improvement" in stdout
    # --keep-checkpoints 1 (the default): only the newest checkpoint; the final model shares its weight files.
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000008"]
    final = next((run / "final_model").glob("*.safetensors"))
    assert final.stat().st_ino == (run / "checkpoints" / "step_0000008" / "model" / final.name).stat().st_ino
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "final_model")  # loadable


def test_kill_9_then_resume_matches_an_uninterrupted_run(word_lm_dir, tmp_path, reference_run):
    straight, _ = reference_run
    args = [sys.executable, SCRIPT, *flags(word_lm_dir, tmp_path, "killed")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(s >= 5 for s in steps(tmp_path / "killed")):
            break  # in iteration 1, one step past the checkpoint of step 4
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final_model").exists()

    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=900, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    run = tmp_path / "killed"
    assert steps(run) == steps(straight)  # no step lost or logged twice
    import datasets

    for t in (0, 1):
        a = datasets.load_from_disk(str(run / f"iteration_{t:03d}" / "tuples"))
        b = datasets.load_from_disk(str(straight / f"iteration_{t:03d}" / "tuples"))
        assert a["item_id"] == b["item_id"] and a["response"] == b["response"]  # no tuple lost or duplicated
    mine, theirs = weights(run), weights(straight)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), "the resumed run diverged from the uninterrupted one"


def _file_size_limit(limit: int):
    def apply():  # the child's writes past ``limit`` bytes fail (EFBIG; Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_run_that_fails_before_its_first_checkpoint_resumes_from_its_stored_tuples(word_lm_dir, tmp_path,
                                                                                      reference_run):
    """The first checkpoint's write fails (a file-size limit smaller than the model), after iteration 0 stored
    its tuples: --resume finishes the run without collecting them again, as the uninterrupted run."""
    args = [sys.executable, SCRIPT, *flags(word_lm_dir, tmp_path, "stopped")]
    failed = subprocess.run(args, capture_output=True, text=True, timeout=900, env=ENV,
                            preexec_fn=_file_size_limit(200_000))
    run = tmp_path / "stopped"
    arrow = next((run / "iteration_000" / "tuples").glob("*.arrow"))
    stored = arrow.stat()
    assert failed.returncode != 0 and not (run / "checkpoints" / "latest").exists(), failed.stderr[-2000:]

    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=900, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from its start (it has no checkpoint yet)" in resumed.stdout
    now = arrow.stat()
    assert (now.st_ino, now.st_mtime_ns) == (stored.st_ino, stored.st_mtime_ns)  # not collected again
    straight, _ = reference_run
    assert steps(run) == steps(straight)
    mine, theirs = weights(run), weights(straight)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs), "the resumed run diverged from the uninterrupted one"


def test_kill_9_during_collection_then_resume_collects_only_the_missing_chunks(word_lm_dir, tmp_path):
    """Iteration 0 collects 4 prompts in chunks of 1, each stored as it ends. kill -9 once the first is stored (before
    the last), then --resume: the stored chunks are read back, untouched, and only the others are collected; the
    iteration's tuples are the chunks' rows, each prompt's once, in order."""
    chunked = lambda name: [sys.executable, SCRIPT, *flags(word_lm_dir, tmp_path, name), "--iterations", "1",  # noqa: E731
                            "--prompts-per-iteration", "4", "--eval-prompts", "0", "--collect-chunk-prompts", "1"]

    def start(name: str) -> subprocess.Popen:  # stderr to a file: a pipe that nobody reads can fill and block
        with open(tmp_path / f"{name}.log", "w") as log:
            return subprocess.Popen(chunked(name), stdout=subprocess.DEVNULL, stderr=log, env=ENV)

    collected = tmp_path / "killed" / "iteration_000" / "collected"
    for _ in range(3):  # (a kill that comes after the last chunk is stored shows nothing: try again)
        proc = start("killed")
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not (collected / "chunk_0000.json").exists():
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed: " + (tmp_path / "killed.log").read_text()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stored = {p.name: p.stat() for p in collected.glob("chunk_*.json")}
        if len(stored) < 4:
            break
        shutil.rmtree(tmp_path / "killed")
    assert 1 <= len(stored) < 4 and not (tmp_path / "killed" / "iteration_000" / "tuples").exists(), sorted(stored)

    resumed = subprocess.run(chunked("killed") + ["--resume"], capture_output=True, text=True, timeout=900, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{collected}: {len(stored)} of 4 chunks of collection read back from disk" in resumed.stdout
    for name, before in stored.items():  # read back, not collected and written again
        now = (collected / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    assert sorted(p.name for p in collected.glob("chunk_*.json")) == [f"chunk_{k:04d}.json" for k in range(4)]
    import datasets

    tuples = datasets.load_from_disk(str(tmp_path / "killed" / "iteration_000" / "tuples"))
    chunks = [json.loads((collected / f"chunk_{k:04d}.json").read_text()) for k in range(4)]
    assert len({c["prompt_indices"][0] for c in chunks}) == 4  # 4 prompts, one per chunk, seeded by their position:
    assert [c["seed"] - chunks[0]["seed"] for c in chunks] == [0, 1, 2, 3]
    rows = [r for c in chunks for r in c["rows"]]
    assert len(rows) == 4 and tuples["item_id"] == [r["item_id"] for r in rows]
    assert tuples["response"] == [r["response"] for r in rows] and tuples["reward"] == [r["reward"] for r in rows]


def test_stored_chunks_are_read_back_checked_and_only_missing_ones_collected(tmp_path):
    from collections import Counter

    from refuel_agents.chunks import collect_in_chunks
    from refuel_agents.collection import CollectionStats

    calls = []

    def collect(prompts, seed):  # the collector's contract: (prompt indices, seed) -> (rows, stats)
        calls.append((prompts, seed))
        rows = [{"item_id": f"item-{i}", "reward": i / 3, "response_token_ids": (i, seed)} for i in prompts]
        return rows, CollectionStats(prompts=len(prompts), tuples=len(rows), prompts_by_h=Counter({1: len(prompts)}))

    rows, stats = collect_in_chunks(collect, tmp_path, [7, 3, 9, 4, 1], 100, 2)
    assert calls == [([7, 3], 100), ([9, 4], 102), ([1], 104)]  # a chunk's seed: the seed plus its start
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk_0000.json", "chunk_0001.json", "chunk_0002.json"]
    assert [r["item_id"] for r in rows] == [f"item-{i}" for i in (7, 3, 9, 4, 1)] and rows[0]["reward"] == 7 / 3
    assert rows[2]["response_token_ids"] == [9, 102]  # as it reads back from the file
    assert stats.prompts == stats.tuples == 5 and stats.prompts_by_h == Counter({1: 5})

    calls.clear()
    (tmp_path / "chunk_0001.json").unlink()
    assert collect_in_chunks(collect, tmp_path, [7, 3, 9, 4, 1], 100, 2) == (rows, stats)
    assert calls == [([9, 4], 102)]  # only the missing chunk
    with pytest.raises(ValueError, match="chunk_0000.json holds the tuples of prompts .7, 3. collected with seed 100"):
        collect_in_chunks(collect, tmp_path, [7, 3, 9, 4, 1], 5, 2)  # another seed
    with pytest.raises(ValueError, match="holds the tuples of prompts"):
        collect_in_chunks(collect, tmp_path, [7, 3, 9, 4, 1], 100, 3)  # another chunk size
    path = tmp_path / "chunk_0002.json"
    path.write_text(path.read_text()[:-20])  # cut
    with pytest.raises(ValueError, match=f"{path}: a stored chunk of collection that cannot be read .*delete {path}"):
        collect_in_chunks(collect, tmp_path, [7, 3, 9, 4, 1], 100, 2)
    assert collect_in_chunks(collect, tmp_path / "whole", [7, 3, 9], 100, 0)[1].prompts == 3  # 0: one chunk
    assert calls[-1] == ([7, 3, 9], 100) and len(list((tmp_path / "whole").iterdir())) == 1
    assert collect_in_chunks(collect, None, [7, 3, 9, 4, 1], 100, 2) == (rows, stats)  # None: nothing stored


def test_resume_of_a_missing_run_and_a_plain_rerun_fail_clearly(word_lm_dir, tmp_path, reference_run):
    result = subprocess.run([sys.executable, SCRIPT, *flags(word_lm_dir, tmp_path, "nothing"), "--resume"],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode != 0 and "does not exist, so there is no run to continue" in result.stderr
    straight, _ = reference_run
    result = subprocess.run([sys.executable, SCRIPT, *flags(word_lm_dir, straight.parent, "straight")],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode != 0 and "--resume" in result.stderr


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0
    from refuel_agents.cli import field_docs
    from refuel_agents.refuel import RefuelConfig

    docs = field_docs(RefuelConfig)
    for name in RefuelConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in result.stdout
        assert name in docs, f"{name} has no help text"
    bad = subprocess.run([sys.executable, SCRIPT, "--batch-size", "3", "--micro-batch-size", "2"],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert bad.returncode != 0 and "multiple of micro_batch_size" in bad.stderr
