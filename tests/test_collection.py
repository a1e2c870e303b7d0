"""REFUEL's collection through the environment: exactly the tuples algorithm 1 defines."""

from __future__ import annotations

import pytest

from refuel_agents.collection import collect_refuel_tuples, play_dialogues
from refuel_env.generation import SamplingParams

SAMPLING = SamplingParams(max_new_tokens=6, temperature=1.0)


@pytest.fixture(scope="module")
def collected(tiny_generator, tiny_lm_dir):
    env_kwargs = {"user_model": str(tiny_lm_dir), "user_max_new_tokens": 6, "user_device": "cpu", "max_turns": 4}
    return collect_refuel_tuples(env_id="UltraInteractDialogue-v0", env_kwargs=env_kwargs, policy=tiny_generator,
                                 sampling=SAMPLING, num_prompts=12, seed=3, progress=False), env_kwargs


def test_tuples_follow_algorithm_one(collected):
    (rows, stats), _ = collected
    assert stats.tuples == len(rows) == 12 and stats.dropped_truncated == 0
    assert {r["H"] for r in rows} <= {1, 2, 3, 4} and len({r["H"] for r in rows}) > 1
    for r in rows:
        h, H = r["h"], r["H"]
        assert 1 <= h <= H
        state = r["state"]
        # s_h: h user turns and h - 1 responses, ending with the user.
        assert state[-1]["role"] == "user" and sum(m["role"] == "user" for m in state) == h
        for key, response in (("dialogue", r["response"]), ("dialogue_prime", r["response_prime"])):
            dialogue = r[key]
            assert dialogue[: len(state)] == state  # both branches start from the same s_h
            assert dialogue[len(state)] == {"role": "assistant", "content": response}
            assert len(dialogue) == 2 * H  # generated to H and no further
        assert isinstance(r["reward"], float) and isinstance(r["reward_prime"], float)


def test_branches_are_independent_samples(collected):
    (rows, _), _ = collected
    assert sum(r["response"] != r["response_prime"] for r in rows) >= len(rows) - 1


def test_collection_is_reproducible(collected, tiny_generator):
    (rows, _), env_kwargs = collected
    again, _ = collect_refuel_tuples(env_id="UltraInteractDialogue-v0", env_kwargs=env_kwargs, policy=tiny_generator,
                                     sampling=SAMPLING, num_prompts=12, seed=3, progress=False)
    assert again == rows


def test_roll_in_with_the_policy_before_h(collected):
    (rows, stats), _ = collected
    # Policy responses: h - 1 in the roll-in, then H - h + 1 in each branch.
    assert stats.policy_responses == sum(r["h"] - 1 + 2 * (r["H"] - r["h"] + 1) for r in rows)


def test_play_dialogues_at_fixed_horizons(tiny_generator, tiny_lm_dir):
    env_kwargs = {"user_model": str(tiny_lm_dir), "user_max_new_tokens": 4, "user_device": "cpu"}
    rows = play_dialogues(env_id="UltraInteractDialogue-v0", env_kwargs=env_kwargs, policy=tiny_generator,
                          sampling=SAMPLING, num_dialogues=4, seed=0, horizon=[1, 2, 3, 3], prompt_indices=[0, 0, 1, 1])
    assert [r["H"] for r in rows] == [1, 2, 3, 3]
    assert [len(r["dialogue"]) for r in rows] == [2, 4, 6, 6]
    assert rows[0]["dialogue"][0] == rows[1]["dialogue"][0]


def test_truncated_branches_are_dropped_and_counted(tiny_generator, tiny_lm_dir):
    env_kwargs = {"user_model": str(tiny_lm_dir), "user_max_new_tokens": 4, "user_device": "cpu",
                  "max_dialogue_tokens": 5}
    rows, stats = collect_refuel_tuples(env_id="UltraInteractDialogue-v0", env_kwargs=env_kwargs, policy=tiny_generator,
                                        sampling=SAMPLING, num_prompts=4, seed=0, progress=False)
    assert rows == [] and stats.dropped_truncated == 4 and stats.tuples == 0
    assert sum(stats.truncation_reasons.values()) == 4


def test_iterations_draw_different_prompts():
    from refuel_agents.prompt_plan import iteration_seed as _iteration_seed

    seeds = [_iteration_seed(1, t) for t in range(5)]
    assert len(set(seeds)) == 5 and min(abs(a - b) for a in seeds for b in seeds if a != b) > 1000


def test_rng_states_survive_json(tmp_path):
    import random

    import numpy as np
    import torch

    from refuel_agents.checkpoint import rng_states, set_rng_states, write_json_atomic

    write_json_atomic(tmp_path / "s.json", rng_states())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_states(__import__("json").loads((tmp_path / "s.json").read_text()))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
