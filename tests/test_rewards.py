"""Tests of refuel_env.rewards: reward models on tiny local checkpoints, reward parts, the embedded default.

The transformer reward models are tiny Llama networks built from a config in a temporary
directory (with the SmolLM2 tokenizer and its ChatML template); nothing is downloaded. The
ArmoRM path loads tests/assets/tiny_armorm/modeling_tiny_armorm.py as real remote code.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
from transformers.models.llama import modeling_llama

from refuel_env.embedded import smollm2_path
from refuel_env.rewards import (
    ARMORM_ID,
    FSFAIRX_ID,
    ArmoRMReward,
    EmbeddingRelevanceReward,
    RewardModelError,
    RewardModelLoadError,
    SequenceClassificationReward,
    TrajectoryReward,
    TrajectoryRewardModel,
    apply_truncation_penalty,
    kl_penalty,
    load_reward_model,
)
from refuel_env.types import Message

TINY_ARMORM = Path(__file__).parent / "assets" / "tiny_armorm" / "modeling_tiny_armorm.py"


def dialogue(*turns: str, system: str | None = None) -> list[Message]:
    """user, assistant, user, assistant, ... from the given texts."""
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    roles = ("user", "assistant")
    messages += [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]  # type: ignore[misc]
    return messages


DIALOGUES = [
    dialogue("Hi!", "Hello, how can I help?"),
    dialogue("What is 2 + 2?", "4.", "And 3 + 3?", "That is 6, twice three."),
    dialogue("Name a colour.", "Blue.", system="Answer briefly."),
    dialogue(
        "Tell me a long story about a fox who learns to sail across a wide lake at night.",
        "Once upon a time " * 12,
    ),
    dialogue("Ok", "Sure"),
]


def tiny_llama_config(tokenizer, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


@pytest.fixture(scope="module")
def smol_tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)


@pytest.fixture(scope="module")
def tiny_cls_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny LlamaForSequenceClassification (num_labels 1) whose tokenizer adds a BOS by default."""
    path = tmp_path_factory.mktemp("tiny_cls")
    torch.manual_seed(0)
    LlamaForSequenceClassification(tiny_llama_config(smol_tokenizer, num_labels=1)).save_pretrained(path)
    smol_tokenizer.add_bos_token = True
    smol_tokenizer.save_pretrained(path)
    smol_tokenizer.add_bos_token = False
    return path


@pytest.fixture(scope="module")
def tiny_armorm_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """The tiny ArmoRM-style model saved with its modeling file and an ``auto_map``."""
    path = tmp_path_factory.mktemp("tiny_armorm")
    with pytest.MonkeyPatch.context() as patch:  # the file imports a constant current transformers lacks
        patch.setattr(modeling_llama, "LLAMA_INPUTS_DOCSTRING", "", raising=False)
        spec = importlib.util.spec_from_file_location("modeling_tiny_armorm", TINY_ARMORM)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    config = tiny_llama_config(smol_tokenizer, num_objectives=3)
    config.auto_map = {"AutoModelForSequenceClassification": "modeling_tiny_armorm.TinyGatedRewardModel"}
    torch.manual_seed(1)
    module.TinyGatedRewardModel(config).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    shutil.copy(TINY_ARMORM, path / TINY_ARMORM.name)
    return path


@pytest.fixture(scope="module")
def cls_reward(tiny_cls_dir) -> SequenceClassificationReward:
    return SequenceClassificationReward(tiny_cls_dir, batch_size=3)


@pytest.fixture(scope="module")
def armorm_reward(tiny_armorm_dir) -> ArmoRMReward:
    with pytest.MonkeyPatch.context() as patch:  # load as under current transformers: constant absent
        patch.delattr(modeling_llama, "LLAMA_INPUTS_DOCSTRING", raising=False)
        return ArmoRMReward(tiny_armorm_dir, batch_size=2)


def unpadded_output(reward, messages: Sequence[Message]):
    """The model's own output for one dialogue, no padding, reading the last token (pad id None)."""
    ids = torch.tensor([reward.encode(messages)])
    saved, reward.model.config.pad_token_id = reward.model.config.pad_token_id, None
    try:
        with torch.inference_mode():
            return reward.model(input_ids=ids)
    finally:
        reward.model.config.pad_token_id = saved


