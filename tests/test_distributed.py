"""The DeepSpeed path for real: two processes under torchrun, gloo on CPU, ZeRO-3 and ZeRO-2
from the shipped configs, a REFUEL loss, a checkpoint resumed by a fresh engine.

The first run on a machine also compiles DeepSpeed's CPU shared-memory communication op (cached
in ~/.cache/torch_extensions afterwards), which takes tens of seconds on two cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    """Run tests/dist_worker.py on two ranks; return each rank's JSON report."""
    out = tmp_path_factory.mktemp("dist")
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(ROOT / "tests" / "dist_worker.py"), "--out", str(out), "--stages", "3", "2",
    ]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(f"torchrun timed out after {e.timeout} s; workers' stderr:\n{stderr[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}; workers' stderr:\n{proc.stderr[-6000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_zero3_partitions_every_parameter(reports):
    r0, r1 = (r["zero3"] for r in reports)
    assert r0["world_size"] == WORLD and r0["zero_stage"] == 3
    assert r0["shards"].keys() == r1["shards"].keys() and len(r0["shards"]) == 21
    for name, shard in r0["shards"].items():
        other = r1["shards"][name]
        assert shard["full"] == other["full"]
        # every size in the tiny Llama is even, so the two halves cover it without padding
        assert shard["local"] < shard["full"] and other["local"] < other["full"], name
        assert shard["local"] + other["local"] == shard["full"], name


def test_zero3_ranks_agree_and_parameters_moved(reports):
    r0, r1 = (r["zero3"] for r in reports)
    assert r0["init_digest"] == r1["init_digest"]  # same config and seed on both ranks
    assert r0["final_digest"] == r1["final_digest"]  # the gathered weights are identical after the steps
    assert r0["final_digest"] != r0["init_digest"]
    assert all(change > 1e-5 for change in r0["change_from_init"].values()), r0["change_from_init"]
    assert r0["optimizer_steps"] == 2


def test_zero3_step_reports_and_schedule(reports):
    r0, r1 = (r["zero3"] for r in reports)
    assert r0["stats"] == r1["stats"]  # lr, grad norm and the all-reduced loss are global
    lrs = [s["lr"] for s in r0["stats"]]
    # warmup_ratio 0, 4 steps: lr * [1, (1 + cos(pi/4)) / 2]
    assert lrs == pytest.approx([1e-3, 1e-3 * 0.8535533905932737])
    assert all(s["grad_norm"] > 1.0 for s in r0["stats"])  # above max_grad_norm: clipping was active
    assert r0["rank_mean"] == pytest.approx(0.5)


def test_zero3_checkpoint_resumes_exactly(reports):
    for report in reports:
        z3 = report["zero3"]
        assert z3["resumed_optimizer_steps_after_load"] == 1
        assert z3["resumed_stats"] == z3["stats"][1:]
        assert max(z3["resumed_vs_uninterrupted"].values()) == 0.0


def test_zero3_unwrapped_state_is_the_gathered_model(reports):
    r0, r1 = (r["zero3"] for r in reports)
    assert r1["unwrapped_vs_gathered"] is None  # only the main rank receives the full state dict
    assert set(r0["unwrapped_vs_gathered"]) == set(r0["shards"])
    assert max(r0["unwrapped_vs_gathered"].values()) == 0.0


def test_zero2_last_layer_only(reports):
    r0, r1 = (r["zero2"] for r in reports)
    assert r0["zero_stage"] == 2
    assert r0["final_digest"] == r1["final_digest"]
    trainable = set(r0["trainable"])
    assert trainable == {n for n in r0["change_from_init"] if n.startswith("model.layers.1.")} | {
        "model.norm.weight", "lm_head.weight"}
    for name, change in r0["change_from_init"].items():
        assert (change > 1e-5) if name in trainable else (change == 0.0), name
    # the optimizer state is split between the ranks
    assert r0["optimizer_partition_numel"] + r1["optimizer_partition_numel"] == r0["trainable_numel"]
    assert r0["optimizer_partition_numel"] < r0["trainable_numel"]
    assert r0["stats"] == r1["stats"] and len(r0["stats"]) == 1


def test_train_agent_on_two_ranks(word_lm_dir, tmp_path):
    """``scripts/train_agent.py`` itself under torchrun with ZeRO-2: both ranks collect, train and
    checkpoint together; only the main rank writes the logs and the final model."""
    from safetensors.torch import load_file

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env_kwargs = {"user": "instant", "max_turns": 2, "tokenizer": None}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(ROOT / "scripts" / "train_agent.py"), "--agent", "refuel",
        "--policy-model", str(word_lm_dir), "--env-kwargs", json.dumps(env_kwargs), "--iterations", "1",
        "--prompts-per-iteration", "4", "--batch-size", "2", "--micro-batch-size", "1", "--max-new-tokens", "5",
        "--eval-prompts", "1", "--lr", "1e-3", "--deepspeed", str(ROOT / "refuel_agents" / "configs" / "deepspeed_zero2.json"),
        "--output-dir", str(tmp_path), "--run-name", "two-ranks", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    run = tmp_path / "two-ranks"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [r["step"] for r in logged if "losses/loss" in r]
    assert loss_steps == [1, 2]  # one writer: no step logged twice
    assert json.loads((run / "config.json").read_text())["deepspeed"].endswith("deepspeed_zero2.json")
    assert (run / "checkpoints" / "latest").exists() and (run / "summary.md").exists()
    initial = load_file(str(next(Path(word_lm_dir).glob("*.safetensors"))))
    final = load_file(str(next((run / "final_model").glob("*.safetensors"))))
    assert set(final) == set(initial)
    assert any(not torch.equal(final[k], initial[k]) for k in initial)
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]  # no half-written folder left behind
