"""Shared-prefix scoring: s_h runs once per tuple, and the log-probs, the loss and every gradient are
those of the two unshared sequences s_h + y and s_h + y'.

The unshared path (``collate``: 2n right-padded rows) is the reference. A shared micro-batch mixes
states of different lengths and responses of different lengths, one of them cut by the token budget
(``finish_reason='length'``, no end-of-turn token), as ``encode_tuples`` encodes them.
"""

from __future__ import annotations

import pytest
import torch

from refuel_agents.baselines import make_trainer
from refuel_agents.engine import OptimConfig, TrainEngine
from refuel_agents.logprobs import end_of_turn_token_ids, sequence_logprobs, sequence_logprobs_and_entropy
from refuel_agents.losses import LOSS_SCALES
from refuel_agents.tuples import encode_tuples, pair_batch

ENV_KWARGS = {"user": "instant", "max_turns": 3, "tokenizer": None}
STATES = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me a long story about a small cat who lives in a big old house by the sea."},
     {"role": "assistant", "content": "Once upon a time there was a cat."},
     {"role": "user", "content": "Go on, and tell me what the cat ate for breakfast every single morning."}],
    [{"role": "user", "content": "What is two plus two?"}],
]


def load(path, attn_implementation="sdpa"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
    return model.train(), AutoTokenizer.from_pretrained(path)


def tuples(tokenizer) -> list[dict]:
    """Three tuples of different state lengths; y and y' of different lengths; one y' cut without its end token."""
    sampled = tokenizer("and then", add_special_tokens=False)["input_ids"]
    end = sorted(end_of_turn_token_ids(tokenizer))[0]
    rows = [
        {"state": STATES[0], "response": "Hello there, how can I help you today?", "response_prime": "Hey.",
         "reward": 1.0, "reward_prime": 0.0},
        {"state": STATES[1], "response": "It ate fish.", "response_prime": "",
         "response_prime_token_ids": sampled * 5, "response_prime_finish_reason": "length",
         "reward": 0.2, "reward_prime": 0.7},
        {"state": STATES[2], "response": "", "response_token_ids": [*sampled, end], "response_finish_reason": "stop",
         "response_prime": "Four, since two and two make four.", "reward": 0.5, "reward_prime": 0.4},
    ]
    rows, too_long = encode_tuples(rows, tokenizer, 4096)
    assert too_long == 0 and rows[1]["input_ids_prime"][-1] != end and rows[2]["input_ids"][-1] == end
    return [{**r, "logp_t": -30.0 - i, "logp_t_prime": -20.0 + i} for i, r in enumerate(rows)]


def loss_and_grads(model, rows, pad_id, shared):
    """Eq. 1's loss over the rows, its gradient per parameter, the batch, log-probs and entropies."""
    model.zero_grad(set_to_none=True)
    batch = pair_batch(rows, pad_id, torch.device("cpu"), shared=shared)
    logp, entropy = sequence_logprobs_and_entropy(model, batch, temperature=0.8)
    n = len(rows)
    col = lambda key: torch.tensor([r[key] for r in rows])  # noqa: E731
    loss = LOSS_SCALES["paper"](logp[:n], col("logp_t"), logp[n:], col("logp_t_prime"), col("reward"),
                                col("reward_prime"), 10.0)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, batch, logp.detach(), entropy


def assert_same_training_signal(model, rows, pad_id):
    loss, grads, batch, logp, entropy = loss_and_grads(model, rows, pad_id, shared=False)
    loss_s, grads_s, batch_s, logp_s, entropy_s = loss_and_grads(model, rows, pad_id, shared=True)
    assert "segment" in batch_s and len(batch_s["input_ids"]) == len(rows) and len(batch["input_ids"]) == 2 * len(rows)
    # the state runs once: the packed rows hold each s_h once, the unshared rows twice
    assert int(batch_s["attention_mask"].sum()) == int(batch["attention_mask"].sum()) - sum(
        r["response_mask"].count(0) for r in rows)
    torch.testing.assert_close(logp_s, logp, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(entropy_s, entropy, rtol=1e-5, atol=1e-6)
    assert abs(loss_s - loss) <= 1e-6 * abs(loss), (loss_s, loss)
    assert grads.keys() == grads_s.keys() and len(grads) == len(list(model.parameters()))
    largest = max(g.abs().max() for g in grads.values())
    difference = max((grads_s[k] - grads[k]).abs().max() for k in grads)
    assert largest > 0 and difference <= 1e-5 * largest, (difference, largest)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_shared_prefix_gives_the_unshared_loss_and_gradients(tiny_lm_dir, attn_implementation):
    model, tokenizer = load(tiny_lm_dir, attn_implementation)
    rows = tuples(tokenizer)
    assert len({len(r["input_ids"]) - sum(r["response_mask"]) for r in rows}) == 3  # three state lengths
    assert_same_training_signal(model, rows, tokenizer.pad_token_id)


def test_shared_prefix_under_gradient_checkpointing(tiny_lm_dir):
    model, tokenizer = load(tiny_lm_dir)
    TrainEngine(model, OptimConfig(lr=1e-3), 4, gradient_checkpointing=True, device="cpu")
    assert model.is_activation_checkpointing
    assert_same_training_signal(model, tuples(tokenizer), tokenizer.pad_token_id)


def test_a_pair_with_two_different_states_falls_back_to_two_sequences(tiny_lm_dir):
    model, tokenizer = load(tiny_lm_dir)
    rows = tuples(tokenizer)
    other, _ = encode_tuples([{**rows[0], "state": STATES[2]}], tokenizer, 4096)
    rows[0] = {**rows[0], "input_ids_prime": other[0]["input_ids_prime"],
               "response_mask_prime": other[0]["response_mask_prime"]}
    batch = pair_batch(rows, tokenizer.pad_token_id, torch.device("cpu"), shared=True)
    assert "segment" not in batch and len(batch["input_ids"]) == 2 * len(rows)
    unshared = pair_batch(rows, tokenizer.pad_token_id, torch.device("cpu"), shared=False)
    with torch.no_grad():
        assert torch.equal(sequence_logprobs(model, batch), sequence_logprobs(model, unshared))
    # a packed batch of the other rows still matches their unshared scores
    with torch.no_grad():
        packed = pair_batch(rows[1:], tokenizer.pad_token_id, torch.device("cpu"), shared=True)
        alone = pair_batch(rows[1:], tokenizer.pad_token_id, torch.device("cpu"), shared=False)
        assert "segment" in packed
        torch.testing.assert_close(sequence_logprobs(model, packed), sequence_logprobs(model, alone), rtol=1e-6, atol=1e-5)


def test_an_attention_without_custom_masks_is_refused(tiny_lm_dir):
    model, tokenizer = load(tiny_lm_dir)
    model.config._attn_implementation = "flash_attention_2"
    batch = pair_batch(tuples(tokenizer), tokenizer.pad_token_id, torch.device("cpu"), shared=True)
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'.*--no-shared-prefix"):
        sequence_logprobs(model, batch)


@pytest.mark.parametrize("agent, mode", [("refuel", None), ("rebel", "lt-online"), ("dpo", "lt-online")])
def test_every_agent_trains_on_the_shared_layout_with_the_unshared_gradients(word_lm_dir, tmp_path, agent, mode):
    grads, tokens = {}, {}
    for shared in (True, False):
        trainer = make_trainer(agent, mode, env_kwargs=ENV_KWARGS, policy_model=str(word_lm_dir), iterations=1,
                               prompts_per_iteration=3, batch_size=3, micro_batch_size=3, eval_prompts=0, device="cpu",
                               output_dir=str(tmp_path / str(shared)), progress=False, shared_prefix=shared)
        trainer.setup()
        texts = ["yes", "no no no no no no no", "one two three"]
        rows = [{"state": [{"role": "user", "content": " ".join(["what is one"] * (i + 1))}], "response": a,
                 "response_prime": b, "reward": float(i), "reward_prime": 0.5} for i, (a, b) in
                enumerate(zip(texts, reversed(texts)))]
        rows, _ = trainer.prepare(rows, 0)
        trainer.engine.model.zero_grad(set_to_none=True)
        tokens[shared] = trainer.train_step(rows)["tokens"]
        grads[shared] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert tokens[True] < tokens[False]  # the packed rows run each state once
    largest = max(g.abs().max() for g in grads[False].values())
    difference = max((grads[True][k] - grads[False][k]).abs().max() for k in grads[False])
    assert largest > 0 and difference <= 1e-5 * largest, (difference, largest)


def test_the_benchmark_runs_one_part_and_refuses_a_part_without_its_pairs(tmp_path, capsys, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_refuel.py"
    spec = importlib.util.spec_from_file_location("benchmark_refuel", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # (its dataclass looks its module up there)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--only", "shared-prefix", "--json", str(tmp_path / "out.json")])
    assert (args.only, args.shared_state_tokens, args.shared_response_tokens, args.batch_pairs) == ("shared-prefix", 400, 64, 4)
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "training"])  # no collection runs, so no collected pairs
    assert "--only training runs no collection" in capsys.readouterr().err
    figures = bench.shared_prefix_figures(
        {"step_cpu_seconds": {True: [1.0, 2.0, 3.0], False: [4.0, 5.0, 6.0]},
         "step_seconds": {True: [2.0], False: [3.0]}, "tokens": {True: 10, False: 16},
         "max_grad_rel_diff": 1e-7, "load": (1.0, 1.0)}, None, 400, 64, 4)
    assert figures["speedup"] == 2.5 and figures["state_tokens"] == 400 and "dpo" not in figures


def sliding_window_model(kind, vocab_size, attn_implementation):
    """A tiny Mistral (every layer windowed) or Gemma-3-style model (local and global layers), window 8."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    common = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 256, "sliding_window": 8,
              "attn_implementation": attn_implementation}
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(num_hidden_layers=2, **common))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=3, head_dim=8, **common,
                                                   layer_types=["sliding_attention", "full_attention",
                                                                "sliding_attention"]))
    return model.float().eval()


@pytest.fixture(scope="module")
def smollm2_tuples(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return tokenizer, tuples(tokenizer)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
def test_sliding_window_models_score_the_packed_rows_as_the_unshared_ones(smollm2_tuples, kind, attn_implementation):
    tokenizer, rows = smollm2_tuples
    model = sliding_window_model(kind, len(tokenizer), attn_implementation)
    assert min(r["response_mask"].index(1) for r in rows) > 8  # every state is longer than the window
    with torch.no_grad():
        unshared = sequence_logprobs(model, pair_batch(rows, tokenizer.pad_token_id, torch.device("cpu")))
        shared = sequence_logprobs(model, pair_batch(rows, tokenizer.pad_token_id, torch.device("cpu"), shared=True))
    torch.testing.assert_close(shared, unshared, rtol=0, atol=1e-5)  # differed by up to 23.5 nats (window ignored)


def test_a_sliding_window_the_mask_cannot_reproduce_is_refused_with_the_model_type_and_the_flag():
    from types import SimpleNamespace

    from refuel_agents.logprobs import attention_windows

    class Unknown(torch.nn.Module):  # windowed attention that masks neither like Mistral nor by layer type
        config = SimpleNamespace(sliding_window=8, layer_types=None, model_type="custom-windowed")

        def forward(self, input_ids, attention_mask=None):
            return input_ids

    with pytest.raises(ValueError, match="model type 'custom-windowed'.*--no-shared-prefix"):
        attention_windows(Unknown())
