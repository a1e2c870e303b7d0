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


# ------------------------------------------------------------------------------ scripts/train_agent.py on two ranks

ENV_KWARGS = {"user": "instant", "max_turns": 2, "tokenizer": None}
LAUNCH_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"}


def launcher(kind: str) -> list[str]:
    """The command that starts two ranks of a script: torchrun, or accelerate launch with the shipped config."""
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "refuel_agents" / "configs" / "accelerate_multi_gpu.yaml"), "--num_processes", str(WORLD),
            "--main_process_port", str(_free_port())]


def train_flags(word_lm_dir, out, name, **overrides) -> list[str]:
    values = {"policy-model": str(word_lm_dir), "env-kwargs": json.dumps(ENV_KWARGS), "iterations": "2",
              "prompts-per-iteration": "4", "batch-size": "2", "micro-batch-size": "1", "max-new-tokens": "5",
              "eval-prompts": "1", "lr": "1e-3", "output-dir": str(out), "run-name": name,
              # RefuelConfig's defaults, which the one-rank runs here use, in place of the embedded preset's
              "epochs": "1", "eta": "1", "last-k-layers": "none", **overrides}
    return [str(ROOT / "scripts" / "train_agent.py"), "--no-progress"] + [x for k, v in values.items() for x in (f"--{k}", v)]


def launch(kind: str, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(launcher(kind) + args, env={**os.environ, **LAUNCH_ENV}, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next((run / "final_model").glob("*.safetensors"))))


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected_item_ids(word_lm_dir, tmp_path, iteration: int, **config) -> list[str]:
    """The item ids of the prompts that a one-rank run with the same seed and global batch collects from."""
    from refuel_agents.baselines import make_trainer
    from refuel_agents.modes import dataset_items

    trainer = make_trainer("refuel", None, policy_model=str(word_lm_dir), env_kwargs=ENV_KWARGS, device="cpu",
                           output_dir=str(tmp_path), run_name="expected", **config)
    items = dataset_items("UltraInteractDialogue-v0", ENV_KWARGS)[0]
    return [items[i].item_id for i in trainer.prompt_indices(iteration)]


@pytest.fixture(scope="module")
def sharded_run(word_lm_dir, tmp_path_factory) -> Path:
    """REFUEL under torchrun with ZeRO-3: 2 iterations of 4 prompts, global batch 2 (1 pair per rank)."""
    out = tmp_path_factory.mktemp("sharded")
    launch("torchrun", train_flags(word_lm_dir, out, "straight", **{
        "deepspeed": str(ROOT / "refuel_agents" / "configs" / "deepspeed_zero3.json"), "save-every": "1"}))
    return out / "straight"


def test_ranks_collect_disjoint_shards_of_the_one_rank_prompts(sharded_run, word_lm_dir, tmp_path):
    from refuel_agents.distributed import load_tuples

    run = sharded_run
    for t in (0, 1):
        tuples = run / f"iteration_{t:03d}" / "tuples"
        assert sorted(p.name for p in tuples.iterdir()) == ["rank_0-of-2", "rank_1-of-2"]
        rows = load_tuples(tuples).to_list()  # one datasets.Dataset
        by_rank = {r: [row["item_id"] for row in rows if row["rank"] == r] for r in range(WORLD)}
        assert by_rank[0] and by_rank[1] and not set(by_rank[0]) & set(by_rank[1])
        # (an instant user drops no tuple, so every prompt gave one)
        assert by_rank[0] + by_rank[1] == expected_item_ids(word_lm_dir, tmp_path / str(t), t, prompts_per_iteration=4)
        collection = json.loads((run / f"iteration_{t:03d}" / "collection.json").read_text())
        assert collection["prompts"] == 4 and [r["prompts"] for r in collection["ranks"]] == [2, 2]
    steps = [r["step"] for r in logged(run) if "losses/loss" in r]
    assert steps == [1, 2, 3, 4]  # 4 prompts / global batch 2, per iteration; one writer
    assert [r["collect/tuples"] for r in logged(run) if "collect/tuples" in r] == [4, 4]  # both ranks' tuples counted
    assert "iter 2 eval" in (run / "summary.md").read_text()
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    initial, final = final_weights_initial(word_lm_dir), final_weights(run)
    assert final.keys() == initial.keys() and any(not torch.equal(final[k], initial[k]) for k in initial)


def test_kill_9_of_every_rank_then_resume_matches_the_uninterrupted_run(sharded_run, word_lm_dir, tmp_path):
    import signal
    import time

    args = launcher("torchrun") + train_flags(word_lm_dir, tmp_path, "killed", **{
        "deepspeed": str(ROOT / "refuel_agents" / "configs" / "deepspeed_zero3.json"), "save-every": "1"})
    proc = subprocess.Popen(args, env={**os.environ, **LAUNCH_ENV}, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(r.get("step", 0) >= 3 and "losses/loss" in r for r in logged(tmp_path / "killed")):
            break  # in iteration 1, after its first update
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    run = tmp_path / "killed"
    assert not (run / "final_model").exists()

    resumed = launch("torchrun", train_flags(word_lm_dir, tmp_path, "killed", **{
        "deepspeed": str(ROOT / "refuel_agents" / "configs" / "deepspeed_zero3.json"), "save-every": "1"}) + ["--resume"])
    assert "resuming" in resumed.stdout
    assert [r["step"] for r in logged(run) if "losses/loss" in r] == [1, 2, 3, 4]
    from refuel_agents.distributed import load_tuples

    for t in (0, 1):
        a = load_tuples(run / f"iteration_{t:03d}" / "tuples")
        b = load_tuples(sharded_run / f"iteration_{t:03d}" / "tuples")
        assert a["item_id"] == b["item_id"] and a["response"] == b["response"] and a["rank"] == b["rank"]
    mine, theirs = final_weights(run), final_weights(sharded_run)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), "the resumed run diverged from the uninterrupted one"


