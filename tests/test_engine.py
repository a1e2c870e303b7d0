"""The plain-PyTorch path of the training engine and the pure pieces shared with DeepSpeed, on
tiny models built from a config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from refuel_agents.engine import (
    OptimConfig,
    TrainEngine,
    decoder_layers,
    lr_lambda,
    resolve_deepspeed_config,
    trainable_parameters,
)

VOCAB, HIDDEN = 64, 32
CONFIGS = Path(__file__).resolve().parent.parent / "refuel_agents" / "configs"


def tiny_llama(layers: int = 3, tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tokens(rows: int = 4, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- the schedule ---------------------------------------------------------------------------


def test_lr_lambda_hand_values():
    # 5 steps, 1 warm-up step: (0+1)/(1+1) = 0.5, then cos from 1 to 0 over 4 steps:
    # 0.5 * (1 + cos(pi * k / 4)) for k = 0..4 = 1, 0.853553, 0.5, 0.146447, 0
    got = [lr_lambda(s, 5, 1) for s in range(6)]
    assert got == pytest.approx([0.5, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627, 0.0])
    # 2 warm-up steps: 1/3, 2/3, then cosine over 4 steps
    assert [lr_lambda(s, 6, 2) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    # no warm-up: the first step runs at the peak
    assert lr_lambda(0, 4, 0) == 1.0 and lr_lambda(2, 4, 0) == pytest.approx(0.5)
    # all warm-up
    assert [lr_lambda(s, 2, 2) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 0.0])


@pytest.mark.parametrize("args", [(0, 0, 0), (0, 5, 6), (0, 5, -1), (-1, 5, 1)])
def test_lr_lambda_rejects_bad_input(args):
    with pytest.raises(ValueError):
        lr_lambda(*args)


def test_optim_config_defaults_are_the_papers_and_validate():
    cfg = OptimConfig()
    assert (cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay, cfg.warmup_ratio) == (3e-7, (0.9, 0.95), 1e-8, 1e-6, 0.1)
    assert cfg.warmup_steps(10) == 1 and cfg.warmup_steps(30) == 3 and cfg.warmup_steps(4) == 0
    assert OptimConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)
    for bad in ({"lr": 0}, {"betas": (0.9, 1.0)}, {"eps": 0}, {"weight_decay": -1}, {"warmup_ratio": 1.0},
                {"max_grad_norm": -1}, {"grad_accum_steps": 0}, {"grad_accum_steps": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            OptimConfig(**bad)


def test_scheduler_follows_lr_lambda():
    engine = TrainEngine(tiny_llama(), OptimConfig(lr=1e-2, warmup_ratio=0.2), total_steps=5, device="cpu")
    ids = tokens()
    lrs = []
    for _ in range(5):
        engine.backward(lm_loss(engine.model, ids))
        lrs.append(engine.step()["lr"])
    assert lrs == pytest.approx([1e-2 * lr_lambda(s, 5, 1) for s in range(5)])
    assert engine.optimizer_steps == 5 and engine.lr == 0.0


# -- accumulation and clipping ---------------------------------------------------------------


def test_two_half_batches_accumulate_to_one_full_batch():
    ids = tokens(rows=4)
    optim = dict(lr=1e-2, warmup_ratio=0.0, max_grad_norm=0.5)
    full = TrainEngine(tiny_llama(), OptimConfig(**optim), total_steps=3, device="cpu")
    halves = TrainEngine(tiny_llama(), OptimConfig(**optim, grad_accum_steps=2), total_steps=3, device="cpu")
    for _ in range(2):
        full.backward(lm_loss(full.model, ids))
        info_full = full.step()
        halves.backward(lm_loss(halves.model, ids[:2]))
        assert halves.step() is None
        halves.backward(lm_loss(halves.model, ids[2:]))
        info_halves = halves.step()
        assert info_halves["grad_norm"] == pytest.approx(info_full["grad_norm"], rel=1e-5)
        assert info_halves["lr"] == info_full["lr"]
    a, b = params_of(full.model), params_of(halves.model)
    # Summing two half-batch gradients rounds differently from one full batch; Adam at lr 1e-2 turns
    # that into weight differences of about 1e-6 (1.4e-6 on one of 2048 elements, measured).
    assert all(torch.allclose(a[n], b[n], atol=1e-5) for n in a)
    assert any(not torch.equal(a[n], p) for n, p in tiny_llama().named_parameters())
    assert halves.optimizer_steps == full.optimizer_steps == 2


@pytest.mark.parametrize("max_grad_norm", [0.05, 0.0])
def test_clipping_reports_the_norm_before_clipping(max_grad_norm):
    ids = tokens()
    reference = tiny_llama()
    lm_loss(reference, ids).backward()
    grads = [p.grad.clone() for p in reference.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()

    beta1 = 0.9
    engine = TrainEngine(tiny_llama(), OptimConfig(lr=1e-3, betas=(beta1, 0.95), max_grad_norm=max_grad_norm),
                         total_steps=2, device="cpu")
    engine.backward(lm_loss(engine.model, ids))
    info = engine.step()
    assert info["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert norm > 0.05  # the clipped case really clips
    # AdamW's first moment after one step is (1 - beta1) * the gradient it was given
    scale = min(1.0, max_grad_norm / (norm + 1e-6)) if max_grad_norm else 1.0
    state = engine.state_dict()["optimizer"]["state"]
    for i, g in enumerate(grads):
        torch.testing.assert_close(state[i]["exp_avg"], (1 - beta1) * scale * g, rtol=1e-4, atol=1e-9)


def test_non_finite_loss_raises_and_skips_the_update():
    engine = TrainEngine(tiny_llama(), OptimConfig(lr=1e-2), total_steps=2, device="cpu")
    before = params_of(engine.model)
    engine.backward(lm_loss(engine.model, tokens()) * float("nan"))
    with pytest.raises(FloatingPointError, match="not finite"):
        engine.step()
    assert all(torch.equal(before[n], p) for n, p in engine.model.named_parameters())
    assert engine.optimizer_steps == 0


# -- which parameters train -------------------------------------------------------------------

# one Llama decoder layer here: q 32x32 + k 16x32 + v 16x32 + o 32x32 + gate/up/down 3 x 64x32
# + two norms of 32 = 1024 + 512 + 512 + 1024 + 6144 + 64 = 9280
LAYER_NUMEL = 9280


def test_last_k_layers_freezes_everything_else():
    model = tiny_llama(layers=3)
    trained = trainable_parameters(model, 2)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in model.named_parameters() if n.startswith(("model.layers.1.", "model.layers.2."))} | {
        "model.norm.weight", "lm_head.weight"}
    assert len(trained) == 2 * 9 + 2
    assert sum(p.numel() for p in trained) == 2 * LAYER_NUMEL + HIDDEN + VOCAB * HIDDEN
    assert sum(p.numel() for p in model.parameters()) == 3 * LAYER_NUMEL + HIDDEN + 2 * VOCAB * HIDDEN

    everything = trainable_parameters(model, None)
    assert all(p.requires_grad for p in model.parameters()) and len(everything) == len(list(model.parameters()))


def test_tied_lm_head_keeps_the_shared_embedding_frozen():
    # As in the original release: the input embedding stays frozen, and with it an lm_head tied to it.
    model = tiny_llama(layers=2, tied=True)
    trained = trainable_parameters(model, 1)
    assert not model.model.embed_tokens.weight.requires_grad
    assert sum(p.numel() for p in trained) == LAYER_NUMEL + HIDDEN


def test_a_step_changes_only_the_trained_layers():
    engine = TrainEngine(tiny_llama(layers=3), OptimConfig(lr=1e-2, warmup_ratio=0.0), total_steps=2,
                         last_k_layers=1, device="cpu")
    before = params_of(engine.model)
    engine.backward(lm_loss(engine.model, tokens()))
    engine.step()
    changed = {n for n, p in engine.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {n for n in before if n.startswith("model.layers.2.")} | {"model.norm.weight", "lm_head.weight"}


def test_other_decoder_families_gpt2():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=3, n_head=4))
    assert decoder_layers(model) is model.transformer.h
    trainable_parameters(model, 1)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    # GPT-2 ties lm_head to wte: the input embedding, so both stay frozen
    assert names == {n for n, _ in model.named_parameters() if n.startswith("transformer.h.2.")} | {
        "transformer.ln_f.weight", "transformer.ln_f.bias"}


def test_last_k_layers_bad_input():
    with pytest.raises(ValueError, match=r"last_k_layers must be an integer in \[1, 3\]"):
        trainable_parameters(tiny_llama(layers=3), 4)
    with pytest.raises(ValueError, match="last_k_layers"):
        trainable_parameters(tiny_llama(layers=3), 0)
    with pytest.raises(ValueError, match="cannot find the decoder layers of Linear"):
        trainable_parameters(torch.nn.Linear(3, 3), 1)


# -- checkpoints ------------------------------------------------------------------------------


def test_save_load_continues_identically(tmp_path):
    optim = OptimConfig(lr=1e-2, warmup_ratio=0.25, grad_accum_steps=2)
    batches = [tokens(rows=2, seed=s) for s in range(8)]

    def run(engine: TrainEngine, micro_steps: range) -> list:
        infos = []
        for b in micro_steps:
            engine.backward(lm_loss(engine.model, batches[b]))
            infos.append(engine.step())
        return infos

    straight = TrainEngine(tiny_llama(), optim, total_steps=4, device="cpu")
    infos = run(straight, range(8))

    first = TrainEngine(tiny_llama(), optim, total_steps=4, device="cpu")
    run(first, range(4))  # two optimizer steps
    first.save(tmp_path / "engine")
    first.save(tmp_path / "engine")  # replaces the existing checkpoint, leaves nothing else behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
    weights = {k: v.clone() for k, v in first.unwrapped_model_state().items()}

    model = tiny_llama(seed=123)
    model.load_state_dict(weights)
    resumed = TrainEngine(model, optim, total_steps=4, device="cpu")
    resumed.load(tmp_path / "engine")
    assert resumed.optimizer_steps == 2
    assert resumed.lr == pytest.approx(1e-2 * lr_lambda(2, 4, 1))
    assert run(resumed, range(4, 8)) == infos[4:]
    a, b = params_of(straight.model), params_of(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.lr == straight.lr and resumed.optimizer_steps == straight.optimizer_steps == 4


def test_load_rejects_what_is_not_an_engine_checkpoint(tmp_path):
    engine = TrainEngine(tiny_llama(), OptimConfig(), total_steps=2, device="cpu")
    with pytest.raises(FileNotFoundError, match="not an engine checkpoint"):
        engine.load(tmp_path)
    with pytest.raises(ValueError, match="TrainEngine.state_dict"):
        engine.load_state_dict({"optimizer": {}})


def test_unwrapped_state_is_the_model_state_on_cpu():
    engine = TrainEngine(tiny_llama(), OptimConfig(), total_steps=2, device="cpu")
    state = engine.unwrapped_model_state()
    assert state.keys() == engine.model.state_dict().keys()
    assert all(v.device.type == "cpu" and torch.equal(v, engine.model.state_dict()[k]) for k, v in state.items())


# -- memory and precision options -------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = tokens()
    grads, mlp_calls = [], {False: 0, True: 0}
    for checkpointing in (False, True):
        engine = TrainEngine(tiny_llama(), OptimConfig(), total_steps=2, gradient_checkpointing=checkpointing,
                             device="cpu")

        def count(*_, key=checkpointing):
            mlp_calls[key] += 1

        # a pre-hook: the recomputation stops as soon as the saved tensors are rebuilt, inside the MLP
        engine.model.model.layers[0].mlp.register_forward_pre_hook(count)
        engine.backward(lm_loss(engine.model, ids))
        grads.append({n: p.grad.clone() for n, p in engine.model.named_parameters()})
    assert mlp_calls == {False: 1, True: 2}  # with checkpointing the layer is recomputed in the backward pass
    plain, checkpointed = grads
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_keeps_fp32_weights():
    model = tiny_llama().to(torch.bfloat16)
    engine = TrainEngine(model, OptimConfig(), total_steps=2, bf16=True, device="cpu")
    assert all(p.dtype == torch.float32 for p in engine.model.parameters())
    assert engine.model(input_ids=tokens()).logits.dtype == torch.bfloat16
    fp32 = TrainEngine(tiny_llama(), OptimConfig(), total_steps=2, device="cpu")
    assert fp32.bf16 is False and fp32.model(input_ids=tokens()).logits.dtype == torch.float32


def test_plain_engine_single_process_facts(monkeypatch):
    engine = TrainEngine(tiny_llama(), OptimConfig(), total_steps=2, device="cpu")
    assert (engine.rank, engine.world_size, engine.is_main, engine.zero_stage) == (0, 1, True, 0)
    assert engine.device == torch.device("cpu") and not engine.is_deepspeed
    assert engine.all_reduce_mean(2.5) == 2.5
    assert engine.all_reduce_means({"loss": 2.5, "reward": 1}) == {"loss": 2.5, "reward": 1.0}
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="deepspeed_config"):
        TrainEngine(tiny_llama(), OptimConfig(), total_steps=2, device="cpu")
    with pytest.raises(ValueError, match="total_steps"):
        TrainEngine(tiny_llama(), OptimConfig(), total_steps=0, device="cpu")


# -- DeepSpeed config resolution (pure) --------------------------------------------------------


def test_resolve_fills_auto_values_from_the_engine_settings():
    optim = OptimConfig(max_grad_norm=0.5, grad_accum_steps=4)
    cfg = resolve_deepspeed_config(CONFIGS / "deepspeed_zero3.json", optim, world_size=8, bf16=True,
                                   micro_batch_size=2, hidden_size=4096)
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 2 * 4 * 8
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True}
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["reduce_bucket_size"] == 4096 * 4096
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
    assert zero["stage3_param_persistence_threshold"] == 40960
    assert cfg["zero_allow_untested_optimizer"] is True
    z2 = resolve_deepspeed_config(CONFIGS / "deepspeed_zero2.json", optim, world_size=2, bf16=False,
                                  hidden_size=32)
    assert z2["zero_optimization"]["stage"] == 2 and z2["bf16"] == {"enabled": False}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"optimizer": {"type": "AdamW"}}, "'optimizer' section"),
        ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' section"),
        ({"fp16": {"enabled": True}}, "fp16 is not supported"),
        ({"gradient_accumulation_steps": 3}, "gradient_accumulation_steps=3"),
        ({"bf16": {"enabled": True}}, "bf16"),
        ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}, "no config.hidden_size"),
        ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, "sub_group_size cannot be"),
        ({"activation_checkpointing": {"number_checkpoints": "auto"}}, "activation_checkpointing.number_checkpoints"),
    ],
)
def test_resolve_rejects_configs_it_cannot_honour(config, message):
    hidden = 32 if "sub_group_size" in str(config) else None
    with pytest.raises(ValueError, match=message):
        resolve_deepspeed_config(config, OptimConfig(), world_size=2, bf16=False, hidden_size=hidden)


def test_resolve_rejects_a_bad_micro_batch_size():
    with pytest.raises(ValueError, match="micro_batch_size"):
        resolve_deepspeed_config({}, OptimConfig(), world_size=1, bf16=False, micro_batch_size=0)


def test_resolve_reports_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_deepspeed_config(tmp_path / "nope.json", OptimConfig(), world_size=1, bf16=False)
