"""KV kept between ``chat`` calls (TransformersGenerator's ``kv_cache_bytes``): same completions as without it.

The models run in float64, as the within-call prefix-reuse tests do: a random tiny model's flat
distribution lets a float32 rounding difference move a seeded draw to a neighbouring token.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from refuel_env.generation import GenerationError, SamplingParams, TransformersGenerator
from refuel_env.kv_store import KVStore, weights_fingerprint

SYSTEM = {
    "role": "system",
    "content": "You are a patient tutor. Explain every step, check the arithmetic twice, and end with a "
    "one-line summary of the answer. Use plain words and short sentences; avoid jargon.",
}
OPENERS = [
    [SYSTEM, {"role": "user", "content": "How many minutes are there in a week?"}],
    [SYSTEM, {"role": "user", "content": "Why is the sky blue on a clear day, and red at sunset?"}],
    [{"role": "user", "content": "Write a long poem about the sea and the sky and the stars, with rhymes."}],
]
FOLLOW_UPS = ["And in a leap year?", "Say it more simply, please.", "Can you give one more example of that?"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95)


@pytest.fixture(scope="module")
def model64(tiny_generator):
    return copy.deepcopy(tiny_generator.model).double()


def _pair(model, tokenizer, **kwargs):
    """A generator keeping KV between calls and one that does not, on the same model."""
    on = TransformersGenerator(model, tokenizer, **kwargs)
    off = TransformersGenerator(model, tokenizer, **{**kwargs, "kv_cache_bytes": 0})
    assert on.kv_store is not None and off.kv_store is None
    return on, off


def _extend(conv, completion, follow_up):
    return [*conv, {"role": "assistant", "content": completion.text}, {"role": "user", "content": follow_up}]


def _play(gen, params, turns=3, seeds=(11, 12, 13)):
    """Three dialogues, then two branches of each at every turn (different seeds); every call's completions."""
    convs, calls = list(OPENERS), []
    for turn in range(turns):
        batch = [c for c in convs for _ in range(2)] if turn else convs
        batch_seeds = [s + 100 * turn + k for s in seeds for k in range(2)] if turn else list(seeds)
        out = gen.chat(batch, params, seeds=batch_seeds)
        calls.append(out)
        # carry the first branch of each dialogue on
        picked = out[::2] if turn else out
        convs = [_extend(c, o, FOLLOW_UPS[(turn + i) % 3]) for i, (c, o) in enumerate(zip(convs, picked))]
    return calls


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_multi_turn_dialogues_and_branches_identical_with_and_without_the_store(model64, tiny_generator, params):
    on, off = _pair(model64, tiny_generator.tokenizer)
    assert _play(on, params) == _play(off, params)
    assert on.kv_tokens_reused > 0 and off.kv_tokens_reused == 0
    assert on.kv_store.num_entries > 0 and on.kv_store.nbytes > 0


def test_next_turn_prefills_only_what_is_new(model64, tiny_generator):
    on, off = _pair(model64, tiny_generator.tokenizer, prefix_cache=False)
    first = on.chat(OPENERS, GREEDY)
    assert on.kv_tokens_reused == 0
    nxt = [_extend(c, o, "Thanks. Go on.") for c, o in zip(OPENERS, first)]
    assert on.chat(nxt, GREEDY) == off.chat(nxt, GREEDY)
    # Each prompt's previous prompt is served from the store (and its reply, as far as it re-tokenises alike).
    assert on.kv_tokens_reused >= sum(len(on.encode(c)) for c in OPENERS)
    assert on.kv_tokens_reused < sum(len(on.encode(c)) for c in nxt)


@pytest.mark.slow
@pytest.mark.integration
def test_smollm2_reuses_the_whole_previous_turn(smollm2_dir):
    # A real model's replies re-tokenise as sampled, so the next prompt extends a stored sequence whole.
    from refuel_env.generation import load_causal_lm

    # float32 and greedy: a trained model's top token is far ahead of the next, rounding does not move it.
    model, tokenizer = load_causal_lm(str(smollm2_dir), "cpu", "float32")
    on, off = _pair(model, tokenizer, prefix_cache=False)
    openers, params = OPENERS[:2], SamplingParams(max_new_tokens=8, temperature=0.0)
    first = on.chat(openers, params)
    assert first == off.chat(openers, params)
    entries = on.kv_store.num_entries
    nxt = [_extend(c, o, "Thanks. Go on.") for c, o in zip(openers, first)]
    assert on.chat(nxt, params) == off.chat(nxt, params)
    # Every prompt token and sampled token but the last (which generate never feeds) came from the store ...
    assert on.kv_tokens_reused == sum(len(on.encode(c)) + len(o.token_ids) - 1 for c, o in zip(openers, first))
    # ... and the sequences that the new ones extend were dropped: the store does not grow turn by turn.
    assert on.kv_store.num_entries == entries


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_small_chunks_and_mixed_batches_identical(model64, tiny_generator, params):
    on, off = _pair(model64, tiny_generator.tokenizer, batch_size=2)
    on.chat(OPENERS[:2], params, seeds=[1, 2])  # stored prefixes for two; the third and the new ones are fresh
    fresh = [[SYSTEM, {"role": "user", "content": "Name three prime numbers and say why they are prime."}]]
    batch = [*OPENERS, *fresh, OPENERS[0]]
    seeds = [3, 4, 5, 6, 7]
    assert on.chat(batch, params, seeds=seeds) == off.chat(batch, params, seeds=seeds)
    assert on.kv_tokens_reused > 0


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_eviction_under_a_small_budget_keeps_outputs(model64, tiny_generator, params):
    probe, off = _pair(model64, tiny_generator.tokenizer)
    probe.chat(OPENERS[:1], GREEDY)
    one_entry = probe.kv_store.nbytes
    small, _ = _pair(model64, tiny_generator.tokenizer, kv_cache_bytes=int(1.5 * one_entry))
    assert _play(small, params) == _play(off, params)
    assert small.kv_store.evictions > 0
    assert 0 < small.kv_store.nbytes <= small.kv_store.max_bytes


