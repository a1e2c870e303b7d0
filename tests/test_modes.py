"""The baselines' data modes (paper section 4.1): whose roll-in, which turn, whose responses, whose rewards.

The policy is the 32-word LM of conftest, so its samples are recognisable: every word of a policy
response is one of its vocabulary's, while the dataset's responses are English text with words
outside it.
"""

from __future__ import annotations

import numpy as np
import pytest

from refuel_agents.modes import collect_pairs, dataset_items, draw_items, usable_for
from refuel_env.generation import SamplingParams, TransformersGenerator
from refuel_env.rewards import TrajectoryRewardModel
from refuel_env.types import DialogueItem
from tests.conftest import WORDS

SAMPLING = SamplingParams(max_new_tokens=5, temperature=1.0)
POLICY_WORDS = set(WORDS) | {"[UNK]", "system", "user", "assistant"}


class LengthReward(TrajectoryRewardModel):
    """Characters of the assistant's turns, weighted by turn (any deterministic function of the dialogue)."""

    name = "assistant-length"
    max_length = None

    def _score(self, dialogues):
        return np.asarray([sum((k + 1) * len(m["content"]) for k, m in enumerate(d) if m["role"] == "assistant") / 100
                           for d in dialogues])

    def count_tokens(self, dialogue):
        return sum(len(m["content"].split()) for m in dialogue)


REWARD = LengthReward()
ENV = "UltraInteractDialogue-v0"
ENV_KWARGS = {"user": "instant", "max_turns": 3, "tokenizer": None, "reward_model": REWARD}


def is_policy_text(text: str) -> bool:
    return set(text.split()) <= POLICY_WORDS


