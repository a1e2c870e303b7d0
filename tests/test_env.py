"""The environment: Gymnasium conformance, snapshots, prefixes, the vector env, and bad input."""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refuel_env
from refuel_env.core import EpisodeError
from refuel_env.snapshot import SnapshotError

LLM_ID = "UltraInteractDialogue-v0"


@pytest.fixture(scope="module")
def user_kwargs(tiny_lm_dir):
    """A tiny random Llama plays the user: fast, real transformers generation."""
    return {"user_model": str(tiny_lm_dir), "user_max_new_tokens": 8, "user_device": "cpu"}


def make(env_id=LLM_ID, user_kwargs=None, **kwargs):
    extra = dict(user_kwargs or {}) if env_id == LLM_ID else {}
    return gym.make(env_id, disable_env_checker=True, **extra, **kwargs).unwrapped


def play(env, actions):
    """Step with the actions until the episode ends; the transcript and the rewards."""
    rewards = []
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        if terminated or truncated:
            return obs, rewards, info
    raise AssertionError("the episode did not end")


@pytest.mark.parametrize("env_id", sorted(refuel_env.ENV_IDS))
def test_check_env_passes(env_id, user_kwargs):
    check_env(make(env_id, user_kwargs), skip_render_check=False)


def test_registered_ids_make_with_module_prefix(user_kwargs):
    env = gym.make("refuel_env:UltraInteractPresampled-v0")
    assert env.spec.id == "UltraInteractPresampled-v0"


def test_episode_flow_and_info(user_kwargs):
    env = make(user_kwargs=user_kwargs)
    obs, info = env.reset(seed=0, options={"horizon": 3, "index": 2})
    assert obs[-1]["role"] == "user" and (info["turn"], info["horizon"]) == (1, 3)
    assert info["item_id"] == env.core.items[2].item_id
    for h in (1, 2):
        obs, reward, terminated, truncated, info = env.step(f"answer {h}")
        assert (reward, terminated, truncated, info["turn"]) == (0.0, False, False, h + 1)
        assert obs[-2] == {"role": "assistant", "content": f"answer {h}"} and obs[-1]["role"] == "user"
        assert isinstance(info["user_parsed"], bool) and info["user_prompt_tokens"] > 0
    obs, reward, terminated, truncated, info = env.step("answer 3")
    assert terminated and not truncated and info["turn"] == 4 and len(obs) == 6
    assert reward == info["reward_parts"]["reward"] == info["reward_parts"]["model_score"]
    assert np.isfinite(reward)
    assert 0 <= info["user_parse_failures"] <= 2
    assert info["response_tokens"] > 0


def test_horizon_is_sampled_uniformly(user_kwargs):
    env = make(user_kwargs=user_kwargs)
    env.reset(seed=0)
    horizons = [env.reset()[1]["horizon"] for _ in range(300)]
    counts = np.bincount(horizons, minlength=6)[1:]
    assert set(horizons) == {1, 2, 3, 4, 5} and counts.min() > 30


def _replay(env, options, actions, seed=None):
    env.reset(seed=seed, options=options)
    obs, rewards, info = play(env, actions)
    return obs, rewards


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    actions=st.lists(st.text(max_size=30), min_size=4, max_size=4),
    cut=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
    index=st.integers(0, 9),
)
def test_snapshot_restore_replays_identically(user_kwargs, actions, cut, seed, index):
    env = make(user_kwargs=user_kwargs)
    env.reset(seed=seed, options={"horizon": 4, "index": index})
    for action in actions[:cut]:
        env.step(action)
    snap = env.snapshot()
    first = play(env, actions[cut:])[:2]
    copy = pickle.loads(pickle.dumps(snap))
    assert copy == snap
    for restored in (snap, copy, snap):
        assert _replay(env, {"snapshot": restored}, actions[cut:]) == first
    # With a seed the user's random stream is reseeded: the same seed gives the same branch.
    assert _replay(env, {"snapshot": snap}, actions[cut:], seed=7) == _replay(
        env, {"snapshot": snap}, actions[cut:], seed=7
    )
    with pytest.raises(AttributeError):
        snap.turn = 3  # snapshots are immutable


def test_snapshot_in_info_matches_env(user_kwargs):
    env = make(user_kwargs=user_kwargs)
    _, info = env.reset(seed=1, options={"horizon": 2})
    assert info["snapshot"] == env.snapshot()
    _, _, _, _, info = env.step("hi")
    assert info["snapshot"] == env.snapshot() and info["snapshot"].turn == 2