# --------------------------------------------------------------------------------------------
# SequenceClassificationReward
# --------------------------------------------------------------------------------------------


def test_sequence_classification_batch_equals_single_and_unpadded_model(cls_reward):
    batched = cls_reward.score(DIALOGUES)
    assert batched.dtype == np.float64 and batched.shape == (len(DIALOGUES),)
    assert np.isfinite(batched).all()
    assert np.ptp(batched) > 1e-3, "scores should depend on the dialogue"
    singles = np.array([cls_reward.score([d])[0] for d in DIALOGUES])
    reference = np.array([unpadded_output(cls_reward, d).logits[0, 0].item() for d in DIALOGUES])
    np.testing.assert_allclose(batched, singles, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(batched, reference, rtol=1e-4, atol=1e-5)


def test_sequence_classification_uses_the_models_chat_template_and_one_bos(cls_reward, smol_tokenizer):
    messages = DIALOGUES[1]
    text = cls_reward.format_dialogue(messages)
    assert text == smol_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert (
        "<|im_start|>user\nAnd 3 + 3?<|im_end|>\n<|im_start|>assistant\nThat is 6, twice three.<|im_end|>"
        in text
    )
    bos = cls_reward.tokenizer.bos_token_id
    assert cls_reward.tokenizer("x")["input_ids"][0] == bos, "fixture tokenizer should add a BOS by default"
    ids = cls_reward.encode(messages)
    assert ids == smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == bos and ids[1] != bos
    assert cls_reward.count_tokens(messages) == len(ids)


def test_sequence_classification_defaults(cls_reward):
    assert cls_reward.max_length == 512  # the model's max_position_embeddings
    assert "tiny_cls" in cls_reward.name


def test_too_long_dialogue_is_an_error_not_truncated(tiny_cls_dir):
    reward = SequenceClassificationReward(tiny_cls_dir, max_length=80)
    lengths = [reward.count_tokens(d) for d in DIALOGUES[:4]]
    assert max(lengths[:3]) <= 80 < lengths[3]
    with pytest.raises(RewardModelError, match=rf"dialogue 3 has {lengths[3]} tokens.*max_length=80"):
        reward.score(DIALOGUES[:4])
    assert np.isfinite(reward.score(DIALOGUES[:1])).all()


def test_non_finite_score_names_the_dialogue(tiny_cls_dir):
    reward = SequenceClassificationReward(tiny_cls_dir, batch_size=4)
    clean, poisoned = dialogue("Hello there", "Hi"), dialogue("A zebra question", "Stripes")
    token = next(t for t in reward.encode(poisoned) if t not in reward.encode(clean))
    with torch.no_grad():
        reward.model.get_input_embeddings().weight[token] = float("nan")
    with pytest.raises(RewardModelError, match=r"non-finite score \(NaN or inf\) for dialogue\(s\) 1;"):
        reward.score([clean, poisoned, clean])
    assert np.isfinite(reward.score([clean])).all()


def test_num_labels_other_than_one_is_refused(tmp_path, smol_tokenizer):
    LlamaForSequenceClassification(tiny_llama_config(smol_tokenizer, num_labels=2)).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(RewardModelLoadError, match="num_labels=2"):
        SequenceClassificationReward(tmp_path)


def test_missing_pad_token_is_set_to_eos(tmp_path, tiny_cls_dir, smol_tokenizer, cls_reward):
    shutil.copytree(tiny_cls_dir, tmp_path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_cls_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    reward = SequenceClassificationReward(tmp_path, batch_size=5)
    assert reward.tokenizer.pad_token == smol_tokenizer.eos_token
    np.testing.assert_allclose(reward.score(DIALOGUES), cls_reward.score(DIALOGUES), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([], "empty batch"),
        ([DIALOGUES[0], dialogue("Only a question")], "dialogue 1 ends with a user message"),
        (
            [[{"role": "assistant", "content": "Hi"}]],
            "dialogue 0: message 0 .* role 'assistant', expected 'user'",
        ),
        ([DIALOGUES[0], DIALOGUES[1], [{"role": "system", "content": "s"}]], "dialogue 2 has no user"),
    ],
)
def test_malformed_batches_are_refused(cls_reward, batch, message):
    with pytest.raises(RewardModelError, match=message):
        cls_reward.score(batch)


# --------------------------------------------------------------------------------------------
# ArmoRMReward (remote code)
# --------------------------------------------------------------------------------------------


def test_armorm_loads_remote_code_and_reads_score(armorm_reward):
    model_class = type(armorm_reward.model)
    assert model_class.__name__ == "TinyGatedRewardModel"
    assert model_class.__module__.startswith("transformers_modules"), "should be loaded as remote code"
    batched = armorm_reward.score(DIALOGUES)
    outputs = [unpadded_output(armorm_reward, d) for d in DIALOGUES]
    np.testing.assert_allclose(batched, [o.score.item() for o in outputs], rtol=1e-4, atol=1e-5)
    assert not np.allclose(batched, [o.logits[0, 0].item() for o in outputs], atol=1e-3)
    assert np.ptp(batched) > 1e-3


def test_armorm_padding_survives_pad_token_inside_the_text(armorm_reward):
    # ChatML's <|im_end|> is SmolLM2's pad token and ends every message; the model reads the
    # token before the first pad, so padding with it would read the end of the first message.
    pad = armorm_reward.tokenizer.pad_token_id
    assert pad in armorm_reward.encode(DIALOGUES[0])
    reference = [unpadded_output(armorm_reward, d).score.item() for d in DIALOGUES]
    singles = [armorm_reward.score([d])[0] for d in DIALOGUES]
    np.testing.assert_allclose(singles, reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(armorm_reward.score(DIALOGUES), reference, rtol=1e-4, atol=1e-5)


def test_load_reward_model_by_kind(tiny_armorm_dir, tiny_cls_dir):
    assert isinstance(load_reward_model(tiny_armorm_dir, kind="armorm"), ArmoRMReward)
    assert isinstance(load_reward_model(tiny_cls_dir), SequenceClassificationReward)
    with pytest.raises(ValueError, match="kind must be one of"):
        load_reward_model(tiny_cls_dir, kind="pairwise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is a armorm model"):
        load_reward_model("armorm", kind="sequence_classification")


@pytest.mark.parametrize(("alias", "model_id"), [("fsfairx", FSFAIRX_ID), ("armorm", ARMORM_ID)])
def test_unavailable_hub_model_error_says_which_why_and_what_to_do(alias, model_id):
    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        pytest.skip(f"{model_id} is in this machine's Hugging Face cache")
    with pytest.raises(RewardModelLoadError) as caught:
        load_reward_model(alias, local_files_only=True)
    text = str(caught.value)
    assert model_id in text and f"hf download {model_id}" in text and "HF_HOME" in text


def test_missing_local_directory_error(tmp_path):
    with pytest.raises(RewardModelLoadError, match=re.escape(str(tmp_path / "nowhere"))):
        SequenceClassificationReward(tmp_path / "nowhere", local_files_only=True)


# --------------------------------------------------------------------------------------------
# Reward parts and TrajectoryReward
# --------------------------------------------------------------------------------------------


def test_kl_penalty_matches_eq_11_by_hand():
    penalty = kl_penalty([-10.0, -3.5, -7.0], [-12.0, -3.0, -7.0], 0.05)
    np.testing.assert_allclose(penalty, [0.1, -0.025, 0.0])
    assert penalty.dtype == np.float64
    assert float(kl_penalty(-1.0, -2.0, 0.0)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        kl_penalty([1.0, 2.0], [1.0], 0.1)
    with pytest.raises(ValueError, match=">= 0"):
        kl_penalty([1.0], [1.0], -0.1)
    with pytest.raises(ValueError, match="finite"):
        kl_penalty([float("nan")], [1.0], 0.1)


def test_truncation_penalty_replaces_the_model_score():
    np.testing.assert_array_equal(
        apply_truncation_penalty([1.5, np.nan, 2.0], [False, True, False], -4.0), [1.5, -4.0, 2.0]
    )
    with pytest.raises(ValueError, match="shape"):
        apply_truncation_penalty([1.0, 2.0], [True], -4.0)


class FixedScores(TrajectoryRewardModel):
    """A stand-in model: the score of a dialogue is the float in its last response; records calls."""

    name = "fixed"
    max_length = None

    def __init__(self) -> None:
        self.calls: list[int] = []

    def count_tokens(self, dialogue: Sequence[Message]) -> int:
        return len(dialogue)

    def _score(self, dialogues: Sequence[Sequence[Message]]) -> np.ndarray:
        self.calls.append(len(dialogues))
        return np.array([float(d[-1]["content"]) for d in dialogues])


SCORED = [dialogue("q", "2.0"), dialogue("q", "5.0"), dialogue("q", "-1.0")]


def test_trajectory_reward_combines_parts_by_hand():
    model = FixedScores()
    parts = TrajectoryReward(model, kl_coef=0.05, truncation_penalty=-10.0).compute(
        SCORED,
        policy_logprobs=[-10.0, -20.0, -5.0],
        reference_logprobs=[-12.0, -20.0, -4.0],
        hit_length_limit=[False, True, False],
    )
    assert model.calls == [2], "a truncated dialogue is not sent to the model"
    expected = [
        {"reward": 1.9, "model_score": 2.0, "kl_penalty": 0.1, "truncation_penalty": None},
        {"reward": -10.0, "model_score": None, "kl_penalty": 0.0, "truncation_penalty": -10.0},
        {"reward": -0.95, "model_score": -1.0, "kl_penalty": -0.05, "truncation_penalty": None},
    ]
    for got, want in zip(parts, expected, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value) if value is not None else None), key


def test_trajectory_reward_without_penalty_or_kl_is_the_model_score():
    model = FixedScores()
    parts = TrajectoryReward(model).compute(SCORED, hit_length_limit=[True, True, False])
    assert [p["reward"] for p in parts] == [2.0, 5.0, -1.0]
    assert all(p["truncation_penalty"] is None and p["kl_penalty"] == 0.0 for p in parts)
    assert model.calls == [3]


def test_all_truncated_batch_never_calls_the_model():
    model = FixedScores()
    parts = TrajectoryReward(model, truncation_penalty=-4.0).compute(
        SCORED[:2], hit_length_limit=[True, True]
    )
    assert [p["reward"] for p in parts] == [-4.0, -4.0] and model.calls == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "kl_coef=0.05 needs policy_logprobs"),
        ({"policy_logprobs": [0.0, 0.0, 0.0]}, "both"),
        ({"policy_logprobs": [0.0, 0.0], "reference_logprobs": [0.0, 0.0]}, "one per dialogue"),
        (
            {"policy_logprobs": [0.0] * 3, "reference_logprobs": [0.0] * 3, "hit_length_limit": [True]},
            "one flag",
        ),
    ],
)
def test_trajectory_reward_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrajectoryReward(FixedScores(), kl_coef=0.05, truncation_penalty=-4.0).compute(SCORED, **kwargs)


