"""scripts/memory_plan.py: setting one fits 8 x 80 GB and not 8 x 40 GB, it names the phase, and every flag is explained."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import memory_plan  # noqa: E402


def test_setting_one_fits_eight_80_gb_gpus(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert memory_plan.main(["--preset", "paper-setting-one", "--gpus", "8", "--gpu-memory-gb", "80",
                             "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for phase in ("collection", "scoring", "training", "evaluation"):
        assert f"### {phase}: peak" in text and "(fits)" in text
    assert "tensor parallel 4" in text and "256" in text  # 4 ranks x 64 concurrent requests
    plan = json.loads(out.read_text())
    assert plan["fits"] and plan["world"] == 4 and plan["failing"] == []
    assert plan["policy_backend"] == "vllm" and plan["policy_vllm_sleep"]
    assert 0.2 < plan["vllm_gpu_memory_utilization"] < 0.9
    assert set(plan["phases"]) == {"collection", "scoring", "training", "evaluation"}
    assert all(p["peak"] <= 80e9 for p in plan["phases"].values())
    assert "replica" not in plan["phases"]["scoring"]["items"]  # asleep


def test_setting_one_does_not_fit_40_gb_and_names_the_phase(capsys):
    assert memory_plan.main(["--preset", "paper-setting-one", "--gpus", "8", "--gpu-memory-gb", "40"]) == 1
    err = capsys.readouterr().err
    assert "error: the training phase does not fit" in err
    assert "error: the collection phase does not fit" in err
    assert "the user's server does not fit" in err  # 35 GB of 70 B weights per GPU at tensor parallel 4


def test_train_agent_flags_after_dashes_change_the_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert memory_plan.main(["--gpu-memory-gb", "80", "--json", str(out), "--",
                             "--policy-vllm-kwargs", '{"gpu_memory_utilization": 0.9}']) == 1
    assert "error: the collection phase does not fit" in capsys.readouterr().err
    assert json.loads(out.read_text())["vllm_gpu_memory_utilization"] == 0.9


def test_a_given_policy_config_replaces_the_shipped_one(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
                                  "tie_word_embeddings": True}))
    out = tmp_path / "plan.json"
    assert memory_plan.main(["--policy-config", str(config), "--gpu-memory-gb", "80", "--json", str(out)]) == 0
    policy = json.loads(out.read_text())["phases"]["training"]["items"]["policy"]
    assert policy == (93_248 // 4 + 5 * 64) * 2  # bf16 ZeRO-3 partition on 4 ranks + norms kept whole


def test_every_flag_is_explained_and_bad_values_are_refused(capsys):
    parser = memory_plan.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    with pytest.raises(SystemExit) as exit_info:
        memory_plan.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--preset", "--gpus", "--gpu-memory-gb", "--user-gpus", "--nodes", "--policy-config",
                 "--reward-config", "--user-config", "--allowance-gb", "--json"):
        assert flag in text
    with pytest.raises(SystemExit, match="--user-gpus must leave"):
        memory_plan.main(["--gpus", "4", "--user-gpus", "4"])
    with pytest.raises(SystemExit, match="--reward-config"):
        memory_plan.main(["--", "--env-kwargs", '{"reward_model": "some/unknown-rm"}'])
