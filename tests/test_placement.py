"""Placement (refuel_agents/residency.py): each rank puts every model it holds on its own GPU.

Two gloo ranks under torchrun pretend to have two CUDA devices (tests/placement_worker.py patches
``torch.cuda`` and records every ``nn.Module.to``): rank r puts every model on ``cuda:r``, the
paper preset's reward model included, and under ZeRO-3 the policy and pi_0 are built as shards. The
decisions themselves, and their errors, are checked in this process.
"""

from __future__ import annotations

import pytest
import torch
from torchrun_worker import run_ranks

from refuel_agents import residency
from refuel_env.components import make_config

WORLD = 2


@pytest.fixture(scope="module")
def reports(word_lm_dir, tmp_path_factory) -> list[dict]:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("placement")
    return run_ranks("placement_worker.py", ["--policy", str(word_lm_dir), "--out", str(out)], out, world=WORLD)


@pytest.mark.slow
def test_each_rank_puts_every_model_on_its_own_gpu(reports):
    for r, report in enumerate(reports):
        events = report["events"]
        assert events[0] == ["set_device", r]  # the rank's GPU is current before anything is loaded
        assert {e[1] for e in events if e[0] == "set_device"} == {r}
        moves = [e for e in events if e[0] == "to"]
        assert moves and {e[3] for e in moves} == {f"cuda:{r}"}, moves
        moved = {e[1] for e in moves}
        ids = report["zero2"]["ids"]  # the policy, the transformers user and the reward model, really moved
        assert {ids["policy"], ids["user"], ids["reward"]} <= moved
        for trainer in ("zero2", "zero3"):
            placed = report[trainer]["placement"]
            assert {placed[k] for k in ("policy", "reference", "reward", "user")} == {f"cuda:{r}"}, placed


@pytest.mark.slow
def test_paper_setting_one_puts_its_reward_model_and_replica_on_the_rank_gpu(reports):
    for r, report in enumerate(reports):
        paper = report["paper"]
        assert paper["reward_model"] == "armorm" and paper["reward_device"] == f"cuda:{r}"
        placed = paper["placement"]
        assert placed["user"] is None  # the 70 B user is served, not loaded by the ranks
        assert {placed[k] for k in ("policy", "reference", "reward", "replica")} == {f"cuda:{r}"}, placed


@pytest.mark.slow
def test_zero3_builds_the_policy_and_pi0_as_shards(reports):
    for report in reports:
        z3 = report["zero3"]
        for name in ("policy", "reference"):
            part = z3[name]
            assert part["sharded"] and part["data_numel"] == 0, part  # no full copy held outside a gather
            assert part["local_numel"] * WORLD == part["full_numel"], part
        assert not z3["same_module"] and z3["reference_engine"]  # pi_0: its own parameter-only ZeRO-3 engine


@pytest.fixture
def two_gpus(monkeypatch):
    """Two simulated CUDA devices; returns the list of set_device calls."""
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_a_gpu_index_beyond_the_gpus_of_the_node_is_a_clear_error(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match=r"GPU index 2 \(LOCAL_RANK\) with 3 process\(es\) on this node, but this "
                                         r"process sees 2 CUDA device\(s\) \(CUDA_VISIBLE_DEVICES=0,1\).*at most 2"):
        residency.placement(None)
    monkeypatch.setenv("LOCAL_RANK", "0")  # rank 0 of too many fails too, so no rank starts loading
    with pytest.raises(ValueError, match="at most 2 process"):
        residency.placement("cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="GPU index 5 with 1 process"):
        residency.placement("cuda:5")
    assert two_gpus == []  # nothing was made current


def test_the_trainer_refuses_a_rank_without_a_gpu_before_loading_anything(two_gpus, monkeypatch, tmp_path):
    from refuel_agents.refuel import RefuelConfig, RefuelTrainer

    monkeypatch.setenv("LOCAL_RANK", "3")
    config = RefuelConfig(policy_model=str(tmp_path / "no-such-model"), output_dir=str(tmp_path),
                          env_kwargs={"user": "instant", "max_turns": 2, "tokenizer": None})
    with pytest.raises(ValueError, match=r"GPU index 3 \(LOCAL_RANK\)"):  # not the missing model: nothing loaded
        RefuelTrainer(config)


def test_one_gpu_named_for_several_processes_and_cuda_without_a_gpu_are_refused(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="would put all 2 processes of this node on one GPU.*--device cuda"):
        residency.placement("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device; pass --device cpu"):
        residency.placement("cuda")


def test_the_decided_devices_follow_local_rank(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    paper = residency.placement(None, make_config("paper-setting-one"), vllm=True)
    assert two_gpus == [1]
    assert (paper.policy, paper.reference, paper.reward, paper.replica) == (torch.device("cuda", 1),) * 4
    assert paper.user is None and paper.env_kwargs() == {"reward_device": "cuda:1"}
    local = residency.placement("cuda", make_config(None, user_model="embedded", reward_device="cuda"))
    assert local.env_kwargs() == {"reward_device": "cuda:1", "user_device": "cuda:1"}  # 'cuda': the rank's GPU
    kept = residency.placement(None, make_config(None, reward_device="cpu"))
    assert kept.reward == torch.device("cpu")  # an explicit device of the environment is kept


def test_on_a_cpu_nothing_changes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    place = residency.placement(None, make_config(None))
    assert place.policy == place.reward == place.user == torch.device("cpu") and place.env_kwargs() == {}
