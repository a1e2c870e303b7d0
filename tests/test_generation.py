"""The transformers generation backend: batching, per-request seeds, stops and errors."""

from __future__ import annotations

import pytest
import torch

from refuel_env.generation import (
    ContextLengthError,
    GenerationError,
    SamplingParams,
    apply_stop_strings,
    filter_logits,
)

CONVS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Write a long poem about the sea and the sky and the stars."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
]


def test_seeded_batch_equals_one_at_a_time(tiny_generator):
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    batch = tiny_generator.chat(CONVS, params, seeds=[5, 6, 7])
    single = [tiny_generator.chat([c], params, seeds=[s])[0] for c, s in zip(CONVS, [5, 6, 7])]
    assert [c.text for c in batch] == [c.text for c in single]
    assert all(c.completion_tokens > 0 for c in batch)


def test_seeds_reproduce_and_differ(tiny_generator):
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    a = tiny_generator.chat([CONVS[0]] * 2, params, seeds=[1, 2])
    b = tiny_generator.chat([CONVS[0]] * 2, params, seeds=[1, 2])
    assert [c.text for c in a] == [c.text for c in b]
    assert a[0].text != a[1].text


def test_greedy_is_deterministic_and_ignores_seeds(tiny_generator):
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    a = tiny_generator.chat(CONVS, params)
    b = tiny_generator.chat(CONVS, params, seeds=[1, 2, 3])
    assert [c.text for c in a] == [c.text for c in b]


def test_length_finish_and_token_counts(tiny_generator):
    (c,) = tiny_generator.chat([CONVS[0]], SamplingParams(max_new_tokens=5, temperature=0.0))
    assert c.prompt_tokens == tiny_generator.count_tokens(CONVS[0])
    # A random tiny model does not emit its end-of-turn token within 5 tokens.
    assert (c.finish_reason, c.completion_tokens) == ("length", 5)


def test_stops_at_end_of_turn(smollm2_dir):
    from refuel_env.generation import TransformersGenerator

    gen = TransformersGenerator.from_pretrained(str(smollm2_dir), device="cpu")
    (c,) = gen.chat([[{"role": "user", "content": "Say just: hello"}]], SamplingParams(max_new_tokens=40, temperature=0))
    assert c.finish_reason == "stop" and c.completion_tokens < 40
    assert "<|im_end|>" not in c.text and c.text


def test_bad_requests_name_the_backend(tiny_generator):
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(GenerationError, match="transformers backend.*empty batch"):
        tiny_generator.chat([], params)
    with pytest.raises(GenerationError, match="seed 0 must be an int"):
        tiny_generator.chat([CONVS[0]], params, seeds=["7"])
    with pytest.raises(GenerationError, match="got 2 seeds for 1"):
        tiny_generator.chat([CONVS[0]], params, seeds=[1, 2])
    with pytest.raises(GenerationError, match="message 0"):
        tiny_generator.chat([[{"role": "robot", "content": "x"}]], params)
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(ContextLengthError, match="conversation 0 has .* prompt tokens"):
        tiny_generator.chat([long], params)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(GenerationError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    inf = float("-inf")
    assert filter_logits(logits, 2, 1.0).tolist() == [[2.0, 1.0, inf, inf]]
    # softmax([2, 1, 0, -1]) = [0.644, 0.237, 0.087, 0.032]: top_p 0.8 keeps the first two.
    assert filter_logits(logits, 0, 0.8).tolist() == [[2.0, 1.0, inf, inf]]
    assert filter_logits(logits, 0, 0.5).tolist() == [[2.0, inf, inf, inf]]
    assert filter_logits(logits, 0, 1.0).tolist() == logits.tolist()


def test_stop_strings():
    assert apply_stop_strings("abc\nUser: x", ["\nUser:", "zz"]) == ("abc", True)
    assert apply_stop_strings("abc", ["zz"]) == ("abc", False)