def assistant_turns(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def policy(word_lm_dir):
    return TransformersGenerator.from_pretrained(str(word_lm_dir), device="cpu")


@pytest.fixture(scope="module")
def items():
    found, horizons = dataset_items(ENV, ENV_KWARGS)
    return {item.item_id: item for item in found}, found


@pytest.fixture(scope="module")
def multi_turn(items):
    """Indices of dataset dialogues with at least two turns (repeated), so that h < H can happen."""
    indices = [i for i, item in enumerate(items[1]) if item.num_turns >= 2]
    assert len(indices) >= 5, "the shipped UltraInteract sample should have multi-turn dialogues"
    return indices * 2


def collect(mode, policy, **kw):
    kw.setdefault("num_prompts", 8)
    return collect_pairs(mode=mode, env_id=kw.pop("env_id", ENV), env_kwargs=kw.pop("env_kwargs", ENV_KWARGS),
                         policy=policy, sampling=SAMPLING, seed=kw.pop("seed", 5), progress=False, **kw)


def check_common(rows, mode):
    for r in rows:
        assert r["mode"] == mode
        state = r["state"]
        assert state[-1]["role"] == "user" and sum(m["role"] == "user" for m in state) == r["h"]
        for key, response, reward in (("dialogue", r["response"], r["reward"]),
                                      ("dialogue_prime", r["response_prime"], r["reward_prime"])):
            dialogue = r[key]
            assert dialogue[: len(state)] == state
            assert dialogue[len(state)] == {"role": "assistant", "content": response}
            assert sum(m["role"] == "user" for m in dialogue) == r["H"] and dialogue[-1]["role"] == "assistant"
            assert reward == pytest.approx(float(REWARD.score([dialogue])[0]))  # the environment's reward


def test_lt_online_rolls_in_with_the_policy_and_trains_the_last_turn(policy):
    rows, stats = collect("lt-online", policy, num_prompts=12)
    assert stats.tuples == len(rows) == 12 and stats.mode == "lt-online"
    check_common(rows, "lt-online")
    assert all(r["h"] == r["H"] for r in rows) and len({r["H"] for r in rows}) > 1
    assert any(r["H"] > 1 for r in rows)
    for r in rows:
        assert all(is_policy_text(t) for t in assistant_turns(r["state"]))  # on-policy roll-in
        assert is_policy_text(r["response"]) and is_policy_text(r["response_prime"])
    # Roll-in of H - 1 responses, then two responses at H.
    assert stats.policy_responses == sum(r["H"] - 1 + 2 for r in rows)


def test_lt_mixed_takes_the_dataset_state_and_two_policy_responses(policy, items, multi_turn):
    by_id, _ = items
    rows, stats = collect("lt-mixed", policy, num_prompts=None, prompt_indices=multi_turn)
    assert len(rows) == len(multi_turn) and stats.policy_responses == 2 * len(rows)
    check_common(rows, "lt-mixed")
    for r in rows:
        item = by_id[r["item_id"]]
        assert r["h"] == r["H"] == item.num_turns
        assert r["state"] == item.prefix(item.num_turns)  # the dataset's s_H
        assert not any(is_policy_text(t) for t in assistant_turns(r["state"]))
        assert is_policy_text(r["response"]) and is_policy_text(r["response_prime"])


def test_mt_mixed_draws_h_and_rolls_out_from_the_dataset_state(policy, items, multi_turn):
    by_id, _ = items
    rows, stats = collect("mt-mixed", policy, num_prompts=None, prompt_indices=multi_turn)
    assert len(rows) == len(multi_turn)
    check_common(rows, "mt-mixed")
    assert any(r["h"] < r["H"] for r in rows) and any(r["h"] == r["H"] for r in rows)
    for r in rows:
        item = by_id[r["item_id"]]
        assert r["H"] == item.num_turns and 1 <= r["h"] <= r["H"]
        assert r["state"] == item.prefix(r["h"])  # the dataset's s_h
        for dialogue in (r["dialogue"], r["dialogue_prime"]):
            assert all(is_policy_text(t) for t in assistant_turns(dialogue)[r["h"] - 1 :])  # policy from h to H
    assert stats.policy_responses == sum(2 * (r["H"] - r["h"] + 1) for r in rows)


def test_mt_mixed_with_presampled_questions_asks_the_dataset_questions(policy):
    env_id, env_kwargs = "UltraInteractPresampled-v0", {**ENV_KWARGS, "user": "presampled"}
    found, _ = dataset_items(env_id, env_kwargs)
    by_id = {item.item_id: item for item in found}
    indices = [i for i, item in enumerate(found) if item.num_turns == 3] * 4
    assert indices
    rows, _ = collect("mt-mixed", policy, env_id=env_id, env_kwargs=env_kwargs, num_prompts=None,
                      prompt_indices=indices)
    assert len(rows) == len(indices) and any(r["h"] < r["H"] for r in rows)
    for r in rows:
        for dialogue in (r["dialogue"], r["dialogue_prime"]):
            assert tuple(m["content"] for m in dialogue if m["role"] == "user") == by_id[r["item_id"]].questions


def test_lt_offline_compares_the_dataset_pair(items):
    by_id, found = items
    rows, stats = collect("lt-offline", None, num_prompts=None)
    usable = [item for item in found if not usable_for("lt-offline", item, 3)]
    assert len(rows) == stats.usable_items == len(usable) == len(found)  # every sample item has its pair
    assert stats.policy_responses == 0
    check_common(rows, "lt-offline")
    for r in rows:
        item = by_id[r["item_id"]]
        assert r["h"] == r["H"] == item.num_turns
        assert r["state"] == item.prefix(item.num_turns)
        assert (r["response"], r["response_prime"]) == (item.chosen, item.rejected)


def test_modes_are_reproducible(policy):
    for mode in ("lt-mixed", "mt-mixed"):
        a, _ = collect(mode, policy, num_prompts=6, seed=9)
        b, _ = collect(mode, policy, num_prompts=6, seed=9)
        assert a == b


def test_draws_cover_usable_items_before_repeating(policy):
    rows, stats = collect("lt-offline", None, num_prompts=stats_usable() + 3, seed=2)
    ids = [r["item_id"] for r in rows]
    first = ids[: stats.usable_items]
    assert len(set(first)) == len(first) == stats.usable_items


def stats_usable() -> int:
    found, horizons = dataset_items(ENV, ENV_KWARGS)
    return sum(not usable_for("lt-offline", item, H) for item, H in zip(found, horizons))


def test_unusable_items_are_counted_and_none_usable_is_a_clear_error(policy):
    rng = np.random.default_rng(0)
    paired = DialogueItem("a", "test", ("q1", "q2"), ("r1", "r2"), chosen="r2", rejected="worse")
    unpaired = DialogueItem("b", "test", ("q1",), ("r1",))
    no_history = DialogueItem("c", "test", ("q1", "q2"), (None, "r2"), chosen="r2", rejected="worse")
    items, horizons = [paired, unpaired, no_history], [3, 3, 3]
    indices, n_usable, unusable = draw_items("lt-offline", items, horizons, 4, None, rng, "env")
    assert indices == [0, 0, 0, 0] and n_usable == 1
    assert unusable == {"no chosen/rejected pair at the last turn": 1, "no dataset response before the last turn": 1}
    indices, n_usable, _ = draw_items("lt-mixed", items, horizons, None, None, rng, "env")
    assert sorted(indices) == [0, 1] and n_usable == 2  # lt-mixed does not need the pair
    with pytest.raises(ValueError, match="has no usable dialogue.*chosen/rejected pair"):
        draw_items("lt-offline", [unpaired], [3], 4, None, rng, "env")
    with pytest.raises(ValueError, match="more turns than the longest horizon"):
        draw_items("mt-mixed", [paired], [1], 4, None, rng, "env")
    with pytest.raises(ValueError, match="prompt index 1 cannot start a 'lt-offline' pair: no chosen/rejected"):
        draw_items("lt-offline", items, horizons, None, [0, 1], rng, "env")
    with pytest.raises(ValueError, match="unknown data mode"):
        collect("lt-bogus", policy)
    with pytest.raises(ValueError, match="samples responses from the policy"):
        collect("lt-mixed", None)


def test_truncated_branches_are_dropped_and_counted(policy):
    env_kwargs = {**ENV_KWARGS, "tokenizer": "embedded", "max_dialogue_tokens": 5}
    for mode in ("lt-mixed", "lt-offline"):
        rows, stats = collect(mode, policy if mode != "lt-offline" else None, env_kwargs=env_kwargs, num_prompts=4)
        assert rows == [] and stats.dropped_truncated == 4 and stats.tuples == 0


def test_lt_offline_charges_no_kl_on_the_dataset_replies(items):
    calls = []

    def kl_logprobs(states, responses, completions):
        calls.append(len(responses))
        return [-1.0] * len(responses), [-2.0] * len(responses)

    rows, _ = collect("lt-offline", None, num_prompts=8, kl_logprobs=kl_logprobs,
                      env_kwargs={**ENV_KWARGS, "kl_coef": 0.1})
    assert len(rows) == 8 and sum(calls) == 0  # the dataset's own replies are not the policy's: no penalty
    for r in rows:
        assert r["reward"] == pytest.approx(float(REWARD.score([r["dialogue"]])[0]))