def _raw_user_outputs(env, snap, seed):
    env.reset(seed=seed, options={"snapshot": snap})
    raws = []
    for action in ["x", "y"]:
        raws.append(env.step(action)[-1]["user_raw_output"])
    return raws


def test_seeded_branches_differ(user_kwargs):
    env = make(user_kwargs=user_kwargs, user_temperature=1.0)
    env.reset(seed=3, options={"horizon": 3, "index": 0})
    snap = env.snapshot()
    a, b = _raw_user_outputs(env, snap, 1), _raw_user_outputs(env, snap, 2)
    assert a != b  # different seeds: the user samples differently
    assert a == _raw_user_outputs(env, snap, 1)


def test_prefix_reset(user_kwargs):
    env = make(user_kwargs=user_kwargs)
    prefix = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And times 4?"},
    ]
    obs, info = env.reset(seed=0, options={"prefix": prefix, "horizon": 3})
    assert obs == prefix and (info["turn"], info["horizon"]) == (2, 3)
    assert info["item_id"].startswith("prefix-")
    obs, reward, terminated, *_ = env.step("20")
    assert not terminated and len(obs) == 5
    # Without a horizon, H is drawn from h..max_turns.
    horizons = {env.reset(options={"prefix": prefix})[1]["horizon"] for _ in range(40)}
    assert horizons == {2, 3, 4, 5}


def test_presampled_prefix_from_dataset_item():
    env = make("AnthropicHHPresampled-v0")
    index = next(i for i, it in enumerate(env.core.items) if it.num_turns >= 2 and all(it.responses[:1]))
    item = env.core.items[index]
    obs, info = env.reset(seed=0, options={"index": index, "prefix": item.prefix(2), "horizon": 2})
    assert obs == item.prefix(2) and info["turn"] == 2
    *_, terminated, _, info = env.step("ok")
    assert terminated and info["item_id"] == item.item_id


def test_presampled_user_asks_the_dataset_questions():
    env = make("UltraInteractPresampled-v0")
    index = next(i for i, it in enumerate(env.core.items) if it.num_turns >= 3)
    item = env.core.items[index]
    obs, _ = env.reset(seed=0, options={"index": index, "horizon": 3})
    obs, *_ = env.step("first")
    obs, *_ = env.step("second")
    assert [m["content"] for m in obs if m["role"] == "user"] == list(item.questions[:3])
    with pytest.raises(ValueError, match=f"horizon must be an int in 1..{min(5, item.num_turns)}"):
        env.reset(options={"index": index, "horizon": item.num_turns + 1})


def test_vector_env_equals_single_envs(user_kwargs):
    n = 3
    vec = gym.make_vec(LLM_ID, num_envs=n, vectorization_mode="vector_entry_point", **user_kwargs)
    singles = [make(user_kwargs=user_kwargs) for _ in range(n)]
    options = {"horizon": [1, 2, 3]}
    vobs, vinfo = vec.reset(seed=11, options=options)
    sobs = [env.reset(seed=11 + i, options={"horizon": h})[0] for i, (env, h) in enumerate(zip(singles, [1, 2, 3]))]
    assert list(vobs) == sobs
    done = np.zeros(n, bool)
    for t in range(3):
        actions = [f"reply {t} from env {i}" for i in range(n)]
        vobs, vrew, vterm, vtrunc, vinfo = vec.step(actions)
        for i, env in enumerate(singles):
            if done[i]:
                continue  # the vector env autoresets this one now
            obs, rew, term, trunc, info = env.step(actions[i])
            assert vobs[i] == obs and vrew[i] == rew and vterm[i] == term and vtrunc[i] == trunc
            assert vinfo["turn"][i] == info["turn"]
        done |= vterm | vtrunc
    assert done.all() and vterm[2]
    # The step after an episode ends resets it (next-step autoreset): its action is ignored.
    vobs, vrew, *_ = vec.step(["ignored"] * n)
    assert len(vobs[2]) == 1 and vobs[2][0]["role"] == "user" and vrew[2] == 0.0


