"""refuel_env.integrations.trl: whole dialogues as GRPO completions, through TRL's own GRPOTrainer.

The policies are tiny transformers Llamas built from a config: the synthetic task's single-token
policy (word-level tokenizer, so a response's sampled tokens are the tokenizer's own encoding of
its text) and a random Llama with SmolLM2's tokenizer and chat template.
"""

from __future__ import annotations

import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import refuel_env  # noqa: F401  (registers the ids)
from refuel_env.integrations.trl import DialogueRollout, env_reward
from refuel_env.synthetic import build_synthetic_policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def synthetic_policy(tmp_path_factory):
    path = build_synthetic_policy(tmp_path_factory.mktemp("synthetic-policy"), seed=0)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), path


def _ids(tokenizer, messages, generation_prompt):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _first_items_by_word(split="train"):
    """One item index per distinct first user message, so every prompt names one item."""
    env = gym.make("SyntheticDialogue-v0", max_turns=3, split=split)
    first = {}
    for i, item in enumerate(env.unwrapped.core.items):
        first.setdefault(item.questions[0], i)
    return sorted(first.values())


def _sampling(**kwargs):
    return GenerationConfig(do_sample=True, max_new_tokens=2, eos_token_id=0, pad_token_id=0, **kwargs)


def test_refuel_env_imports_without_trl_and_without_the_agents():
    code = (
        "import sys; sys.modules['trl'] = None\n"
        "import refuel_env, refuel_env.integrations.trl as bridge\n"
        "assert 'trl' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None], 'trl imported'\n"
        "assert not [m for m in sys.modules if m.startswith('refuel_agents')], 'refuel_agents imported'\n"
        "print(bridge.DialogueRollout.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "DialogueRollout"


def test_user_tokens_are_masked_and_the_ids_are_the_templates_for_the_whole_dialogue(synthetic_policy):
    model, tokenizer, _ = synthetic_policy
    rollout = DialogueRollout("SyntheticDialogue-v0", env_kwargs={"max_turns": 3}, horizon=3, seed=4)
    prompts = list(rollout.dataset(_first_items_by_word())["prompt"]) * 3
    torch.manual_seed(0)
    out = rollout.play(prompts, model, tokenizer, generation_config=_sampling())
    assert out["env_horizon"] == [3] * len(prompts) and out["logprobs"] is None
    responses = set()
    for prompt_ids, completion, mask, dialogue in zip(out["prompt_ids"], out["completion_ids"], out["env_mask"],
                                                      out["dialogue"]):
        assert len(dialogue) == 6 and [m["role"] for m in dialogue] == ["user", "assistant"] * 3
        responses.update(m["content"] for m in dialogue[1::2])
        # The whole dialogue's ids, as the template gives them, up to the last response's end of turn.
        whole = _ids(tokenizer, dialogue, False)
        whole = whole[: max(k for k, t in enumerate(whole) if t == tokenizer.eos_token_id) + 1]
        assert prompt_ids + completion == whole
        assert prompt_ids == _ids(tokenizer, dialogue[:1], True)
        # Expected mask, from the template: 1 exactly on each response's tokens and its end-of-turn token.
        expected = [0] * len(whole)
        for j in range(1, 6, 2):
            start = len(_ids(tokenizer, dialogue[:j], True))
            closed = _ids(tokenizer, dialogue[: j + 1], False)
            end = max(k for k, t in enumerate(closed) if t == tokenizer.eos_token_id) + 1
            expected[start:end] = [1] * (end - start)
        assert mask == expected[len(prompt_ids):]
        # The masked stretches are the user's turns: their words are there, and no response token is.
        masked_text = tokenizer.decode([t for t, m in zip(completion, mask) if m == 0])
        assert masked_text.split().count("user") == 2
        for user_turn in dialogue[2::2]:
            assert user_turn["content"] in masked_text
    assert len(responses) > 1, "sampling should give more than one response; the check would be weaker"


def test_a_dialogue_through_the_bridge_is_the_same_dialogue_played_directly(synthetic_policy):
    model, tokenizer, _ = synthetic_policy
    indices = _first_items_by_word()
    rollout = DialogueRollout("SyntheticDialogue-v0", env_kwargs={"max_turns": 3}, horizon=3, seed=7,
                              max_new_tokens=2)
    prompts = list(rollout.dataset(indices)["prompt"])
    out = rollout.play(prompts, model, tokenizer)  # the model's own generation config: greedy
    assert len(set(out["env_seed"])) == len(prompts)
    rewards = []
    for i, index in enumerate(indices):
        env = gym.make("SyntheticDialogue-v0", max_turns=3)
        obs, info = env.reset(seed=out["env_seed"][i], options={"index": index, "horizon": 3})
        done = False
        while not done:
            ids = _ids(tokenizer, obs, True)
            generated = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=2, do_sample=False)[0, len(ids):].tolist()
            generated = generated[: generated.index(0) + 1] if 0 in generated else generated
            obs, reward, terminated, truncated, info = env.step(tokenizer.decode(generated, skip_special_tokens=True))
            done = terminated or truncated
        assert terminated and not truncated
        assert obs == out["dialogue"][i]
        assert reward == out["trajectory_reward"][i]
        assert ids + generated == out["prompt_ids"][i] + out["completion_ids"][i]
        rewards.append(reward)
    assert env_reward(completions=[None] * len(rewards), trajectory_reward=out["trajectory_reward"]) == rewards


