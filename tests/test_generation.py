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


# --- Prefix reuse -------------------------------------------------------------------------------

SYSTEM = {
    "role": "system",
    "content": "You are a patient tutor. Explain every step, check the arithmetic twice, and end with a "
    "one-line summary of the answer. Use plain words and short sentences; avoid jargon. " * 2,
}
DIALOGUE = [
    SYSTEM,
    {"role": "user", "content": "How many minutes are there in a week?"},
    {"role": "assistant", "content": "Seven days of 24 hours of 60 minutes: 7 * 24 * 60 = 10080 minutes."},
    {"role": "user", "content": "And in a leap year?"},
]
SHARED_PREFIX = [  # one system prompt, user messages of different lengths
    [SYSTEM, {"role": "user", "content": "Hi"}],
    [SYSTEM, {"role": "user", "content": "What is the capital of France, and why is it there?"}],
    [SYSTEM, {"role": "user", "content": "Name three prime numbers."}],
    [SYSTEM, {"role": "user", "content": "Explain photosynthesis to a child who loves football and dogs, " * 3}],
]


def _with_and_without_reuse(generator, convs, params, seeds, **kwargs):
    """Completions with prefix reuse and without, from the same model; and the prefix tokens reused."""
    import copy

    from refuel_env.generation import TransformersGenerator

    # float64: the reuse path computes the same logits up to rounding, and a random tiny model's
    # distribution is so flat that a float32 rounding difference can move a seeded draw across the
    # edge between two tokens (it did, on some CPUs). In float64 the differences stay far below the
    # float32 resolution in which the sampler reads the logits.
    # kv_cache_bytes=0: within-call reuse alone (a later batch of the call could use KV stored by an
    # earlier one instead; tests/test_kv_reuse.py covers that store).
    model = copy.deepcopy(generator.model).double()
    reuse = TransformersGenerator(model, generator.tokenizer, prefix_cache=True, kv_cache_bytes=0, **kwargs)
    plain = TransformersGenerator(model, generator.tokenizer, prefix_cache=False, kv_cache_bytes=0, **kwargs)
    assert reuse.prefix_cache and not plain.prefix_cache
    return reuse.chat(convs, params, seeds), plain.chat(convs, params, seeds), reuse.prefix_tokens_reused


GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_reuse_identical_for_branches_of_one_dialogue(tiny_generator, params):
    n = 6
    with_reuse, without, reused = _with_and_without_reuse(tiny_generator, [DIALOGUE] * n, params, list(range(10, 10 + n)))
    assert with_reuse == without
    # One prompt for all: the first prefill covers all but its last token, the others reuse it.
    assert reused == (n - 1) * (tiny_generator.count_tokens(DIALOGUE) - 1)
    if params is SAMPLED:
        assert len({c.text for c in with_reuse}) > 1


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_reuse_identical_for_shared_prefix_with_suffixes_of_different_lengths(tiny_generator, params):
    with_reuse, without, reused = _with_and_without_reuse(tiny_generator, SHARED_PREFIX, params, [3, 1, 4, 1])
    assert with_reuse == without
    lengths = {tiny_generator.count_tokens(c) for c in SHARED_PREFIX}
    assert len(lengths) == 4 and reused >= 3 * tiny_generator.count_tokens([SYSTEM]) - 3 * 10


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_reuse_changes_nothing_for_unrelated_prompts(tiny_generator, params):
    with_reuse, without, reused = _with_and_without_reuse(tiny_generator, CONVS, params, [5, 6, 7])
    assert with_reuse == without
    assert reused == 0


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_reuse_identical_with_two_groups_of_different_prefix_lengths_in_one_batch(tiny_generator, params):
    # The shorter shared prefix is left-padded up to the longer one inside the prefix columns.
    poem = [{"role": "user", "content": "Write a long poem about the sea and the sky and the stars. " * 3}]
    convs = [DIALOGUE, poem, DIALOGUE, poem, CONVS[2]]
    with_reuse, without, reused = _with_and_without_reuse(tiny_generator, convs, params, [9, 8, 7, 6, 5])
    assert with_reuse == without
    assert reused == tiny_generator.count_tokens(DIALOGUE) - 1 + tiny_generator.count_tokens(poem) - 1


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_reuse_identical_in_mixed_batches_split_over_chunks(tiny_generator, params):
    convs = [DIALOGUE, *SHARED_PREFIX, *CONVS, DIALOGUE, DIALOGUE]
    seeds = list(range(len(convs)))
    with_reuse, without, reused = _with_and_without_reuse(tiny_generator, convs, params, seeds, batch_size=4)
    assert with_reuse == without
    assert reused > 0
    # Each request's own seed decides its text, whatever batch it lands in.
    (alone,) = tiny_generator.chat([convs[5]], params, seeds=[seeds[5]])
    assert alone == with_reuse[5]