def test_vector_env_per_env_snapshot_and_mask(user_kwargs):
    vec = gym.make_vec(LLM_ID, num_envs=2, vectorization_mode="vector_entry_point", **user_kwargs).unwrapped
    vec.reset(seed=0, options={"horizon": 3})
    vec.step(["a", "b"])
    snap = vec.snapshot(0)
    before = vec._observations()[1]
    obs, info = vec.reset(options={"snapshot": [snap, None], "reset_mask": np.array([True, False])})
    assert obs[0] == snap.messages and obs[1] == before
    assert info["_turn"].tolist() == [True, False]
    obs, _ = vec.reset(options={"snapshot": [snap, snap]})
    assert obs[0] == obs[1] == snap.messages


def test_render_ansi(user_kwargs):
    env = make(user_kwargs=user_kwargs, render_mode="ansi")
    env.reset(seed=0, options={"horizon": 2})
    env.step("Here is my answer.")
    text = env.render()
    assert "[assistant]\nHere is my answer." in text and "turn 2/2" in text


# ---------------------------------------------------------------- bad input


def test_bad_actions_and_order(user_kwargs):
    env = make(user_kwargs=user_kwargs)
    with pytest.raises(EpisodeError, match="before reset"):
        env.step("hi")
    env.reset(seed=0, options={"horizon": 1})
    before = env.snapshot()
    with pytest.raises(TypeError, match="must be the assistant's message as a str, got int"):
        env.step(42)
    assert env.snapshot() == before  # nothing changed
    env.step("done")
    with pytest.raises(EpisodeError, match="after the episode ended"):
        env.step("more")