def test_dialogues_branch_from_a_snapshot_with_independent_users(synthetic_policy):
    model, tokenizer, _ = synthetic_policy
    env = gym.make("SyntheticDialogue-v0", max_turns=3)
    env.reset(seed=3, options={"index": 0, "horizon": 3})
    _, _, _, _, info = env.step("ask")
    snap = info["snapshot"]
    rollout = DialogueRollout("SyntheticDialogue-v0", env_kwargs={"max_turns": 3}, horizon=3, seed=11)
    (prompt,) = list(rollout.dataset(snapshots=[snap])["prompt"])
    assert prompt == snap.messages
    torch.manual_seed(1)
    out = rollout.play([prompt] * 8, model, tokenizer, generation_config=_sampling())
    assert out["prompt_ids"][0] == _ids(tokenizer, snap.messages, True)
    assert out["env_horizon"] == [3] * 8
    second_users = set()
    for i, dialogue in enumerate(out["dialogue"]):
        assert dialogue[: len(snap.messages)] == snap.messages and len(dialogue) == len(snap.messages) + 3
        second_users.add((dialogue[3]["content"], dialogue[4]["content"]))
        # Replayed directly: the same seed restores the same branch.
        replay = gym.make("SyntheticDialogue-v0", max_turns=3)
        obs, _ = replay.reset(seed=out["env_seed"][i], options={"snapshot": snap})
        for response in (dialogue[3]["content"], dialogue[5]["content"]):
            obs, reward, terminated, _, _ = replay.step(response)
        assert obs == dialogue and terminated and reward == out["trajectory_reward"][i]
    assert len(second_users) > 1, "eight branches from one snapshot should not all be the same dialogue"