def test_weight_changes_empty_the_store(tiny_generator):
    model = copy.deepcopy(tiny_generator.model).double()
    on, off = _pair(model, tiny_generator.tokenizer)
    on.chat(OPENERS, GREEDY)
    on.chat(OPENERS, GREEDY)  # same weights: the store is kept and used
    assert on.kv_store.invalidations == 0 and on.kv_tokens_reused > 0

    # An optimizer step on the very module the generator wraps (as the trainer does).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    ids = torch.tensor([on.encode(OPENERS[0])])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    reused = on.kv_tokens_reused
    after_step = on.chat(OPENERS, GREEDY)
    assert on.kv_store.invalidations == 1 and on.kv_tokens_reused == reused
    assert after_step == off.chat(OPENERS, GREEDY)

    # load_state_dict of other weights (copied in place).
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    model.load_state_dict(other.state_dict())
    assert on.chat(OPENERS, GREEDY) == off.chat(OPENERS, GREEDY)
    assert on.kv_store.invalidations == 2

    # A write through .data bypasses the version counters; the sampled values still change.
    versions, before = [p._version for p in model.parameters()], weights_fingerprint(model)
    for p in model.parameters():
        p.data.add_(1e-3)
    assert [p._version for p in model.parameters()] == versions and weights_fingerprint(model) != before
    assert on.chat(OPENERS, GREEDY) == off.chat(OPENERS, GREEDY)
    assert on.kv_store.invalidations == 3

    # Another precision computes other KV.
    model.float()
    assert on.chat(OPENERS, GREEDY) == off.chat(OPENERS, GREEDY)
    assert on.kv_store.invalidations == 4
    assert all(k.dtype == torch.float32 for e in on.kv_store._entries.values() for k, _ in e.layers)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1GiB", None])
def test_bad_kv_cache_bytes_is_refused(tiny_generator, bad):
    with pytest.raises(GenerationError, match=r"kv_cache_bytes must be an int >= 0.*got"):
        TransformersGenerator(tiny_generator.model, tiny_generator.tokenizer, kv_cache_bytes=bad)


def test_llm_user_in_role_swap_style_identical(model64, tiny_generator):
    from refuel_env.users import LLMUser, UserRequest

    on, off = _pair(model64, tiny_generator.tokenizer)
    users = [LLMUser(g, style="role-swap", sampling=SamplingParams(max_new_tokens=10, temperature=1.0)) for g in (on, off)]
    dialogue = [{"role": "user", "content": "I need help planning a trip to the mountains for a week in June."}]
    for turn in range(3):
        dialogue.append({"role": "assistant", "content": f"Sure. Step {turn}: pack boots, a map and water."})
        request = UserRequest(messages=tuple(dialogue), item=None, turn=turn + 1, seed=40 + turn)
        a, b = (u.respond([request]) for u in users)
        assert a == b
        dialogue.append({"role": "user", "content": a[0].text or "ok"})
    # The role-swap cue ends every prompt and is gone at the next turn: the common prefix is still reused.
    assert on.kv_tokens_reused > 0


# --- The store on its own ---------------------------------------------------------------------


def _kv(n, fill=0.0):
    return [(torch.full((2, n, 4), fill), torch.full((2, n, 4), fill))]


def test_store_lookup_takes_the_longest_common_prefix_capped_below_the_prompt():
    store = KVStore(max_bytes=10**6, min_tokens=3)
    assert store.put([1, 2, 3, 4, 5, 6], _kv(6, 1.0))
    assert store.put([1, 2, 3, 9, 9], _kv(5, 2.0))
    assert not store.put([1, 2], _kv(2))  # shorter than min_tokens
    entry, n = store.lookup([1, 2, 3, 4, 5, 7, 8])
    assert n == 5 and entry.layers[0][0][0, 0, 0] == 1.0
    entry, n = store.lookup([1, 2, 3, 9, 9, 9])
    assert n == 5 and entry.layers[0][0][0, 0, 0] == 2.0
    assert store.lookup([1, 2, 3, 4, 5, 6])[1] == 5  # the whole stored sequence but one token left to feed
    assert store.lookup([1, 2, 7, 7, 7]) == (None, 0)  # shares 2 < min_tokens
    assert store.lookup([5, 5, 5, 5]) == (None, 0)