def test_bad_reset_options(user_kwargs):
    env = make(user_kwargs=user_kwargs)
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"snapshots": 1})
    with pytest.raises(ValueError, match="roles must alternate"):
        env.reset(options={"prefix": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    with pytest.raises(ValueError, match="must end with a user message"):
        env.reset(options={"prefix": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    with pytest.raises(ValueError, match="index"):
        env.reset(options={"index": 10_000})
    with pytest.raises(ValueError, match="horizon"):
        env.reset(options={"horizon": 6})


def test_snapshot_from_other_configuration_is_refused(user_kwargs):
    env = make(user_kwargs=user_kwargs)
    env.reset(seed=0)
    other = make(user_kwargs=user_kwargs, max_turns=3)
    with pytest.raises(SnapshotError, match="configuration"):
        other.reset(options={"snapshot": env.snapshot()})


def test_too_long_dialogue_is_truncated_with_reason(user_kwargs):
    env = make(user_kwargs=user_kwargs, max_dialogue_tokens=30)
    env.reset(seed=0, options={"horizon": 2})
    _, reward, terminated, truncated, info = env.step("word " * 100)
    assert truncated and not terminated and reward == 0.0
    assert "more than max_dialogue_tokens=30" in info["truncation_reason"]
    with pytest.raises(EpisodeError):
        env.step("x")


def test_kl_and_truncation_penalties_through_the_env():
    env = make("UltraInteractPresampled-v0", kl_coef=0.5, max_response_tokens=5, truncation_penalty=-4.0)
    env.reset(seed=0, options={"horizon": 1})
    with pytest.raises(ValueError, match="set_logprobs"):
        env.step("short")
    env.set_logprobs(policy=-3.0, reference=-5.0)
    *_, terminated, _, info = env.step("short")
    parts = info["reward_parts"]
    assert terminated and parts["kl_penalty"] == pytest.approx(0.5 * (-3.0 + 5.0))
    assert parts["reward"] == pytest.approx(parts["model_score"] - 1.0)
    env.reset(seed=0, options={"horizon": 1})
    env.set_logprobs(policy=-3.0, reference=-5.0)
    _, reward, *_, info = env.step("this response is much longer than five tokens")
    # Gamma replaces the model score (left out of the parts); the KL penalty still applies.
    assert info["response_hit_length_limit"] and "model_score" not in info["reward_parts"]
    assert reward == pytest.approx(-4.0 - 1.0)


def test_nan_reward_raises_and_keeps_the_episode():
    from refuel_env.rewards import RewardModelError, TrajectoryRewardModel

    class NaNReward(TrajectoryRewardModel):
        name = "nan"
        max_length = None

        def _score(self, dialogues):
            return np.full(len(dialogues), np.nan)

        def count_tokens(self, dialogue):
            return 1

    env = make("UltraInteractPresampled-v0", reward_model=NaNReward())
    env.reset(seed=0, options={"horizon": 1})
    before = env.snapshot()
    with pytest.raises(RewardModelError, match="NaN"):
        env.step("answer")
    assert env.snapshot() == before


def test_unavailable_paper_models_fail_clearly():
    from refuel_env.generation import GenerationError

    with pytest.raises(GenerationError, match="(?s)meta-llama/Llama-3.1-70B-Instruct.*local path"):
        gym.make(LLM_ID, user_model="meta-llama/Llama-3.1-70B-Instruct")
    with pytest.raises(OSError, match="ArmoRM"):
        gym.make("UltraInteractPresampled-v0", reward_model="armorm")


def test_the_spec_shows_the_configuration_an_id_makes():
    """gym.spec(id).kwargs holds every argument with the value the id uses; presets still apply over it."""
    import dataclasses

    from refuel_env import CONFIG_DEFAULTS, ENV_IDS, SYNTHETIC_DEFAULTS
    from refuel_env.components import EnvConfig, make_config, preset_kwargs, spec_config
    from refuel_env.synthetic import SyntheticEnvConfig

    assert CONFIG_DEFAULTS == {f.name: f.default for f in dataclasses.fields(EnvConfig) if f.name not in ("dataset", "user")}
    assert SYNTHETIC_DEFAULTS == dataclasses.asdict(SyntheticEnvConfig())
    for env_id, chosen in ENV_IDS.items():
        kwargs = gym.spec(env_id).kwargs
        assert kwargs == dataclasses.asdict(EnvConfig(**chosen)), env_id
    assert gym.spec("SyntheticDialogue-v0").kwargs == {"max_turns": 3, "split": "train", "kl_coef": 0.0, "behaviour": "mixed"}
    # Through gym.make, with a preset, an argument at its default takes the preset's value; one that differs
    # overrides it.
    given = {"data_source": "/data/ui.jsonl", "kl_coef": 0.5, "tokenizer": "embedded"}
    config = spec_config("paper-setting-two-ultrainteract", **{**gym.spec("UltraInteractPresampled-v0").kwargs, **given})
    assert (config.truncation_penalty, config.max_dialogue_tokens, config.reward_model) == (-4.0, 3200, "fsfairx")
    assert (config.data_source, config.kl_coef, config.user) == ("/data/ui.jsonl", 0.5, "presampled")
    assert config.tokenizer == "meta-llama/Meta-Llama-3-8B-Instruct"  # given, but equal to the default: hidden
    # make_config and preset_kwargs (what the trainer and the evaluation pass to gym.make) let every argument
    # given win, the default values included.
    assert make_config("paper-setting-two-ultrainteract", **given).tokenizer == "embedded"
    kwargs = preset_kwargs("UltraInteractPresampled-v0", "paper-setting-two-ultrainteract", given)
    assert "preset" not in kwargs and set(kwargs) == set(gym.spec("UltraInteractPresampled-v0").kwargs)
    assert (kwargs["tokenizer"], kwargs["truncation_penalty"], kwargs["data_source"]) == ("embedded", -4.0, "/data/ui.jsonl")
    with pytest.raises(ValueError, match="preset 'paper-setting-two-ultrainteract' is for user='presampled'"):
        preset_kwargs("UltraInteractDialogue-v0", "paper-setting-two-ultrainteract", {})
    assert preset_kwargs("UltraInteractDialogue-v0", None, {"max_turns": 2}) == {"max_turns": 2}


def test_time_limit_counts_steps_from_a_snapshot_restore():
    """TimeLimit counts steps since the last reset, and a restore is a reset: from a turn-2 snapshot of a
    3-turn dialogue, TimeLimit(2) allows two more steps; the second is also the dialogue's last turn, so it
    ends with terminated (the reward is final) and truncated both True. From turn 1 it truncates first."""
    from gymnasium.wrappers import TimeLimit

    env = TimeLimit(gym.make("SyntheticDialogue-v0").unwrapped, max_episode_steps=2)
    env.reset(seed=0, options={"horizon": 3})
    at_turn_1 = env.unwrapped.snapshot()
    *_, info = env.step("ask")
    at_turn_2 = info["snapshot"]
    env.reset(options={"snapshot": at_turn_2})
    assert env.step("answer")[2:4] == (False, False)
    _, reward, terminated, truncated, info = env.step("answer")
    assert (terminated, truncated, info["turn"]) == (True, True, 4) and "reward_parts" in info
    env.reset(options={"snapshot": at_turn_1})
    env.step("ask")
    _, reward, terminated, truncated, info = env.step("ask")
    assert (terminated, truncated, reward, info["turn"]) == (False, True, 0.0, 3)
