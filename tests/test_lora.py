"""LoRA policies (refuel_agents.lora): only adapters train, pi_0 is the module with adapters off, the
adapter is what a run saves and resumes from, and the vLLM replica's merged weights are the policy's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from word_count_reward import WordCountReward

from refuel_agents import lora
from refuel_agents.baselines import make_trainer
from refuel_agents.logprobs import sequence_logprobs
from refuel_agents.tuples import pair_batch

peft = pytest.importorskip("peft")  # in the dev extra; a missing peft must not hide the rest of the suite




def small(word_lm_dir, tmp_path, **overrides):
    return {"env_kwargs": {"user": "instant", "max_turns": 2, "tokenizer": None}, "policy_model": str(word_lm_dir),
            "iterations": 1, "prompts_per_iteration": 4, "batch_size": 2, "micro_batch_size": 2, "max_new_tokens": 5,
            "temperature": 1.0, "eval_prompts": 0, "device": "cpu", "output_dir": str(tmp_path), "progress": False,
            "lr": 1e-2, "lora_r": 4, "lora_alpha": 8.0, "run_name": "lora", **overrides}


def rows_for(trainer):
    texts = ["yes", "no no no no no no no", "one two three", "four"]
    state = [{"role": "user", "content": "what is one"}]
    rows = [{"state": state, "response": a, "response_prime": b, "reward": float(i), "reward_prime": 0.0}
            for i, (a, b) in enumerate(zip(texts, reversed(texts)))]
    return trainer.prepare(rows, 0)[0]


def scores(model, trainer, rows):
    with torch.no_grad():
        return sequence_logprobs(model, pair_batch(rows, trainer.pad_id, trainer.device, shared=True),
                                 temperature=trainer.logprob_temperature)


@pytest.fixture(scope="module")
def lora_run(word_lm_dir, tmp_path_factory):
    """A finished LoRA REFUEL run (1 iteration, 2 updates), its base weights before training, and its probe rows."""
    trainer = make_trainer("refuel", None, reward_model=WordCountReward(),
                           **small(word_lm_dir, tmp_path_factory.mktemp("runs"), save_every=1, keep_checkpoints=3))
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer, before


@pytest.mark.slow
def test_a_lora_run_trains_only_the_adapters_and_keeps_no_frozen_copy(lora_run):
    trainer, before = lora_run
    assert trainer._state["global_step"] == 2
    assert isinstance(trainer.reference, lora.AdaptersOff) and trainer.reference.model is trainer.model
    after = dict(trainer.model.named_parameters())
    adapters = [n for n in after if ".lora_" in n]
    assert adapters and len(adapters) == 2 * 7 * 2  # A and B of q, k, v, o, gate, up, down in 2 layers ('all-linear')
    assert {n for n, p in after.items() if p.requires_grad} == set(adapters)
    for name, p in after.items():
        if name in adapters:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"base weight {name} changed"


@pytest.mark.slow
def test_pi_0_is_the_loaded_model_and_the_log_ratio_starts_at_exactly_zero(word_lm_dir, tmp_path):
    trainer = make_trainer("refuel", None, **small(word_lm_dir, tmp_path, micro_batch_size=2, batch_size=4))
    trainer.setup()
    rows = rows_for(trainer)
    order = trainer._minibatch_order(0, len(rows))
    trainer.engine.model.train()
    base = AutoModelForCausalLM.from_pretrained(word_lm_dir, dtype=torch.float32)
    for start in range(0, 4, 2):
        members = [rows[i] for i in order[start : start + 2]]
        logp = trainer.pair_logprobs(trainer.engine.model, members).detach()  # with gradients, as training runs it
        assert torch.equal(logp, torch.tensor([r["logp_t"] for r in members] + [r["logp_t_prime"] for r in members]))
        ref = torch.tensor([r["logp_ref"] for r in members] + [r["logp_ref_prime"] for r in members])
        assert torch.equal(logp, ref)  # B = 0 at the start: pi_t = pi_0
        assert torch.equal(scores(base, trainer, members), ref)  # adapters off = the model as loaded


@pytest.mark.slow
def test_the_saved_adapter_loads_with_peft_and_gives_the_trained_log_probs(lora_run, word_lm_dir):
    trainer, _ = lora_run
    final = trainer.run_dir / "final_model"
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    assert not list(final.glob("model*.safetensors"))  # no full weights
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(word_lm_dir, dtype=torch.float32), final)
    rows = rows_for(trainer)
    trained = scores(trainer.model, trainer, rows)
    assert torch.equal(scores(loaded, trainer, rows), trained)
    base = AutoModelForCausalLM.from_pretrained(word_lm_dir, dtype=torch.float32)
    assert torch.equal(scores(trainer.reference, trainer, rows), scores(base, trainer, rows))  # pi_0 after training
    assert not torch.equal(trained, scores(base, trainer, rows))


@pytest.mark.slow
def test_resume_loads_the_adapter_and_the_optimizer(lora_run):
    trainer, _ = lora_run
    resumed = make_trainer("refuel", None, **small(trainer.config.policy_model, trainer.config.output_dir, save_every=1,
                                                    keep_checkpoints=3, resume=True))  # (a resume takes the run's flags)
    state = resumed.setup()
    assert state["global_step"] == 2
    for (name, p), (_, q) in zip(trainer.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), name
    old, new = trainer.engine.state_dict()["optimizer"]["state"], resumed.engine.state_dict()["optimizer"]["state"]
    assert old.keys() == new.keys() and all(torch.equal(old[k]["exp_avg"], new[k]["exp_avg"]) for k in old)


@pytest.mark.slow
def test_a_run_resumed_after_its_first_update_ends_with_the_same_adapter(lora_run, tmp_path):
    import shutil

    from safetensors.torch import load_file

    trainer, _ = lora_run
    copy = tmp_path / "lora"
    shutil.copytree(trainer.run_dir, copy)
    shutil.rmtree(copy / "final_model")
    (copy / "checkpoints" / "latest").write_text("step_0000001")  # as if killed after the first update
    shutil.rmtree(copy / "checkpoints" / "step_0000002")
    resumed = make_trainer("refuel", None, reward_model=WordCountReward(),
                           **small(trainer.config.policy_model, tmp_path, save_every=1, keep_checkpoints=3, resume=True))
    resumed.train()
    assert resumed._state["global_step"] == 2
    final = load_file(str(copy / "final_model" / "adapter_model.safetensors"))
    expected = load_file(str(trainer.run_dir / "final_model" / "adapter_model.safetensors"))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


def test_merged_weights_are_the_base_models_names_and_the_policys_outputs(word_lm_dir):
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(word_lm_dir, dtype=torch.float32), 4, 8.0, "q_proj,down_proj")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a trained adapter
    base = AutoModelForCausalLM.from_pretrained(word_lm_dir, dtype=torch.float32)
    named = lora.merged(model, model.named_parameters())
    assert [n for n, _ in named] == [n for n, _ in base.named_parameters()]
    base.load_state_dict(dict(named), strict=False)
    ids = torch.tensor([[1, 4, 8, 9, 10, 11, 0]])
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base(input_ids=ids).logits,
                                  AutoModelForCausalLM.from_pretrained(word_lm_dir)(input_ids=ids).logits)


def test_bad_lora_settings_fail_clearly(word_lm_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(word_lm_dir)
    with pytest.raises(ValueError, match="nope_proj.*its linear layers are.*q_proj"):
        lora.wrap(model, 4, 8.0, "q_proj,nope_proj")
    with pytest.raises(ValueError, match="last_k_layers must be an integer in \\[1, 2\\]"):
        lora.wrap(model, 4, 8.0, "q_proj", last_k_layers=3)
    for bad, flag in (({"lora_r": -1}, "--lora-r -1"), ({"lora_alpha": 0.0}, "--lora-alpha 0"),
                      ({"lora_target_modules": " , "}, "--lora-target-modules")):
        with pytest.raises(ValueError, match=flag):
            make_trainer("refuel", None, **small(word_lm_dir, tmp_path, **bad))


def test_last_k_layers_puts_the_adapters_into_those_layers_only(word_lm_dir):
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(word_lm_dir), 4, 8.0, "all-linear", last_k_layers=1)
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert adapted == {"1"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters()
                                                                             if ".lora_" in n}


@pytest.mark.slow
def test_dpo_against_pi_0_trains_a_lora_policy(word_lm_dir, tmp_path):
    trainer = make_trainer("dpo", "lt-online", reward_model=WordCountReward(),
                           **small(word_lm_dir, tmp_path, reference_policy="initial"))
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer._state["global_step"] >= 1
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)


def test_benchmark_lora_prints_both_figures_the_ratio_and_the_load(tmp_path, monkeypatch, capsys):
    """The script's real main, with the two spawned runs replaced by their reports (no benchmark runs here)."""
    spec = importlib.util.spec_from_file_location("benchmark_lora", Path(__file__).parents[1] / "scripts/benchmark_lora.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = []

    def run(name, settings, threads, work):
        runs.append((name, settings["lora_r"], settings.get("reference_kl", True)))
        peak = {"full": 3000, "lora": 1200}[name] * bench.MIB
        return {"configuration": name, "peak_rss": peak, "rss_before_trainer": 600 * bench.MIB, "run_rss": peak - 600 * bench.MIB,
                "parameters": 100, "trainable_parameters": 100 if name == "full" else 10, "reference_copy_parameters": 0,
                "state_bytes_by_count": 1, "optimizer_steps": 2}

    monkeypatch.setattr(bench, "in_fresh_process", run)
    out = tmp_path / "lora.json"
    bench.main(["--lora-r", "8", "--json", str(out)])
    assert runs == [("full", 0, True), ("lora", 8, True)]
    report = json.loads(out.read_text())
    assert report["ratio_lora_to_full"] == {"peak_rss": 0.4, "run_rss": 0.25}
    assert set(report["load"]) == {"before", "after", "cores_used", "cpu_count", "busy"}
    printed = capsys.readouterr().out
    assert "| full | 100 of 100 |" in printed and "LoRA / full: peak RSS 0.40x, the run's own memory 0.25x" in printed
    assert "load average (1 min) before / after:" in printed
    with pytest.raises(SystemExit):
        bench.main(["--lora-r", "0"])
