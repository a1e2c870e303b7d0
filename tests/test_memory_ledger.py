"""The memory ledger's arithmetic against hand-worked figures and against real transformers models built on
the meta device (no memory, no weights): parameter counts, ZeRO-3 partitions, AdamW state, the optimizer
step's sub-group, the vLLM replica's budget."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from refuel_agents import memory_ledger as ledger
from refuel_agents.memory_ledger import ModelShape, plan_for, shipped_config
from refuel_agents.refuel_config import RefuelConfig

ZERO3 = str(ledger.MODEL_CONFIGS.parent / "deepspeed_zero3.json")
# A tiny Llama: head_dim 16; per layer q 4096, k 2048, v 2048, o 4096, gate/up/down 8192 each, 2 norms of 64
# = 36,992; tied embedding 300 x 64 = 19,200; final norm 64. In all 19,200 + 2 x 36,992 + 64 = 93,248.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, tie_word_embeddings=True)


def meta_numel(config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, published", [
    ("meta-llama/Meta-Llama-3-8B-Instruct", 8.03e9),    # model card: 8.03 B
    ("meta-llama/Llama-3.1-70B-Instruct", 70.55e9),     # model card: 70.6 B
    ("embedded", 134.5e6),                              # SmolLM2-135M
])
def test_shipped_shapes_count_what_transformers_builds(name, published):
    shape = ModelShape.from_config(shipped_config(name))
    config = AutoConfig.from_pretrained(shipped_config(name))
    assert shape.parameters == meta_numel(config)
    assert shape.parameters == pytest.approx(published, rel=2e-3)


def test_shape_of_the_embedded_checkpoint_matches_the_shipped_one():
    from refuel_env import embedded

    local = ModelShape.from_config(embedded.smollm2_path())
    shipped = ModelShape.from_config(shipped_config("embedded"))
    assert replace(local, name="x", dtype="x") == replace(shipped, name="x", dtype="x")


def test_tiny_llama_by_hand_and_qwen2_biases():
    shape = ModelShape.from_config(LlamaConfig(**TINY))
    assert shape.layer_numels() == [4096, 2048, 2048, 4096, 8192, 8192, 8192, 64, 64]
    assert shape.parameters == 93_248 == meta_numel(LlamaConfig(**TINY))
    assert shape.kv_bytes_per_token(4) == 2 * 2 * 2 * 16 * 4  # K and V x layers x KV heads x head_dim x fp32
    qwen = Qwen2Config(**TINY)
    assert ModelShape.from_config(qwen).parameters == meta_numel(qwen) == 93_248 + 2 * (64 + 32 + 32)
    untied = LlamaConfig(**{**TINY, "tie_word_embeddings": False})
    assert ModelShape.from_config(untied.to_dict()).parameters == 93_248 + 19_200 == meta_numel(untied)


def test_armorm_shape_has_no_lm_head():
    rm = ModelShape.from_config(shipped_config("armorm"))
    backbone = ModelShape.from_config(shipped_config("meta-llama/Meta-Llama-3-8B-Instruct")).parameters - 128_256 * 4096
    # regression 4096 x 19; gating 4096 -> 1024 -> 1024 -> 1024 (with biases) -> 19 (with bias)
    heads = 4096 * 19 + (4096 * 1024 + 1024) + 2 * (1024 * 1024 + 1024) + 1024 * 19 + 19
    assert rm.parameters == backbone + heads


def test_last_k_layers_trains_the_last_layers_norm_and_untied_head():
    shape = ModelShape.from_config(shipped_config("meta-llama/Meta-Llama-3-8B-Instruct"))
    assert sum(shape.trainable_numels(4)) == 4 * 218_112_000 + 4096 + 128_256 * 4096
    tied = ModelShape.from_config(LlamaConfig(**TINY))
    assert sum(tied.trainable_numels(1)) == 36_992 + 64  # the tied embedding stays frozen
    with pytest.raises(ValueError, match="last_k_layers"):
        tied.trainable_numels(3)


def test_tiny_zero3_fp32_cpu_plan_by_hand():
    """Two ranks: every parameter has an even count, so a rank holds half of each: 46,624 elements."""
    config = replace(RefuelConfig(), deepspeed=ZERO3, policy_backend="transformers")
    plan = plan_for(config, world=2, policy=ModelShape.from_config(LlamaConfig(**TINY)), reward=None,
                    gpu_memory_gb=1, device="cpu", dialogue_tokens=64, kl_coef=0.0)
    items = plan.phases["training"]
    # partition 46,624 + the five 64-element norms kept whole (under the 10 x hidden threshold), fp32
    assert items["policy"] == (46_624 + 5 * 64) * 4
    assert items["gradients"] == 46_624 * 4 + 64 * 64 * 4  # fp32 gradient partition + reduce bucket (hidden^2)
    assert items["optimizer"] == 46_624 * 8  # AdamW m and v; fp32 weights are their own master copy
    assert items["reference"] == 46_624 * 4
    assert "gathered" not in items and "replica" not in items and "reward" not in items
    # collection with the transformers backend under ZeRO-3 on 2 ranks runs inside the full-weight gather
    assert plan.phases["collection"]["gathered"] == 93_248 * 4
    assert plan.phases["scoring"]["gathered"] == 93_248 * 4
    assert plan.phases["evaluation"] == plan.phases["collection"]


def test_paper_setting_one_bf16_zero3_by_hand():
    policy = ModelShape.from_config(shipped_config("meta-llama/Meta-Llama-3-8B-Instruct"))
    reward = ModelShape.from_config(shipped_config("armorm"))
    config = paper_config()
    plan = plan_for(config, world=4, policy=policy, reward=reward, gpu_memory_gb=80)
    share = 8_030_261_248 // 4  # every Llama-3-8B matrix and norm divides by 4
    training = plan.phases["training"]
    assert training["policy"] == (share + 65 * 4096) * 2  # bf16 partition + 65 norms whole
    assert training["gradients"] == share * 2 + 4096 * 4096 * 2  # bf16 gradient partition + reduce bucket
    assert training["optimizer"] == share * 12  # fp32 master + m + v
    assert training["reference"] == share * 2
    assert training["reward"] == reward.parameters * 2
    # The optimizer step: sub-groups close at 1e9 elements; the first closes inside layer 16 at 1,003,780,096,
    # so the second, the rest, is the largest: 2,007,565,312 - 1,003,780,096. fp32 gradient + AdamW's sqrt.
    assert training["activations"] == (share - 1_003_780_096) * 8
    scoring = plan.phases["scoring"]
    assert scoring["gathered"] == 8_030_261_248 * 2 and "replica" not in scoring
    collection = plan.phases["collection"]
    assert collection["replica"] == int(plan.vllm_gpu_memory_utilization * 80e9)
    assert "gathered" in collection and collection["gathered"] == 2**30  # one push group, not the whole model
    assert plan.vllm_gpu_memory_utilization == 0.28
    assert plan.fits() and all(plan.peak(p) <= 80e9 for p in ledger.PHASES)
    assert plan.peak("training") == sum(training.values()) + 3 * 10**9


def paper_config(**changes) -> RefuelConfig:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import train_agent

    return replace(RefuelConfig(), **{**train_agent.PRESETS["paper-setting-one"], "deepspeed": ZERO3,
                                      "policy_backend": "vllm", "policy_vllm_sleep": True, **changes})


def test_paper_setting_one_does_not_fit_40_gb_and_says_where():
    policy = ModelShape.from_config(shipped_config("meta-llama/Meta-Llama-3-8B-Instruct"))
    reward = ModelShape.from_config(shipped_config("armorm"))
    plan = plan_for(paper_config(), world=4, policy=policy, reward=reward, gpu_memory_gb=40)
    assert not plan.fits()
    assert set(plan.failing()) == {"collection", "scoring", "training", "evaluation"}
    assert "KV cache" in plan.problems["collection"]


def test_a_given_utilization_is_checked_not_replaced():
    policy = ModelShape.from_config(shipped_config("meta-llama/Meta-Llama-3-8B-Instruct"))
    reward = ModelShape.from_config(shipped_config("armorm"))
    vllm_default = paper_config(policy_vllm_kwargs={"gpu_memory_utilization": 0.9})
    plan = plan_for(vllm_default, world=4, policy=policy, reward=reward, gpu_memory_gb=80)
    assert plan.vllm_gpu_memory_utilization == 0.9
    assert plan.failing() == ["collection", "evaluation"]
    assert plan.peak("collection") == pytest.approx(
        sum(plan.phases["training"][k] for k in ("policy", "gradients", "optimizer", "reference", "reward"))
        + 0.9 * 80e9 + 2**30 + plan.phases["collection"]["activations"] + 3e9, abs=1)


def test_offloading_the_optimizer_frees_the_gpu_for_the_replica():
    import json

    zero = json.loads(open(ZERO3).read())
    zero["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    policy = ModelShape.from_config(shipped_config("meta-llama/Meta-Llama-3-8B-Instruct"))
    plan = plan_for(paper_config(deepspeed=zero), world=4, policy=policy, reward=None, gpu_memory_gb=80)
    assert "optimizer" not in plan.phases["training"] and "gradients" not in plan.phases["training"]
    assert plan.vllm_gpu_memory_utilization > 0.6


def test_one_gpu_plain_run_holds_whole_fp32_copies():
    policy = ModelShape.from_config(LlamaConfig(**TINY))
    config = replace(RefuelConfig(), gradient_checkpointing=True)
    plan = plan_for(config, world=1, policy=policy, reward=None, gpu_memory_gb=1, device="cuda",
                    dialogue_tokens=64, kl_coef=0.0)
    items = plan.phases["training"]
    assert items["policy"] == items["reference"] == items["gradients"] == 93_248 * 4
    assert items["optimizer"] == 93_248 * 8
    assert "gathered" not in plan.phases["collection"]


def test_sub_group_rule_matches_deepspeed():
    assert ledger._largest_sub_group([4, 4, 4, 4, 4], 8) == 8
    assert ledger._largest_sub_group([3, 6, 1, 1], 8) == 9  # the parameter that crosses the size closes the group
    assert ledger._largest_sub_group([1, 1], 10**9) == 2


def test_shapes_from_a_path_and_bad_configs(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(shipped_config("embedded").read_text())
    assert ModelShape.from_config(folder).name == "model"
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelShape.from_config(tmp_path / "nothing")
    with pytest.raises(ValueError, match="lacks"):
        ModelShape.from_config({"hidden_size": 8})
    with pytest.raises(KeyError, match="shipped"):
        shipped_config("gpt2")
    assert math.isclose(ledger.GB, 1e9)