@pytest.mark.slow
def test_on_the_dataset_id_the_user_turns_are_template_text_and_replay_exactly(tiny_lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    rollout = DialogueRollout("UltraInteractPresampled-v0", horizon=2, seed=5, max_new_tokens=6)
    items = gym.make("UltraInteractPresampled-v0").unwrapped.core.items
    two_turns = [i for i, item in enumerate(items) if item.num_turns >= 2]
    assert 0 < len(two_turns) < len(items)
    assert len(rollout.dataset()) == len(two_turns)  # by default, the items a 2-turn dialogue fits
    with pytest.raises(ValueError, match="horizon"):
        rollout.dataset([next(i for i, item in enumerate(items) if item.num_turns == 1)])
    indices = two_turns[:2]
    prompts = list(rollout.dataset(indices)["prompt"])
    torch.manual_seed(0)
    out = rollout.play(prompts, model, tokenizer, generation_config=GenerationConfig(
        do_sample=True, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    for i, index in enumerate(indices):
        dialogue, completion, mask = out["dialogue"][i], out["completion_ids"][i], out["env_mask"][i]
        assert out["prompt_ids"][i] == tokenizer.apply_chat_template(prompts[i], add_generation_prompt=True,
                                                                     tokenize=True, return_dict=False)
        # completion = y_1 | masked ChatML user turn | y_2
        first = mask.index(0)
        after = first + mask[first:].index(1)
        assert mask == [1] * first + [0] * (after - first) + [1] * (len(mask) - after)
        ended = completion[first - 1] == tokenizer.eos_token_id
        assert tokenizer.decode(completion[first:after]) == (
            ("" if ended else "<|im_end|>") + f"\n<|im_start|>user\n{dialogue[2]['content']}<|im_end|>\n"
            "<|im_start|>assistant\n")
        assert tokenizer.decode(completion[:first], skip_special_tokens=True) == dialogue[1]["content"]
        # The same seed, the same responses, played directly: the same user turn and reward.
        env = gym.make("UltraInteractPresampled-v0")
        obs, _ = env.reset(seed=out["env_seed"][i], options={"index": index, "horizon": 2})
        obs, _, _, _, _ = env.step(dialogue[1]["content"])
        assert obs == dialogue[:3]
        obs, reward, terminated, _, _ = env.step(dialogue[3]["content"])
        assert terminated and obs == dialogue and reward == out["trajectory_reward"][i]
        assert np.isfinite(reward)


@pytest.mark.slow
def test_one_grpo_step_through_trl_changes_the_weights(synthetic_policy, tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl import GRPOConfig, GRPOTrainer

    _, tokenizer, path = synthetic_policy
    model = AutoModelForCausalLM.from_pretrained(path)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    rollout = DialogueRollout("SyntheticDialogue-v0", env_kwargs={"max_turns": 3}, horizon=3, seed=0)
    seen = []

    def recording_rollout(prompts, trainer):
        seen.append(rollout(prompts, trainer))
        return seen[-1]

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=8, max_steps=1,
                      max_completion_length=2, learning_rate=1e-2, temperature=1.0, bf16=False, use_cpu=True,
                      report_to="none", logging_steps=1, save_strategy="no", seed=0)
    torch.manual_seed(0)
    trainer = GRPOTrainer(model=model, reward_funcs=env_reward, args=args, processing_class=tokenizer,
                          train_dataset=rollout.dataset(_first_items_by_word()), rollout_func=recording_rollout)
    trainer.train()

    (out,) = seen
    assert len(out["completion_ids"]) == 8 and all(len(d) == 6 for d in out["dialogue"])
    log = trainer.state.log_history[0]
    # TRL read the mask: it counts only the policy's tokens as the completion's length ...
    assert log["completions/mean_length"] == pytest.approx(np.mean([sum(m) for m in out["env_mask"]]))
    assert log["completions/mean_length"] < np.mean([len(c) for c in out["completion_ids"]])
    # ... and scored the environment's trajectory rewards.
    assert log["rewards/env_reward/mean"] == pytest.approx(np.mean(out["trajectory_reward"]), abs=1e-6)
    assert np.std(out["trajectory_reward"]) > 0 and log["grad_norm"] > 0
    changed = [k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert changed, "one GRPO step changed no weight"


def test_clear_errors(synthetic_policy):
    model, tokenizer, _ = synthetic_policy
    with pytest.raises(ValueError, match="kl_coef"):
        DialogueRollout("SyntheticDialogue-v0", env_kwargs={"kl_coef": 0.1})
    with pytest.raises(ValueError, match="horizon"):
        DialogueRollout("SyntheticDialogue-v0", horizon=0)
    with pytest.raises(ValueError, match="horizon"):
        DialogueRollout("SyntheticDialogue-v0", env_kwargs={"max_turns": 2}, horizon=3).dataset()
    rollout = DialogueRollout("SyntheticDialogue-v0")
    with pytest.raises(TypeError, match="conversation"):
        rollout.play(["vague"], model, tokenizer)
    with pytest.raises(ValueError, match="use_vllm"):
        rollout([[{"role": "user", "content": "vague"}]], type("Trainer", (), {"use_vllm": True})())
    with pytest.raises(ValueError, match="seeds"):
        rollout.play([[{"role": "user", "content": "vague"}]], model, tokenizer, seeds=[1, 2])
