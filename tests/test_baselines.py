"""REBEL and DPO trainers on the data modes: make_trainer, DPO's ordering, ties, references, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refuel_agents.baselines import (
    DpoConfig,
    DpoTrainer,
    RebelConfig,
    RebelTrainer,
    make_config,
    make_trainer,
)
from refuel_agents.losses import dpo_loss
from refuel_agents.modes import dataset_items
from refuel_agents.refuel import RefuelTrainer, batched_logprobs
from refuel_env.rewards import TrajectoryRewardModel

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "train_agent.py")
ENV_KWARGS = {"user": "instant", "max_turns": 2, "tokenizer": None}


class YesReward(TrajectoryRewardModel):
    """1.0 when the last response says "yes", else 0.0: many pairs tie."""

    name = "last-says-yes"
    max_length = None

    def __init__(self, constant: bool = False):
        self.constant = constant

    def _score(self, dialogues):
        return np.asarray([0.0 if self.constant else float("yes" in d[-1]["content"].split()) for d in dialogues])

    def count_tokens(self, dialogue):
        return sum(len(m["content"].split()) for m in dialogue)


def small(word_lm_dir, tmp_path, **overrides):
    return {"env_kwargs": ENV_KWARGS, "policy_model": str(word_lm_dir), "iterations": 1, "prompts_per_iteration": 4,
            "batch_size": 2, "micro_batch_size": 1, "max_new_tokens": 5, "temperature": 1.0, "eval_prompts": 0,
            "device": "cpu", "output_dir": str(tmp_path), "progress": False, **overrides}


def test_make_trainer_builds_each_agent(word_lm_dir, tmp_path):
    refuel = make_trainer("refuel", None, **small(word_lm_dir, tmp_path))
    assert type(refuel) is RefuelTrainer and refuel.mode == "refuel"
    assert refuel.run_dir.name.startswith("UltraInteractDialogue-v0__refuel__1__")
    rebel = make_trainer("rebel", "lt-mixed", **small(word_lm_dir, tmp_path))
    assert type(rebel) is RebelTrainer and isinstance(rebel.config, RebelConfig) and rebel.mode == "lt-mixed"
    assert rebel.run_dir.name.startswith("UltraInteractDialogue-v0__rebel-lt-mixed__1__")
    dpo = make_trainer("dpo", "mt-mixed", beta=0.5, **small(word_lm_dir, tmp_path))
    assert type(dpo) is DpoTrainer and isinstance(dpo.config, DpoConfig) and dpo.config.beta == 0.5
    assert dpo.run_dir.name.startswith("UltraInteractDialogue-v0__dpo-mt-mixed__1__")


def test_make_config_refuses_bad_agents_modes_and_fields():
    with pytest.raises(ValueError, match="unknown agent 'ppo'"):
        make_config("ppo", "lt-mixed")
    with pytest.raises(ValueError, match="mode must be one of"):
        make_config("rebel", None)
    with pytest.raises(ValueError, match="mode must be one of"):
        make_config("dpo", "refuel")
    with pytest.raises(ValueError, match="takes no mode"):
        make_config("refuel", "lt-online")
    with pytest.raises(ValueError, match=r"no field\(s\) \['beta'\]"):
        make_config("rebel", "lt-online", beta=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        make_config("dpo", "lt-online", beta=0.0)
    with pytest.raises(ValueError, match="reference_policy='initial' needs reference_kl"):
        make_config("dpo", "lt-online", reference_policy="initial", reference_kl=False)
    with pytest.raises(ValueError, match="reference_policy must be one of"):
        make_config("dpo", "lt-online", reference_policy="sft")


@pytest.mark.parametrize("reference_policy", ["iteration", "initial"])
def test_dpo_step_orders_each_pair_by_reward(word_lm_dir, tmp_path, reference_policy):
    trainer = make_trainer("dpo", "lt-mixed", reference_policy=reference_policy, beta=0.5,
                           **small(word_lm_dir, tmp_path))
    trainer.setup()
    state = [{"role": "user", "content": "what is one and two"}]
    rows = [{"state": state, "response": "one two", "response_prime": "yes no no", "reward": 0.0, "reward_prime": 1.0},
            {"state": state, "response": "three", "response_prime": "four five", "reward": 2.0, "reward_prime": -1.0}]
    rows, too_long = trainer.prepare(rows)
    assert too_long == 0
    rng = np.random.default_rng(0)
    for row in rows:  # distinct reference values, so the order of each pair matters
        for key in ("logp_t", "logp_t_prime", "logp_ref", "logp_ref_prime"):
            row[key] = float(rng.uniform(-30, -5))
    kw = {"batch_size": 4, "temperature": 1.0, "device": trainer.device}
    logp = torch.tensor(batched_logprobs(trainer.model, rows, trainer.pad_id, suffix="", **kw))
    logp_prime = torch.tensor(batched_logprobs(trainer.model, rows, trainer.pad_id, suffix="_prime", **kw))
    ref = "logp_t" if reference_policy == "iteration" else "logp_ref"
    ref_y = torch.tensor([r[ref] for r in rows])
    ref_y2 = torch.tensor([r[f"{ref}_prime"] for r in rows])
    # Pair 0: y' has the higher reward (chosen); pair 1: y does.
    expected = dpo_loss(torch.stack([logp_prime[0], logp[1]]), torch.stack([logp[0], logp_prime[1]]),
                        torch.stack([ref_y2[0], ref_y[1]]), torch.stack([ref_y[0], ref_y2[1]]), 0.5)
    unordered = dpo_loss(logp, logp_prime, ref_y, ref_y2, 0.5)
    trainer.engine.model.train()
    out = trainer.train_step(rows)
    assert out["losses/loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - unordered.item()) > 1e-3


def test_dpo_orders_near_ties_in_the_precision_that_drops_ties(word_lm_dir, tmp_path):
    """0.30000001 and 0.3 are one float32 value but two float64 ones: the pair is kept (not a tie),
    so its order must come from the same float64 comparison, not from float32 copies."""
    trainer = make_trainer("dpo", "lt-mixed", beta=0.5, **small(word_lm_dir, tmp_path))
    trainer.setup()
    state = [{"role": "user", "content": "what is one and two"}]
    rows = [{"state": state, "response": "one two", "response_prime": "yes no no",
             "reward": 0.30000001, "reward_prime": 0.3},
            {"state": state, "response": "three", "response_prime": "four five",
             "reward": 0.3, "reward_prime": 0.30000001}]
    assert all(r["reward"] != r["reward_prime"] for r in rows)  # DPO's tie rule keeps both
    rows, _ = trainer.prepare(rows)
    rng = np.random.default_rng(1)
    for row in rows:
        for key in ("logp_t", "logp_t_prime", "logp_ref", "logp_ref_prime"):
            row[key] = float(rng.uniform(-30, -5))
    kw = {"batch_size": 4, "temperature": 1.0, "device": trainer.device}
    logp = torch.tensor(batched_logprobs(trainer.model, rows, trainer.pad_id, suffix="", **kw))
    logp_prime = torch.tensor(batched_logprobs(trainer.model, rows, trainer.pad_id, suffix="_prime", **kw))
    ref_y = torch.tensor([r["logp_t"] for r in rows])
    ref_y2 = torch.tensor([r["logp_t_prime"] for r in rows])
    # Pair 0: y has the higher reward (chosen); pair 1: y' does.
    expected = dpo_loss(torch.stack([logp[0], logp_prime[1]]), torch.stack([logp_prime[0], logp[1]]),
                        torch.stack([ref_y[0], ref_y2[1]]), torch.stack([ref_y2[0], ref_y[1]]), 0.5)
    wrong_way = dpo_loss(logp_prime, logp, ref_y2, ref_y, 0.5)  # both pairs ordered as y' chosen
    trainer.engine.model.train()
    out = trainer.train_step(rows)
    assert out["losses/loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - wrong_way.item()) > 1e-3


def test_dpo_drops_ties_and_counts_them(word_lm_dir, tmp_path):
    kw = small(word_lm_dir, tmp_path, prompts_per_iteration=16)
    rebel_rows, _ = make_trainer("rebel", "lt-online", reward_model=YesReward(), run_name="r", **kw).collect(0)
    dpo_rows, stats = make_trainer("dpo", "lt-online", reward_model=YesReward(), run_name="d", **kw).collect(0)
    unequal = [r for r in rebel_rows if r["reward"] != r["reward_prime"]]
    assert 0 < len(unequal) < len(rebel_rows)  # this seed gives both ties and preferences
    assert dpo_rows == unequal and stats.dropped_ties == len(rebel_rows) - len(unequal)
    assert stats.as_dict()["dropped_ties"] == stats.dropped_ties



def test_dpo_iteration_of_ties_makes_no_update_and_the_run_goes_on(word_lm_dir, tmp_path, capsys):
    kw = small(word_lm_dir, tmp_path, iterations=2, lr=1e-2)
    trainer = make_trainer("dpo", "lt-online", reward_model=YesReward(constant=True), run_name="ties", **kw)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    final = trainer.train()
    assert "all 4 pairs have equal rewards" in capsys.readouterr().out
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    run = tmp_path / "ties"
    for t in range(2):
        stats = json.loads((run / f"iteration_{t:03d}" / "collection.json").read_text())
        assert stats["dropped_ties"] == 4 and not (run / f"iteration_{t:03d}" / "tuples").exists()
    assert (final / "config.json").exists() and trainer._state["iteration"] == 2 and trainer._state["global_step"] == 0


def test_rebel_on_lt_offline_trains_on_the_dataset_pairs(word_lm_dir, tmp_path):
    import datasets

    trainer = make_trainer("rebel", "lt-offline", run_name="offline", lr=1e-3, **small(word_lm_dir, tmp_path))
    trainer.train()
    run = tmp_path / "offline"
    config = json.loads((run / "config.json").read_text())
    assert config["agent"] == "rebel" and config["mode"] == "lt-offline"
    rows = datasets.load_from_disk(str(run / "iteration_000" / "tuples")).to_list()
    assert len(rows) == 4 and {r["mode"] for r in rows} == {"lt-offline"}
    from refuel_agents.modes import dataset_items

    by_id = {item.item_id: item for item in dataset_items("UltraInteractDialogue-v0", ENV_KWARGS)[0]}
    for r in rows:
        item = by_id[r["item_id"]]
        assert (r["response"], r["response_prime"]) == (item.chosen, item.rejected) and r["h"] == r["H"]
    collection = json.loads((run / "iteration_000" / "collection.json").read_text())
    assert collection["mode"] == "lt-offline" and collection["policy_responses"] == 0
    assert any("losses/loss" in line for line in (run / "metrics.jsonl").read_text().splitlines())


# ------------------------------------------------------------------------------ the script


def run_script(*args, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def smoke_flags(word_lm_dir, out, name):
    return ["--policy-model", str(word_lm_dir), "--env-kwargs", json.dumps(ENV_KWARGS), "--iterations", "1",
            "--prompts-per-iteration", "4", "--batch-size", "2", "--micro-batch-size", "1", "--max-new-tokens", "5",
            "--eval-prompts", "1", "--device", "cpu", "--output-dir", str(out), "--run-name", name, "--no-progress",
            "--last-k-layers", "none"]  # the embedded preset trains 8 layers; this model has 2


@pytest.mark.slow
@pytest.mark.parametrize("agent,mode", [("dpo", "lt-mixed"), ("rebel", "mt-mixed")])
def test_script_trains_a_baseline(word_lm_dir, tmp_path, agent, mode):
    result = run_script("--agent", agent, "--mode", mode, *smoke_flags(word_lm_dir, tmp_path, "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "summary.md", "iteration_000/tuples", "iteration_000/collection.json",
                 "final_model/config.json"):
        assert (run / name).exists(), name
    config = json.loads((run / "config.json").read_text())
    assert (config["agent"], config["mode"]) == (agent, mode)
    assert json.loads((run / "iteration_000" / "collection.json").read_text())["mode"] == mode
    assert "final model:" in result.stdout


def test_script_needs_a_valid_mode_for_baselines_and_none_for_refuel():
    missing = run_script("--agent", "dpo", timeout=120)
    assert missing.returncode != 0 and "--agent dpo needs --mode" in missing.stderr and "lt-offline" in missing.stderr
    invalid = run_script("--agent", "rebel", "--mode", "lt-bogus", timeout=120)
    assert invalid.returncode != 0 and "--mode lt-bogus is not one of them" in invalid.stderr
    refuel = run_script("--agent", "refuel", "--mode", "lt-mixed", timeout=120)
    assert refuel.returncode != 0 and "takes no --mode" in refuel.stderr
    helped = run_script("--agent", "dpo", "--help", timeout=120)
    assert helped.returncode == 0
    for flag in ("--mode", "--beta", "--reference-policy", "lt-offline", "mt-mixed"):
        assert flag in helped.stdout


@pytest.mark.parametrize("mode", ["lt-mixed", "mt-mixed", "lt-offline"])
def test_offline_roll_ins_never_draw_a_heldout_prompt(word_lm_dir, tmp_path, mode):
    trainer = make_trainer("rebel", mode, **small(word_lm_dir, tmp_path, prompts_per_iteration=0, eval_split="train",
                                                   eval_prompts=8, max_new_tokens=2, run_name=mode),
                           reward_model=YesReward())
    items = dataset_items(trainer.config.env_id, trainer.collect_env_kwargs)[0]
    held = {items[i].item_id for i in trainer.plan.heldout()}
    rows, stats = trainer.collect(0)  # prompts_per_iteration=0: every usable item once
    assert rows and not held & {r["item_id"] for r in rows}
    assert stats.unusable_items["held out"] == len(items) - trainer.plan.train_items