def test_store_drops_sequences_that_a_new_one_extends_and_skips_covered_ones():
    store = KVStore(max_bytes=10**6, min_tokens=2)
    store.put([1, 2, 3], _kv(3))
    store.put([1, 2, 3, 4, 5], _kv(5))
    assert store.num_entries == 1 and store.nbytes == 2 * 5 * 2 * 4 * 4
    assert not store.put([1, 2, 3, 4], _kv(4))
    assert store.num_entries == 1
    with pytest.raises(ValueError, match="3 tokens but KV of 4"):
        store.put([7, 8, 9], _kv(4))


def test_store_evicts_least_recently_used_within_its_budget():
    per_entry = 2 * 4 * 2 * 4 * 4  # keys and values, 2 heads x 4 positions x 4 dims, float32
    store = KVStore(max_bytes=2 * per_entry, min_tokens=2)
    store.put([1, 1, 1, 1], _kv(4))
    store.put([2, 2, 2, 2], _kv(4))
    assert store.lookup([1, 1, 1, 1, 9])[1] == 4  # touches the first
    store.put([3, 3, 3, 3], _kv(4))  # evicts the second, the least recently used
    assert store.evictions == 1 and store.nbytes == 2 * per_entry
    assert store.lookup([2, 2, 2, 2, 9]) == (None, 0)
    assert store.lookup([1, 1, 1, 1, 9])[1] == 4
    assert not store.put(list(range(100)), _kv(100))  # larger than the whole budget
    store.clear()
    assert store.num_entries == 0 and store.nbytes == 0 and store.invalidations == 1
    with pytest.raises(ValueError, match="max_bytes"):
        KVStore(max_bytes=0, min_tokens=2)


def test_common_prefix_length_of_arrays():
    from refuel_env.kv_store import common_prefix_length

    assert common_prefix_length(np.array([1, 2, 3]), np.array([1, 2, 4])) == 2
    assert common_prefix_length(np.array([1, 2]), np.array([1, 2, 4])) == 2
    assert common_prefix_length(np.array([5]), np.array([1])) == 0


def test_environments_share_one_transformers_user_generator_with_its_store():
    # Collection steps a dialogue in a vector environment of whatever size a turn needs; the user's
    # stored KV follows it only if every environment talks to the same generator.
    from refuel_env.components import make_config, user_generator

    first, second = user_generator(make_config()), user_generator(make_config(max_turns=2))
    assert first is second and isinstance(first, TransformersGenerator) and first.kv_store is not None


def test_a_stale_store_would_change_the_output_and_a_data_write_drops_it(tiny_generator):
    """The store must be emptied: on this model, KV of the old weights changes seeded samples (greedy ones of a
    random tiny model hardly depend on the past), so a generator that kept it would not match a fresh one."""
    model = copy.deepcopy(tiny_generator.model).double()
    on, off = _pair(model, tiny_generator.tokenizer)
    stale, _ = _pair(model, tiny_generator.tokenizer)
    stale._check_weights = lambda: None  # the invalidation switched off
    sampled = SamplingParams(max_new_tokens=4, temperature=1.0)
    first = on.chat(OPENERS, sampled, seeds=[1, 2, 3])
    assert stale.chat(OPENERS, sampled, seeds=[1, 2, 3]) == first
    convs = [_extend(c, o, FOLLOW_UPS[i]) for i, (c, o) in enumerate(zip(OPENERS, first))]
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():  # new weights written through .data, as DeepSpeed does: no version bump
            p.data.add_(0.2 * torch.randn_like(p))
    fresh = off.chat(convs, sampled, seeds=[4, 5, 6])
    reused = stale.kv_tokens_reused
    assert stale.chat(convs, sampled, seeds=[4, 5, 6]) != fresh and stale.kv_tokens_reused > reused
    reused = on.kv_tokens_reused
    assert on.chat(convs, sampled, seeds=[4, 5, 6]) == fresh
    assert on.kv_store.invalidations == 1 and on.kv_tokens_reused == reused


def test_the_weights_fingerprint_sees_a_data_write_to_any_one_value(tiny_generator):
    model = copy.deepcopy(tiny_generator.model)
    params = dict(model.named_parameters())
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "model.norm.weight"):
        p = params[name]
        for index in (1, p.numel() // 2 + 1, p.numel() - 1):  # the sample of every (numel // 64)-th value missed these
            before = weights_fingerprint(model)
            p.data.view(-1)[index] += 0.01
            assert weights_fingerprint(model) != before, (name, index)
            p.data.view(-1)[index] -= 0.01
    before = weights_fingerprint(model)
    embedding = model.get_input_embeddings().weight.data
    embedding[[3, 4]] = embedding[[4, 3]]  # two rows swapped: the same values, elsewhere
    assert weights_fingerprint(model) != before
