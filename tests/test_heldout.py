"""The held-out evaluation: bootstrap intervals, pairing, summary.json, greedy and sparse evaluations, the sweep's
choice, and the reversed-reward control."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from word_count_reward import WordCountReward

from refuel_agents import heldout
from refuel_agents.evaluation.stats import bootstrap_interval


def test_bootstrap_interval_covers_the_mean_at_its_nominal_rate():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        sample = rng.normal(0.5, 1.0, size=24)
        ci = bootstrap_interval(sample, seed=trial, resamples=2000)
        assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"] and ci["n"] == 24
        covered += ci["ci_low"] <= 0.5 <= ci["ci_high"]
    assert 0.88 <= covered / 200 <= 0.99  # a percentile bootstrap of n = 24 is a little narrow, not wildly off


def test_bootstrap_interval_is_reproducible_and_refuses_bad_values():
    assert bootstrap_interval([1.0, 2.0, 4.0], seed=3) == bootstrap_interval([1.0, 2.0, 4.0], seed=3)
    one = bootstrap_interval([2.0])
    assert one["mean"] == 2.0 and math.isnan(one["ci_low"]) and one["n"] == 1
    with pytest.raises(ValueError, match="finite"):
        bootstrap_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval([1.0, 2.0], level=95)


def entry(iteration, rewards):
    rows = [{"item_id": f"q{i % 4}", "H": 1 + i // 4, "reward": r} for i, r in enumerate(rewards)]
    return heldout.record(iteration, rows, max_turns=2)


def test_paired_change_pairs_dialogue_by_dialogue_and_drops_truncated_pairs():
    before = entry(0, [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, None, 4.0])
    after = entry(1, [2.0, 3.0, 4.0, 5.0, 2.0, 3.0, 9.0, None])
    change = heldout.paired_change(before, after)
    assert change["mean"] == pytest.approx(1.0) and change["n"] == 6 and change["dropped"] == 2
    assert change["ci_low"] == pytest.approx(1.0) and change["ci_high"] == pytest.approx(1.0)  # every pair moved by 1
    shuffled = entry(1, [2.0] * 8)
    shuffled["eval_rewards"].reverse()
    with pytest.raises(ValueError, match="same prompts"):
        heldout.paired_change(before, shuffled)


def test_summary_files_hold_the_improvement_every_evaluation_and_a_plot(tmp_path):
    summary = [entry(0, [1.0] * 8), entry(1, [1.5] * 7 + [0.5]), entry(2, [2.0, 2.5] * 4)]
    results = heldout.write_summary(tmp_path, summary, max_turns=2, seed=1)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    improvement = on_disk["heldout_improvement"]
    assert {"mean", "ci_low", "ci_high", "n"} <= improvement.keys()
    assert improvement["mean"] == pytest.approx(1.25) and improvement["n"] == 8 and improvement["ci_low"] > 0
    assert [e["iteration"] for e in on_disk["heldout"]] == [0, 1, 2]
    assert on_disk["heldout"][0]["change"]["mean"] == 0.0
    text = (tmp_path / "summary.md").read_text()
    assert "Held-out improvement (iteration 0 -> 2, paired over 8 dialogues of 4 prompts): +1.250" in text and "(above 0)" in text
    assert (tmp_path / "heldout_reward.png").stat().st_size > 1000


def test_heldout_prompts_of_the_test_split_or_the_train_splits_tail():
    assert heldout.heldout_prompts("test", 3, 8) == [0, 1, 2]
    assert heldout.heldout_prompts("train", 3, 10) == [7, 8, 9]
    assert heldout.plan([7, 8], 2) == ([1, 1, 2, 2], [7, 8, 7, 8])
    with pytest.raises(ValueError, match="--eval-prompts 8 or fewer"):
        heldout.heldout_prompts("test", 9, 8)
    with pytest.raises(ValueError, match="left for training"):
        heldout.heldout_prompts("train", 10, 10)
    with pytest.raises(ValueError, match="eval_split"):
        heldout.heldout_prompts("valid", 1, 10)


def test_the_sweep_chooses_the_best_mean_within_the_budget(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "sweep_refuel.py"
    spec = importlib.util.spec_from_file_location("sweep_refuel", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)

    def row(lr, seed, mean, seconds, failed=False):
        return {"settings": {"lr": lr}, "seed": seed, "failed": failed, "seconds": seconds,
                "improvement": None if failed else {"mean": mean}}

    rows = [row("1e-5", 1, 0.2, 100), row("1e-5", 2, 0.4, 100), row("3e-5", 1, 0.9, 100), row("3e-5", 2, 0.1, 100),
            row("1e-4", 1, 5.0, 2000), row("1e-4", 2, 5.0, 100), row("3e-4", 1, 0, 100, failed=True)]
    assert sweep.choose(rows, budget_s=600) == {"settings": {"lr": "3e-5"}, "mean": pytest.approx(0.5), "seeds": [1, 2]}
    with pytest.raises(SystemExit):
        sweep.parse_args(["--grid", "lr=1e-5", "--base", "lr=1e-4"])
    with pytest.raises(SystemExit):
        sweep.parse_args(["--grid", "seed=1,2"])
    args = sweep.parse_args(["--grid", "lr=1e-5,3e-5", "last_k_layers=4", "--base", "iterations=2"])
    assert args.grid == [("lr", ["1e-5", "3e-5"]), ("last-k-layers", ["4"])] and args.base == [("iterations", "2")]


def _small_config(word_lm_dir, tmp_path, name, **overrides):
    from refuel_agents.refuel import RefuelConfig

    fields = dict(env_id="UltraInteractDialogue-v0", env_kwargs={"user": "instant", "max_turns": 2, "tokenizer": None},
                  policy_model=str(word_lm_dir), iterations=3, prompts_per_iteration=4, epochs=1, batch_size=2,
                  micro_batch_size=2, lr=1e-3, max_new_tokens=5, temperature=1.0, eval_prompts=2,
                  output_dir=str(tmp_path), run_name=name, progress=False, device="cpu")
    return RefuelConfig(**{**fields, **overrides})


def small_trainer(word_lm_dir, tmp_path, name, **overrides):
    from refuel_agents.refuel import RefuelTrainer

    return RefuelTrainer(_small_config(word_lm_dir, tmp_path, name, **overrides))


def assistant_turns(rows):
    return [[m["content"] for m in r["dialogue"] if m["role"] == "assistant"] for r in rows]


@pytest.mark.slow
def test_a_greedy_evaluation_does_not_depend_on_the_seed_and_a_sampled_one_does(word_lm_dir, tmp_path):
    played = {(t, seed): assistant_turns(small_trainer(word_lm_dir, tmp_path, f"t{t}s{seed}", seed=seed,
                                                       eval_temperature=t).evaluate())
              for t in (0.0, None) for seed in (1, 2)}
    assert played[0.0, 1] == played[0.0, 2]  # greedy: the seeds change nothing
    assert played[None, 1] != played[None, 2]  # the collection's temperature (1.0): they do


@pytest.mark.slow
def test_eval_every_plays_the_evaluation_on_its_iterations_and_after_the_last(word_lm_dir, tmp_path):
    trainer = small_trainer(word_lm_dir, tmp_path, "every2", eval_every=2)
    trainer.train()
    summary = json.loads((trainer.run_dir / "summary.json").read_text())
    assert [e["iteration"] for e in summary["heldout"]] == [0, 2, 3]
    assert summary["heldout_improvement"]["to_iteration"] == 3 and summary["heldout_improvement"]["n"] == 4
    with pytest.raises(ValueError, match="--eval-every 0: pass an integer >= 1"):
        small_trainer(word_lm_dir, tmp_path, "bad", eval_every=0).config.validate()


@pytest.mark.slow
def test_the_reversed_reward_control_trains_on_negated_rewards_and_evaluates_on_true_ones(word_lm_dir, tmp_path,
                                                                                          monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from control_reversed_reward import ReversedRewardTrainer

    from refuel_agents import checkpoint as ckpt
    from refuel_agents.refuel import RefuelTrainer
    from refuel_agents.tracking import reward_table

    real = small_trainer(word_lm_dir, tmp_path, "real", iterations=1)
    reversed_ = ReversedRewardTrainer(_small_config(word_lm_dir, tmp_path, "reversed", iterations=1))
    rows = real.collect(0)[0]
    true = [r["reward"] for r in rows]
    assert [r["reward"] for r in rows] == [r["reward"] for r in reversed_.collect(0)[0]]  # collected: true rewards
    assert [r["reward"] for r in real.evaluate()] == [r["reward"] for r in reversed_.evaluate()]  # evaluated: true
    seen = []
    with monkeypatch.context() as patch:  # what the loss of an update reads: the negated rewards
        patch.setattr(RefuelTrainer, "train_step", lambda self, batch: seen.append(batch) or {})
        reversed_.train_step(rows)
    assert [r["reward"] for r in seen[0]] == [-x for x in true] and [r["reward"] for r in rows] == true  # no aliasing
    assert [r["reward_prime"] for r in seen[0]] == [-r["reward_prime"] for r in rows]
    reversed_.train()
    metrics = [json.loads(line) for line in (reversed_.run_dir / "metrics.jsonl").read_text().splitlines()]
    stored = ckpt.latest_checkpoint(reversed_.run_dir)
    collected = [m["collect/reward_mean"] for m in metrics if "collect/reward_mean" in m]
    assert collected == pytest.approx([np.mean([r["reward"] for r in rows])])  # the true rewards, as collected
    summary = ckpt.load_state(stored)["summary"]
    assert {int(h): v for h, v in summary[1]["collected"].items()} == {
        h: pytest.approx(v, nan_ok=True) for h, v in reward_table(rows, "reward", 2).items()}
    script = Path(__file__).resolve().parents[1] / "scripts" / "control_reversed_reward.py"
    for agent in (["--agent", "dpo"], ["--agent=dpo"]):
        result = subprocess.run([sys.executable, str(script), *agent, "--mode", "online"], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode != 0 and "--agent refuel" in result.stderr


def test_a_cluster_bootstrap_counts_repeated_values_of_a_group_once():
    rng = np.random.default_rng(5)
    per_prompt = rng.normal(0.4, 1.0, size=8)
    repeated = np.repeat(per_prompt, 3)  # three dialogues per prompt that tell nothing new
    groups = np.repeat(np.arange(8), 3).tolist()
    clustered = bootstrap_interval(repeated, groups=groups, seed=2)
    alone = bootstrap_interval(per_prompt, seed=2)  # the interval of the 8 prompts' own values
    assert {k: clustered[k] for k in ("mean", "ci_low", "ci_high")} == pytest.approx(
        {k: alone[k] for k in ("mean", "ci_low", "ci_high")}, rel=1e-12)
    assert clustered["n"] == 24 and clustered["clusters"] == 8
    naive = bootstrap_interval(repeated, seed=2)
    assert naive["ci_high"] - naive["ci_low"] < 0.7 * (clustered["ci_high"] - clustered["ci_low"])
    one = heldout.paired_change(entry(0, [0.0] * 8), entry(1, [1.0] * 8))
    one_prompt = heldout.paired_change(*(heldout.record(i, [{"item_id": "q", "H": h, "reward": float(i)} for h in (1, 2)], 2)
                                         for i in (0, 1)))
    assert one["clusters"] == 4 and one_prompt["clusters"] == 1 and math.isnan(one_prompt["ci_low"])
    assert "no interval: it needs at least 2 prompts" in heldout.improvement_line(one_prompt)
    with pytest.raises(ValueError, match="one label per value"):
        bootstrap_interval([1.0, 2.0], groups=[0])


def test_paired_change_resamples_prompts_with_all_their_dialogues():
    # 4 prompts at H = 1, 2: the change is +1 on two prompts and -1 on the other two, at both H.
    change = heldout.paired_change(entry(0, [0.0] * 8), entry(1, [1.0, 1.0, -1.0, -1.0] * 2))
    assert change["n"] == 8 and change["clusters"] == 4
    assert change == {**bootstrap_interval([1.0, 1.0, -1.0, -1.0] * 2, groups=["q0", "q1", "q2", "q3"] * 2),
                      "dropped": 0, "level": 0.95, "from_iteration": 0, "to_iteration": 1}


@pytest.mark.slow
def test_the_heldout_evaluation_runs_with_a_kl_penalty_and_charges_it(word_lm_dir, tmp_path):
    from refuel_agents.refuel import RefuelTrainer

    config = _small_config(word_lm_dir, tmp_path, "kl", iterations=1, eval_temperature=0.0,
                           env_kwargs={"user": "instant", "max_turns": 2, "tokenizer": None, "kl_coef": 0.05})
    trainer = RefuelTrainer(config, reward_model=WordCountReward())
    calls = []
    score = trainer._kl_logprobs
    trainer._kl_logprobs = lambda *a: calls.append(len(a[1])) or score(*a)
    rows = trainer.evaluate()  # raised ValueError (no set_logprobs) before the evaluation scored the KL
    assert [r["H"] for r in rows] == [1, 1, 2, 2]
    assert sum(calls) == sum(r["H"] for r in rows)  # every policy response of every dialogue
    # before any update pi_t = pi_0: the penalty is 0 and each reward is the model's score
    assert [r["reward"] for r in rows] == pytest.approx([WordCountReward().score([r["dialogue"]])[0] for r in rows], abs=1e-5)


def test_the_kl_penalty_scores_the_sampled_token_ids(word_lm_dir, tmp_path):
    from refuel_agents.logprobs import batched_logprobs, encode_response, encode_sampled_response
    from refuel_env.generation import Completion

    trainer = small_trainer(word_lm_dir, tmp_path, "klids", iterations=1)
    with torch.no_grad():  # pi_t away from pi_0, so that the log-ratio has a value to compare
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tok = trainer.train_tokenizer
    state = [{"role": "user", "content": "what is one"}]
    ids = tok("yes no maybe", add_special_tokens=False)["input_ids"]
    cut = Completion(text="yes no maybe", prompt_tokens=0, completion_tokens=3, finish_reason="length",
                     token_ids=tuple(ids))
    pol, ref = trainer._kl_logprobs([state], ["yes no maybe"], [cut])
    sampled = encode_sampled_response(tok, state, ids, "length")
    assert sampled.num_response_tokens == 3  # a cut reply: no end-of-turn token was sampled or is scored
    kw = {"batch_size": 2, "temperature": 1.0, "device": torch.device("cpu")}
    row = [{"input_ids": sampled.input_ids, "response_mask": sampled.response_mask}]
    assert pol == pytest.approx(batched_logprobs(trainer.model, row, trainer.pad_id, **kw), abs=1e-5)
    assert ref == pytest.approx(batched_logprobs(trainer.reference, row, trainer.pad_id, **kw), abs=1e-5)
    text = encode_response(tok, state, "yes no maybe")
    assert text.num_response_tokens == 4  # the text adds an end-of-turn token that was never sampled
    retokenised = [{"input_ids": text.input_ids, "response_mask": text.response_mask}]
    assert pol[0] != pytest.approx(batched_logprobs(trainer.model, retokenised, trainer.pad_id, **kw)[0], abs=1e-3)
    # a dataset reply (no completion) is still scored through the template
    assert trainer._kl_logprobs([state], ["yes no maybe"], [None])[0] == pytest.approx(
        batched_logprobs(trainer.model, retokenised, trainer.pad_id, **kw), abs=1e-5)




@pytest.mark.slow
def test_the_heldout_evaluation_plays_each_presampled_item_at_the_lengths_it_has(word_lm_dir, tmp_path):
    from refuel_agents.refuel import RefuelConfig, RefuelTrainer

    config = RefuelConfig(env_id="UltraInteractPresampled-v0", env_kwargs={"max_turns": 3, "tokenizer": None},
                          policy_model=str(word_lm_dir), iterations=1, prompts_per_iteration=2, batch_size=2,
                          micro_batch_size=2, max_new_tokens=3, eval_prompts=8, output_dir=str(tmp_path),
                          progress=False, device="cpu")
    trainer = RefuelTrainer(config, reward_model=WordCountReward())
    rows = trainer.evaluate()  # asked every item for H = 1..3 before, which a one-turn item refuses
    turns = trainer.plan.heldout_horizons()
    assert len(turns) == 8 and min(turns) == 1 and max(turns) == 2  # the test split's items have 1 or 2 turns
    assert sorted((r["item_id"], r["H"]) for r in rows) == sorted(
        (r["item_id"], H) for r, n in zip(rows, turns) for H in range(1, n + 1))
    entry = heldout.record(0, rows, 3)
    assert heldout.dialogues_by_h(entry) == {1: 8, 2: turns.count(2)}
    results = heldout.write_summary(tmp_path, [entry, heldout.record(1, rows, 3)], max_turns=3, seed=0)
    assert results["heldout"][0]["n_by_H"] == {1: 8, 2: turns.count(2)}
    assert f"Held-out dialogues per H: H=1: 8, H=2: {turns.count(2)}" in (tmp_path / "summary.md").read_text()
    assert heldout.plan([4, 5, 6], 3, [1, 3, 2]) == ([1, 1, 1, 2, 2, 3], [4, 5, 6, 5, 6, 5])


def test_heldout_prompts_of_the_train_split_share_no_parent_or_first_message_with_training():
    from refuel_agents.modes import dataset_items
    from refuel_agents.prompt_plan import PromptPlan

    env_kwargs = {"user": "instant", "tokenizer": None, "split": "train", "reward_model": WordCountReward()}
    plan = PromptPlan("UltraInteractDialogue-v0", env_kwargs, seed=0, per_iteration=0, iterations=1,
                      eval_split="train", eval_prompts=8)
    items = dataset_items("UltraInteractDialogue-v0", env_kwargs)[0]
    held, trained = plan.heldout(), plan.prompts(0)  # per_iteration=0: iteration 0 is every training prompt
    assert len(held) == 8 and not set(held) & set(trained)
    first = lambda i: items[i].questions[0]  # noqa: E731
    parent = lambda i: dict(items[i].meta).get("parent_id")  # noqa: E731
    assert not {first(i) for i in held} & {first(i) for i in trained}
    assert not {parent(i) for i in held} & {parent(i) for i in trained}
    assert len({parent(i) for i in held}) == 8  # no two held-out prompts are the same question either
    assert plan.train_items == len(trained) == len(plan.training_indices()) < len(items) - 8  # related items left out
    keys = [{("parent_id", "a")}, {("parent_id", "b")}, {("parent_id", "a")}, {("parent_id", "c")}]
    assert heldout.split_train(keys, 1) == ([3], [0, 1, 2])
    assert heldout.split_train(keys, 2) == ([2, 3], [1])  # item 0 is item 2's question: neither side keeps it
    with pytest.raises(ValueError, match="--eval-prompts 2 or fewer"):
        heldout.split_train(keys, 3)