def test_trajectory_reward_rejects_bad_settings_and_non_finite_scores():
    with pytest.raises(ValueError, match="kl_coef"):
        TrajectoryReward(FixedScores(), kl_coef=-1.0)
    with pytest.raises(ValueError, match="truncation_penalty"):
        TrajectoryReward(FixedScores(), truncation_penalty=float("inf"))
    with pytest.raises(RewardModelError, match="empty|no dialogues"):
        TrajectoryReward(FixedScores()).compute([])
    with pytest.raises(RewardModelError, match=r"dialogue\(s\) 1;"):
        TrajectoryReward(FixedScores()).compute([SCORED[0], dialogue("q", "nan")])


# --------------------------------------------------------------------------------------------
# The embedded default
# --------------------------------------------------------------------------------------------


def labelled_pairs() -> list[dict]:
    text = resources.files("refuel_env").joinpath("assets/reward_pairs.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def preference_by_category(reward: TrajectoryRewardModel) -> tuple[float, dict[str, float]]:
    """Fraction of pairs where the on-topic answer scores higher; overall and per category."""
    pairs = labelled_pairs()
    batch = [
        p["messages"] + [{"role": "assistant", "content": p[side]}]
        for p in pairs
        for side in ("chosen", "rejected")
    ]
    scores = reward.score(batch).reshape(-1, 2)
    wins = scores[:, 0] > scores[:, 1]
    categories = {p["category"] for p in pairs}
    by_category = {
        c: float(np.mean([w for w, p in zip(wins, pairs) if p["category"] == c])) for c in categories
    }
    return float(wins.mean()), by_category


@pytest.fixture(scope="module")
def embedded() -> EmbeddingRelevanceReward:
    reward = load_reward_model()
    assert isinstance(reward, EmbeddingRelevanceReward)
    return reward


def test_labelled_pairs_asset_is_well_formed():
    pairs = labelled_pairs()
    assert len(pairs) >= 40 and len({p["id"] for p in pairs}) == len(pairs)
    assert {"off_topic", "near_miss", "degenerate", "multi_turn"} <= {p["category"] for p in pairs}
    assert sum(len(p["messages"]) > 1 for p in pairs) >= 10
    for p in pairs:
        assert p["messages"][-1]["role"] == "user" and p["chosen"].strip() and p["chosen"] != p["rejected"]


@pytest.fixture(scope="module")
def embedded_preference(embedded) -> tuple[float, dict[str, float]]:
    return preference_by_category(embedded)


@pytest.mark.slow
@pytest.mark.integration
def test_embedded_reward_prefers_on_topic_answers(embedded_preference):
    fraction, by_category = embedded_preference
    print(
        f"embedded reward prefers the on-topic answer on {fraction:.1%} of pairs; by category {by_category}"
    )
    assert fraction >= 0.7
    assert by_category["off_topic"] == 1.0


@pytest.mark.slow
@pytest.mark.integration
def test_degeneracy_penalty_helps_on_degenerate_pairs(embedded_preference):
    plain = EmbeddingRelevanceReward(penalise_degenerate=False)
    _, with_penalty = embedded_preference
    _, without = preference_by_category(plain)
    print(
        f"degenerate pairs: {without['degenerate']:.1%} plain cosine, {with_penalty['degenerate']:.1%} penalised"
    )
    assert with_penalty["degenerate"] > without["degenerate"]


def test_embedded_reward_basics(embedded):
    assert embedded.max_length is None
    scores = embedded.score(
        [
            dialogue("What is the capital of France?", "Paris is the capital of France."),
            dialogue("What is the capital of France?", "   "),
        ]
    )
    assert -embedded.scale <= scores[0] <= embedded.scale and scores[0] > 3.0
    assert scores[1] == 0.0
    assert embedded.count_tokens(dialogue("one two", "three")) == 3


def test_embedded_reward_reads_long_texts_whole(embedded):
    first = "Rivers carry water from mountains to the sea. " * 40  # more than one 256-token window
    second = "Quantum computers use qubits that can be in superpositions. " * 40
    assert len(embedded.tokenizer(first, add_special_tokens=False)["input_ids"]) > embedded.window
    whole, head = embedded.embed([first + second, first])
    assert float(whole @ head) < 0.95, "the second half of a long text must change its embedding"


def test_embedded_reward_does_not_depend_on_the_batch(embedded):
    """A dialogue scores bit for bit the same alone and in any batch (the vector env relies on it)."""
    singles = np.array([embedded.score([d])[0] for d in DIALOGUES])
    assert np.array_equal(embedded.score(DIALOGUES), singles)
    assert np.array_equal(embedded.score(DIALOGUES[::-1]), singles[::-1])
    assert np.array_equal(embedded.score([DIALOGUES[3], DIALOGUES[0]]), singles[[3, 0]])


def test_sequence_classification_with_batch_size_one_does_not_depend_on_the_batch(tiny_cls_dir):
    """Padded batches agree with single dialogues only to float rounding; batch_size=1 agrees exactly."""
    reward = SequenceClassificationReward(tiny_cls_dir, batch_size=1)
    singles = np.array([reward.score([d])[0] for d in DIALOGUES])
    assert np.array_equal(reward.score(DIALOGUES), singles)
