"""Training follows the paper: prompts, temperatures, the scored tokens, penalties, steps, precision.

Each test names the point it checks; each fails on an implementation that deviates in that point.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence

import pytest
import torch
from word_count_reward import WordCountReward

from refuel_agents.baselines import make_trainer
from refuel_agents.collection import Penalties, collect_refuel_tuples
from refuel_agents.engine import OptimConfig, TrainEngine, lr_lambda, trainable_parameters
from refuel_agents.logprobs import (
    collate,
    encode_sampled_response,
    end_of_turn_token_ids,
    sequence_logprobs,
)
from refuel_agents.losses import refuel_loss, refuel_loss_original
from refuel_agents.prompt_plan import iteration_prompts
from refuel_agents.tuples import encode_pair_response
from refuel_env.generation import Completion, SamplingParams, TextGenerator

ENV_KWARGS = {"user": "instant", "max_turns": 3, "tokenizer": None}




def small(word_lm_dir, tmp_path, **overrides):
    return {"env_kwargs": ENV_KWARGS, "policy_model": str(word_lm_dir), "iterations": 1, "prompts_per_iteration": 4,
            "batch_size": 2, "micro_batch_size": 2, "max_new_tokens": 5, "temperature": 1.0, "eval_prompts": 0,
            "device": "cpu", "output_dir": str(tmp_path), "progress": False, **overrides}


# ------------------------------------------------------------------------------ 1. prompts without replacement


def test_iterations_walk_seeded_permutations_without_replacement():
    whole = [iteration_prompts(7, 51, t, 0) for t in range(3)]
    assert all(sorted(p) == list(range(51)) for p in whole)  # each iteration is one permutation of the split
    assert whole[0] != whole[1] and whole == [iteration_prompts(7, 51, t, 0) for t in range(3)]
    parts = [iteration_prompts(7, 51, t, 16) for t in range(4)]
    walked = parts[0] + parts[1] + parts[2]
    assert len(set(walked)) == 48 and walked == whole[0][:48]  # one pass, continued across iterations
    assert parts[3][:3] == whole[0][48:] and parts[3][3:] == whole[1][:13]  # then the next pass


def test_a_whole_split_iteration_collects_every_prompt_once(word_lm_dir, tmp_path):
    trainer = make_trainer("refuel", None, reward_model=WordCountReward(),
                           **small(word_lm_dir, tmp_path, prompts_per_iteration=0, max_new_tokens=2,
                                   env_kwargs={**ENV_KWARGS, "max_turns": 1}))
    rows, stats = trainer.collect(0)
    n = trainer.plan.split_size()
    assert stats.prompts == n > 30 and len({r["item_id"] for r in rows}) == len(rows) == n


def test_iterations_zero_means_one_pass_over_the_split(word_lm_dir, tmp_path):
    trainer = make_trainer("refuel", None, **small(word_lm_dir, tmp_path, iterations=0, prompts_per_iteration=16))
    assert trainer.iterations == 4  # ceil(51 / 16)


# ------------------------------------------------------------------------------ 2. temperatures


def test_log_probs_are_scored_at_the_sampling_temperature(word_lm_dir, tmp_path):
    trainer = make_trainer("refuel", None, **small(word_lm_dir, tmp_path, temperature=0.7))
    assert trainer.logprob_temperature == 0.7
    trainer.setup()
    state = [{"role": "user", "content": "one two"}]
    rows, _ = trainer.prepare([{"state": state, "response": "yes", "response_prime": "no no", "reward": 1.0,
                                "reward_prime": 0.0}])
    batch = collate([encode_pair_response(trainer.train_tokenizer, rows[0], "", None)], trainer.pad_id)
    with torch.no_grad():
        at_07 = sequence_logprobs(trainer.model, batch, temperature=0.7).item()
        at_1 = sequence_logprobs(trainer.model, batch, temperature=1.0).item()
    assert rows[0]["logp_t"] == pytest.approx(at_07, abs=1e-5) and abs(at_07 - at_1) > 1e-3
    explicit = make_trainer("refuel", None, **small(word_lm_dir, tmp_path, temperature=0.7, logprob_temperature=1.0))
    assert explicit.logprob_temperature == 1.0
    assert make_trainer("refuel", None, **small(word_lm_dir, tmp_path, temperature=0.0)).logprob_temperature == 1.0


# ------------------------------------------------------------------------------ 4. the scored tokens are the sampled ones


def test_training_scores_exactly_the_sampled_tokens(word_lm_dir):
    from refuel_env.generation import TransformersGenerator

    policy = TransformersGenerator.from_pretrained(str(word_lm_dir), device="cpu")
    env_kwargs = {**ENV_KWARGS, "max_turns": 2, "reward_model": WordCountReward()}
    rows, _ = collect_refuel_tuples(env_id="UltraInteractDialogue-v0", env_kwargs=env_kwargs, policy=policy,
                                    sampling=SamplingParams(max_new_tokens=8, temperature=1.0), num_prompts=16, seed=5,
                                    progress=False)
    tokenizer = policy.tokenizer
    end_ids = end_of_turn_token_ids(tokenizer)
    finishes = set()
    for row in rows:
        for suffix in ("", "_prime"):
            sampled = row[f"response{suffix}_token_ids"]
            finish = row[f"response{suffix}_finish_reason"]
            finishes.add(finish)
            encoded = encode_pair_response(tokenizer, row, suffix, None)
            scored = [i for i, m in zip(encoded.input_ids, encoded.response_mask) if m]
            assert scored == sampled  # round trip: nothing re-tokenised
            assert (scored[-1] in end_ids) == (finish == "stop")  # the end-of-turn token only when sampled
            assert tokenizer.decode(sampled, skip_special_tokens=True).strip() == row[f"response{suffix}"]
    assert finishes == {"stop", "length"}  # both kinds occurred


def test_sampled_encoding_refuses_inconsistent_tokens(tiny_generator):
    tokenizer = tiny_generator.tokenizer
    state = [{"role": "user", "content": "hi"}]
    eos = sorted(end_of_turn_token_ids(tokenizer))[0]
    with pytest.raises(ValueError, match="must end with its sampled end-of-turn token"):
        encode_sampled_response(tokenizer, state, [5, 6], "stop")
    with pytest.raises(ValueError, match="before their last position"):
        encode_sampled_response(tokenizer, state, [5, eos, 6], "length")
    with pytest.raises(ValueError, match="finish_reason must be"):
        encode_sampled_response(tokenizer, state, [5, eos], "abort")


# ------------------------------------------------------------------------------ 5, 7. Gamma and the KL penalty


class ScriptedPolicy(TextGenerator):
    """A policy whose response at turn ``length_turn`` (counted in user messages) is cut by its budget."""

    name = "scripted"
    max_context = 10_000

    def __init__(self, length_turn: int):
        self.length_turn = length_turn

    def chat(self, conversations: Sequence, params: SamplingParams, seeds=None) -> list[Completion]:
        out = []
        for conv, seed in zip(conversations, seeds or [0] * len(conversations)):
            turn = sum(m["role"] == "user" for m in conv)
            words = " ".join(["word"] * (1 + int(seed) % 3))
            finish = "length" if turn == self.length_turn else "stop"
            out.append(Completion(words, 1, 1, finish))
        return out

    def count_tokens(self, messages, *, add_generation_prompt=True) -> int:
        return sum(len(m["content"].split()) for m in messages)


@pytest.mark.parametrize("turns", ["rollout", "turn-h"])
def test_gamma_covers_the_branch_turns_and_never_the_roll_in(turns):
    env_kwargs = {**ENV_KWARGS, "reward_model": WordCountReward()}
    rows, stats = collect_refuel_tuples(env_id="UltraInteractDialogue-v0", env_kwargs=env_kwargs, policy=ScriptedPolicy(2),
                                        sampling=SamplingParams(), num_prompts=40, seed=1, progress=False,
                                        penalties=Penalties(truncation_penalty=-4.0, turns=turns))
    seen, hits = set(), 0
    for r in rows:
        h, H = r["h"], r["H"]
        hit = (h <= 2 <= H) if turns == "rollout" else h == 2
        seen.add((h, H, hit))
        hits += 2 * hit
        for suffix in ("", "_prime"):
            assert (r[f"reward{suffix}"] == -4.0) == hit, (h, H, suffix)
            assert ("truncation_penalty" in r[f"reward_parts{suffix}"]) == hit
    assert {(3, 3, False), (2, 3, True), (1, 2, turns == "rollout"), (1, 1, False)} <= seen  # roll-in hit at h = 3
    assert stats.gamma_length == hits > 0 and stats.tuples == 40


@pytest.mark.parametrize("turns", ["rollout", "turn-h"])
def test_kl_penalty_covers_the_same_turns(turns):
    calls = []

    def kl_logprobs(states, responses, completions):
        calls.append(len(responses))
        return [-1.0] * len(responses), [-1.5] * len(responses)  # 0.5 nats per covered response

    env_kwargs = {**ENV_KWARGS, "reward_model": WordCountReward(), "kl_coef": 0.1}
    rows, _ = collect_refuel_tuples(env_id="UltraInteractDialogue-v0", env_kwargs=env_kwargs, policy=ScriptedPolicy(0),
                                    sampling=SamplingParams(), num_prompts=12, seed=2, progress=False,
                                    kl_logprobs=kl_logprobs, penalties=Penalties(kl_coef=0.1, turns=turns))
    covered = sum(2 * ((r["H"] - r["h"] + 1) if turns == "rollout" else 1) for r in rows)
    assert sum(calls) == covered
    for r in rows:
        n = (r["H"] - r["h"] + 1) if turns == "rollout" else 1
        assert r["reward_parts"]["kl_penalty"] == pytest.approx(0.1 * 0.5 * n)


def test_truncated_branches_get_gamma_instead_of_being_dropped(tiny_lm_dir):
    policy = ScriptedPolicy(0)
    env_kwargs = {**ENV_KWARGS, "reward_model": WordCountReward(), "tokenizer": str(tiny_lm_dir),
                  "max_dialogue_tokens": 60}
    kw = {"env_id": "UltraInteractDialogue-v0", "env_kwargs": env_kwargs, "policy": policy, "sampling": SamplingParams(),
          "num_prompts": 24, "seed": 4, "progress": False}
    dropped_rows, dropped = collect_refuel_tuples(**kw)
    assert dropped.dropped_truncated > 0  # this limit truncates some dialogues
    rates = dropped.as_dict()["drop_rate_by_h"]
    assert sum(dropped.dropped_by_h.values()) == dropped.dropped_truncated
    assert all(0 <= v <= 1 for v in rates.values()) and set(rates) == {str(h) for h in dropped.prompts_by_h}
    rows, stats = collect_refuel_tuples(**kw, penalties=Penalties(truncation_penalty=-4.0))
    assert stats.gamma_truncated > 0 and len(rows) > len(dropped_rows)
    for r in rows:
        for suffix in ("", "_prime"):
            if f"truncation_reason{suffix}" in r:
                assert r[f"reward{suffix}"] == -4.0


# ------------------------------------------------------------------------------ 6. steps from the pairs kept


def test_steps_per_iteration_follow_the_pairs_kept(word_lm_dir, tmp_path):
    trainer = make_trainer("dpo", "lt-online", reward_model=WordCountReward(), run_name="dpo",
                           **small(word_lm_dir, tmp_path, prompts_per_iteration=8, batch_size=2, micro_batch_size=1,
                                   epochs=2))
    trainer.train()
    stats = json.loads((tmp_path / "dpo" / "iteration_000" / "collection.json").read_text())
    kept = stats["tuples"] - stats["dropped_ties"]
    assert 0 < kept < 8  # some pairs tie on word counts and are dropped
    assert trainer._state["global_step"] == max(1, 2 * kept // 2)


# ------------------------------------------------------------------------------ 8, 9. pi_t and pi_0 in training's layout and precision


def test_log_ratio_is_exactly_zero_before_the_first_update(word_lm_dir, tmp_path):
    trainer = make_trainer("refuel", None, **small(word_lm_dir, tmp_path, micro_batch_size=2, batch_size=4))
    trainer.setup()
    texts = ["yes", "no no no no no no no", "one two three", "four"]
    state = [{"role": "user", "content": "what is one"}]
    rows = [{"state": state, "response": a, "response_prime": b, "reward": float(i), "reward_prime": 0.0}
            for i, (a, b) in enumerate(zip(texts, reversed(texts)))]
    rows, _ = trainer.prepare(rows, 0)
    order = trainer._minibatch_order(0, len(rows))
    trainer.engine.model.train()
    for start in range(0, 4, 2):
        members = [rows[i] for i in order[start : start + 2]]
        logp = trainer.pair_logprobs(trainer.engine.model, members)  # with gradients, as training runs it
        assert torch.equal(logp[:2].detach(), torch.tensor([r["logp_t"] for r in members]))
        assert torch.equal(logp[2:].detach(), torch.tensor([r["logp_t_prime"] for r in members]))
        assert torch.equal(logp.detach(), torch.tensor([r["logp_ref"] for r in members] + [r["logp_ref_prime"] for r in members]))


def test_the_frozen_reference_runs_in_the_trained_precision(word_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(word_lm_dir, dtype=torch.bfloat16)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    engine = TrainEngine(model, OptimConfig(lr=1e-3), 4, bf16=True, device="cpu")  # fp32 weights under bf16 autocast
    assert next(reference.parameters()).dtype == torch.bfloat16
    reference = engine.match_precision(reference)
    assert next(reference.parameters()).dtype == next(engine.model.parameters()).dtype == torch.float32
    ids = torch.tensor([[1, 10, 11, 12, 0]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": torch.tensor([[0, 0, 1, 1, 1]])}
    with torch.no_grad():
        assert torch.equal(sequence_logprobs(engine.model, batch), sequence_logprobs(reference, batch))


# ------------------------------------------------------------------------------ 10. tied embeddings stay frozen


def test_last_k_layers_keeps_a_tied_input_embedding_frozen(word_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(word_lm_dir)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    trained = {id(p) for p in trainable_parameters(model, 1)}
    assert id(model.get_input_embeddings().weight) not in trained
    assert not model.get_input_embeddings().weight.requires_grad
    assert all(p.requires_grad for p in model.model.layers[-1].parameters())
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())


# ------------------------------------------------------------------------------ 11. the loss scale


def _first_step_size(word_lm_dir, loss_fn, eta: float) -> float:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(word_lm_dir)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-8, weight_decay=0.0)
    ids = torch.tensor([[1, 10, 11, 12, 0], [1, 10, 13, 14, 0]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": torch.tensor([[0, 0, 1, 1, 1]] * 2)}
    logp = sequence_logprobs(model, batch)
    fixed = logp.detach()
    # A reward gap of 0.01: the scale of ArmoRM's score differences.
    loss = loss_fn(logp[:1], fixed[:1], logp[1:], fixed[1:], torch.tensor([0.01]), torch.tensor([0.0]), eta)
    loss.backward()
    optimizer.step()
    return float(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before))))


def test_original_loss_scale_is_eta_squared_times_eq_one_and_steps_differ_at_large_eta(word_lm_dir):
    g = torch.tensor([0.4, -1.0])
    args = (g, torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.5]))
    for eta in (1.0, 30.0, 1e3):
        assert refuel_loss_original(*args, eta).item() == pytest.approx(eta**2 * refuel_loss(*args, eta).item(), rel=1e-6)
    same = _first_step_size(word_lm_dir, refuel_loss, 1.0) / _first_step_size(word_lm_dir, refuel_loss_original, 1.0)
    large = _first_step_size(word_lm_dir, refuel_loss, 1e3) / _first_step_size(word_lm_dir, refuel_loss_original, 1e3)
    assert same == pytest.approx(1.0, rel=1e-6)
    # eq. 1's gradients are 1e6 times smaller and AdamW's eps shrinks its first step (measured: 0.87x)
    assert large < 0.95


def test_loss_scale_original_trains_with_the_release_form(word_lm_dir, tmp_path):
    trainer = make_trainer("refuel", None, **small(word_lm_dir, tmp_path, loss_scale="original", eta=10.0))
    trainer.setup()
    state = [{"role": "user", "content": "one"}]
    rows, _ = trainer.prepare([{"state": state, "response": "yes", "response_prime": "no", "reward": 1.0,
                                "reward_prime": 0.0}] * 2)
    trainer.engine.model.train()
    out = trainer.train_step(rows)
    assert out["losses/loss"] == pytest.approx(100.0, rel=1e-5)  # (0 - 10 * 1)^2: pi = pi_t at the first step
    with pytest.raises(ValueError, match="--loss-scale eta2: pass one of"):
        make_trainer("refuel", None, **small(word_lm_dir, tmp_path, loss_scale="eta2"))


# ------------------------------------------------------------------------------ 12. what the KL column is


def test_logged_metrics_name_the_log_ratio_and_the_kl_estimate(word_lm_dir, tmp_path):
    trainer = make_trainer("refuel", None, reward_model=WordCountReward(), run_name="kl", **small(word_lm_dir, tmp_path))
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*lines)
    assert "charts/kl_to_init" not in keys and "charts/logratio_to_init" in keys
    kl = [x["collect/kl_pi_t_pi_0"] for x in lines if "collect/kl_pi_t_pi_0" in x]
    assert kl == [pytest.approx(0.0, abs=1e-6)]  # pi_t = pi_0 in the first iteration


# ------------------------------------------------------------------------------ the learning-rate schedule


def test_schedules_linear_or_cosine_per_run_or_per_iteration(word_lm_dir):
    from transformers import AutoModelForCausalLM

    assert lr_lambda(2, 4, 0, "linear") == 0.5 and lr_lambda(2, 4, 0, "cosine") == pytest.approx(0.5)
    assert lr_lambda(1, 4, 0, "linear") == 0.75 and lr_lambda(1, 4, 0, "cosine") == pytest.approx(0.8535534)
    model = AutoModelForCausalLM.from_pretrained(word_lm_dir)
    engine = TrainEngine(model, OptimConfig(lr=1.0, warmup_ratio=0.0, schedule="linear"), 8, device="cpu")
    ids = torch.tensor([[1, 10, 11, 0]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": torch.tensor([[0, 1, 1, 1]])}

    def step() -> float:
        engine.backward(-sequence_logprobs(engine.model, batch).sum())
        return engine.step()["lr"]

    engine.set_schedule(0, 0, 4)  # an iteration with its own schedule
    assert [step() for _ in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert engine._optimizer.state
    engine.reset_optimizer_state()
    assert not engine._optimizer.state
    engine.set_schedule(4, 4, 8)  # the second half of a run-long schedule
    assert [step() for _ in range(2)] == [0.5, 0.375]


# ------------------------------------------------------------------------------ presets: the environment's side


def test_setting_two_presets_define_a_live_gamma_and_the_dataset_filters():
    from refuel_env.components import make_config

    ui = make_config("paper-setting-two-ultrainteract")
    assert ui.truncation_penalty == -4.0 and ui.max_response_tokens == {1: 1024, 2: 768, 3: 512, 4: 512, 5: 512}
    assert ui.data_filters["max_prompt_tokens"][5] == 128 and ui.data_filters["max_response_tokens"][1] == 1024
    hh = make_config("paper-setting-two-hh")
    assert hh.max_response_tokens == 512 and hh.data_filters == {"max_prompt_tokens": 128, "max_response_tokens": 512}
    assert make_config("paper-setting-one").data_filters == {"max_dialogue_tokens": 2048}


def test_data_filters_are_applied_when_the_environment_loads(smollm2_dir):
    import gymnasium as gym

    import refuel_env  # noqa: F401

    kw = {"user": "presampled", "reward_model": WordCountReward(), "tokenizer": str(smollm2_dir)}
    everything = gym.make("UltraInteractPresampled-v0", **kw).unwrapped.core.items
    limited = gym.make("UltraInteractPresampled-v0", data_filters={"max_prompt_tokens": {1: 60, 2: 60, 3: 60}},
                       **kw).unwrapped.core.items
    assert 0 < len(limited) < len(everything)
    with pytest.raises(ValueError, match="pass tokenizer="):
        gym.make("UltraInteractPresampled-v0", data_filters={"max_dialogue_tokens": 100},
                 **{**kw, "tokenizer": None})


def test_per_turn_count_limits_filter_each_dialogue_by_its_own_length():
    from refuel_env.data import load_ultrainteract

    words = lambda text: len(text.split())  # noqa: E731
    items = load_ultrainteract(split="all")
    by_k = load_ultrainteract(split="all", count_tokens=words, max_prompt_tokens={1: 10_000, 2: 1, 3: 1})
    assert len(by_k) == sum(item.num_turns == 1 for item in items)  # every multi-turn item has a question > 1 word
    with pytest.raises(ValueError, match="mapping of turns"):
        load_ultrainteract(count_tokens=words, max_prompt_tokens={1: 0})


def test_a_per_h_response_limit_applies_gamma_by_dialogue_length():
    import gymnasium as gym

    import refuel_env  # noqa: F401

    env = gym.make("UltraInteractDialogue-v0", user="instant", reward_model=WordCountReward(), tokenizer="embedded",
                   truncation_penalty=-4.0, max_response_tokens={"1": 3, "2": 100})
    four_words = "one two three four"
    _, info = env.reset(seed=0, options={"horizon": 1})
    assert env.step(four_words)[1] == -4.0  # H = 1: limit 3
    env.reset(seed=0, options={"horizon": 2})
    env.step(four_words)
    assert env.step(four_words)[1] == 4.0  # H = 2: limit 100, the model's score


# Each preset field and the row of the preset table (docs/training.md) that gives its source.
PRESET_ROWS = {
    "policy_model": "policy", "env_preset": "simulated user", "env_id": "simulated user", "env_kwargs": "data filters",
    "iterations": "iterations", "prompts_per_iteration": "prompts per iteration", "batch_size": "pairs per update",
    "micro_batch_size": "pairs per update", "epochs": "epochs per iteration", "eta": "eta", "loss_scale": "loss form",
    "lr": "learning rate", "betas": "AdamW betas", "eps": "AdamW betas", "weight_decay": "AdamW betas",
    "warmup_ratio": "schedule", "lr_schedule": "schedule", "schedule_scope": "schedule", "max_grad_norm": "gradient clipping",
    "max_new_tokens": "response limit", "max_new_tokens_by_h": "response limit", "temperature": "sampling temperature",
    "max_seq_len": "sequence limit", "last_k_layers": "trained layers",
    "gradient_checkpointing": None, "eval_prompts": None,  # memory and monitoring, not the method
    "eval_temperature": None, "eval_every": None,  # (the embedded default's table in docs/training.md gives their sources)
}


def test_every_preset_value_has_a_row_in_the_preset_table_of_the_training_docs():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("train_agent", root / "scripts" / "train_agent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    docs = (root / "docs" / "training.md").read_text()
    table = docs[docs.index("| hyperparameter | paper | original release |"):]
    table = table[: table.index("\n\n")]
    for name, preset in module.PRESETS.items():
        for key in preset:
            assert key in PRESET_ROWS, f"preset {name} sets {key}: add its row to the preset table of docs/training.md"
            if PRESET_ROWS[key]:
                assert f"\n| {PRESET_ROWS[key]}" in table, PRESET_ROWS[key]