@pytest.fixture(scope="module")
def one_rank_offline(word_lm_dir, tmp_path_factory) -> Path:
    """REBEL on the dataset's own pairs (lt-offline: no sampling, so any number of ranks collects the
    same tuples), one rank, one update on the whole global batch of 4."""
    from refuel_agents.baselines import make_trainer

    out = tmp_path_factory.mktemp("one-rank")
    make_trainer("rebel", "lt-offline", **OFFLINE, policy_model=str(word_lm_dir), env_kwargs=ENV_KWARGS, device="cpu",
                 output_dir=str(out), run_name="one", progress=False).train()
    return out / "one"


# eps = 1: AdamW's first step is lr * g / (|g| + 1), about proportional to the gradient where it is small,
# so the comparison sees the gradient itself and not only its sign (with eps = 1e-8 it would be lr * sign(g)).
OFFLINE = {"iterations": 1, "prompts_per_iteration": 4, "batch_size": 4, "micro_batch_size": 1, "eval_prompts": 0,
           "lr": 1e-3, "eps": 1.0, "max_grad_norm": 0.0, "reference_kl": False}


@pytest.mark.parametrize("kind", ["torchrun", "accelerate"])
def test_two_ranks_make_the_one_rank_update(kind, one_rank_offline, word_lm_dir, tmp_path):
    """Two ranks, each on its 2 of the 4 pairs, end one update where one rank on all 4 does."""
    from refuel_agents.distributed import load_tuples

    flags = train_flags(word_lm_dir, tmp_path, "two", **{
        "iterations": "1", "batch-size": "4", "eval-prompts": "0", "max-grad-norm": "0", "eps": "1.0",
        "deepspeed": str(ROOT / "refuel_agents" / "configs" / "deepspeed_zero3.json")})
    flags += ["--no-reference-kl", "--agent", "rebel", "--mode", "lt-offline"]
    launch(kind, flags)
    two, one = tmp_path / "two", one_rank_offline
    rows = load_tuples(two / "iteration_000" / "tuples").to_list()
    ones = load_tuples(one / "iteration_000" / "tuples").to_list()
    assert [r["rank"] for r in rows] == [0, 0, 1, 1]
    assert [r["item_id"] for r in rows] == [r["item_id"] for r in ones]  # disjoint halves of the same prompts
    step = lambda run: next(r for r in logged(run) if "losses/loss" in r)  # noqa: E731
    assert step(two)["step"] == step(one)["step"] == 1 and len([r for r in logged(two) if "losses/loss" in r]) == 1
    assert step(two)["charts/grad_norm"] == pytest.approx(step(one)["charts/grad_norm"], rel=1e-6)  # the averaged gradient
    for key in ("losses/loss", "charts/reward_mean"):  # logged over every rank's pairs, not rank 0's alone
        assert step(two)[key] == pytest.approx(step(one)[key], rel=1e-5), key
    initial, a, b = final_weights_initial(word_lm_dir), final_weights(two), final_weights(one)
    assert a.keys() == b.keys()
    moved = [k for k in a if not torch.equal(b[k], initial[k])]
    assert moved  # the update changed the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def final_weights_initial(word_lm_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next(Path(word_lm_dir).glob("*.safetensors"))))


def test_uneven_shards_one_rank_without_rows_make_the_one_rank_update(word_lm_dir, tmp_path):
    """Rank 0 keeps 3 pairs and rank 1 none: 3 updates of 2 pairs over the 3 kept (epochs 2), each rank taking
    one pair per update, end where one rank on those 3 pairs does."""
    from dist_worker import keeping_trainer

    from refuel_agents.distributed import load_tuples

    fields = {**OFFLINE, "prompts_per_iteration": 6, "batch_size": 2, "epochs": 2, "policy_model": str(word_lm_dir),
              "env_kwargs": ENV_KWARGS, "device": "cpu", "output_dir": str(tmp_path), "progress": False}
    keeping_trainer([3], **fields, run_name="one").train()
    two = {**fields, "run_name": "two", "deepspeed": str(ROOT / "refuel_agents" / "configs" / "deepspeed_zero3.json")}
    launch("torchrun", [str(ROOT / "tests" / "dist_worker.py"), "--keep", "3", "0", "--config", json.dumps(two)])
    one, two = tmp_path / "one", tmp_path / "two"
    assert (two / "iteration_000" / "tuples" / "rank_1-of-2" / "no-rows.json").is_file()
    rows, ones = (load_tuples(run / "iteration_000" / "tuples").to_list() for run in (two, one))
    assert [r["item_id"] for r in rows] == [r["item_id"] for r in ones] and [r["rank"] for r in rows] == [0, 0, 0]
    for key in ("logp_t", "logp_t_prime"):  # scored in the micro-batches where training meets them, on either rank
        assert [r[key] for r in rows] == [r[key] for r in ones]
    assert [r["step"] for r in logged(two) if "losses/loss" in r] == [1, 2, 3]  # 2 epochs x 3 pairs / 2 per update
    initial, a, b = final_weights_initial(word_lm_dir), final_weights(two), final_weights(one)
    assert any(not torch.equal(b[k], initial[k]) for k in b)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"largest weight difference from the one-rank update: {diff:.3g}")
    assert diff <= 1e-6