def test_reuse_identical_on_smollm2_with_end_of_turn_stops(smollm2_dir):
    from refuel_env.generation import TransformersGenerator

    gen = TransformersGenerator.from_pretrained(str(smollm2_dir), device="cpu")
    system = {"role": "system", "content": "You are a helpful assistant. Keep every answer short and to the point. " * 3}
    convs = [
        [system, {"role": "user", "content": "Say just: hello"}],
        [system, {"role": "user", "content": "What colour is the sky on a clear day? One word."}],
        [system, {"role": "user", "content": "Write a long story about a dragon."}],
    ]
    greedy, sampled = SamplingParams(max_new_tokens=12, temperature=0), SamplingParams(max_new_tokens=12, temperature=0.8)
    with_reuse, without, reused = _with_and_without_reuse(gen, convs, greedy, None)
    assert with_reuse == without and reused > 0
    assert [c.finish_reason for c in with_reuse] == ["stop", "length", "length"]
    with_reuse, without, reused = _with_and_without_reuse(gen, convs, sampled, [1, 2, 3])
    assert with_reuse == without and reused > 0


def test_group_by_prefix_keeps_long_shared_prefixes_apart():
    from refuel_env.generation import PrefixGroup, group_by_prefix

    common = list(range(10))  # shared by all: too short to be worth a group
    a, b = common + [100] * 50, common + [200] * 50
    prompts = [a + [1], b + [1], a + [2, 2], b + [2], [7, 7]]
    groups = group_by_prefix(prompts, min_prefix_tokens=32)
    assert sorted(groups, key=lambda g: g.members) == [
        PrefixGroup(members=(0, 2), prefix_len=60),
        PrefixGroup(members=(1, 3), prefix_len=60),
        PrefixGroup(members=(4,), prefix_len=0),
    ]
    # Identical prompts keep their last token out of the prefix, for generate to start from.
    assert group_by_prefix([a, a, a], 32) == [PrefixGroup(members=(0, 1, 2), prefix_len=59)]
    # A low threshold lets the 10 common tokens join everything but the unrelated prompt, when that saves more.
    assert group_by_prefix([a, b], 8) == [PrefixGroup(members=(0, 1), prefix_len=10)]
    assert group_by_prefix([a, b], 11) == [PrefixGroup(members=(0,), prefix_len=0), PrefixGroup(members=(1,), prefix_len=0)]
    # Groups fit a generation batch.
    assert sorted(len(g.members) for g in group_by_prefix([a] * 5, 32, max_group_size=2)) == [1, 2, 2]
    with pytest.raises(GenerationError, match="min_prefix_tokens"):
        group_by_prefix([a], 0)


def test_pack_prompts_aligns_prefixes_and_suffixes():
    from refuel_env.generation import pack_prompts, position_ids_from_mask

    prompts = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [9, 8]]
    input_ids, mask, prefix_width = pack_prompts(prompts, [3, 3, 0], pad_id=0)
    assert prefix_width == 3
    assert input_ids.tolist() == [[1, 2, 3, 0, 4], [1, 2, 3, 5, 6], [0, 0, 0, 9, 8]]
    assert mask.tolist() == [[1, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    positions = position_ids_from_mask(mask)
    # Every real token sits at its position in its own prompt.
    for row, ids in enumerate(prompts):
        assert positions[row][mask[row] == 1].tolist() == list(range(len(ids)))
    # Without prefixes: plain left padding.
    input_ids, mask, prefix_width = pack_prompts(prompts, [0, 0, 0], pad_id=0)
    assert prefix_width == 0 and input_ids.tolist()[2] == [0, 0, 0, 9, 8]


def test_prefix_reuse_pays_only_when_it_saves_positions():
    from refuel_env.generation import PrefixGroup, prefix_reuse_pays

    pair = [list(range(100)) + [1], list(range(100)) + [2]]
    assert prefix_reuse_pays(pair, [PrefixGroup((0, 1), 100)])
    # A long unrelated prompt would pad every row's suffix columns: 100 + 3 * 300 > 3 * 300.
    mixed = [*pair, list(range(1000, 1300))]
    assert not prefix_reuse_pays(mixed, [PrefixGroup((0, 1), 100), PrefixGroup((2,), 0)])
    assert not prefix_reuse_pays(pair, [PrefixGroup((0,), 0), PrefixGroup((1,), 0)])


def test_models_whose_cache_cannot_take_reuse_generate_without_it():
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from refuel_env.generation import supports_prefix_reuse

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)
    llama = LlamaForCausalLM(LlamaConfig(**small))
    assert supports_prefix_reuse(llama)
    assert not supports_prefix_reuse(MistralForCausalLM(MistralConfig(sliding_window=8, **small)))
    # generate refuses a cache object next to a configured cache implementation.
    llama.generation_config.cache_implementation = "static"
    assert not supports_prefix_reuse(llama)


def test_bad_min_prefix_tokens(tiny_generator):
    from refuel_env.generation import TransformersGenerator

    with pytest.raises(GenerationError, match="min_prefix_tokens must be an int >= 1"):
        TransformersGenerator(tiny_generator.model, tiny_generator.tokenizer, min_prefix_tokens=0)
