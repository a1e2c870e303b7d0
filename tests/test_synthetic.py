"""SyntheticDialogue-v0: the environment, the exactness of its policy, and REFUEL's claims against exact Q-values."""

from __future__ import annotations

import copy
import math
import pickle
from collections import Counter

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import refuel_env  # noqa: F401
from refuel_agents.collection import collect_refuel_tuples
from refuel_agents.exact import (
    exact_metrics,
    fit_refuel_minimiser,
    grouped_unbiasedness,
    policy_table,
    tuple_q_gaps,
)
from refuel_agents.logprobs import collate, encode_response, sequence_logprobs
from refuel_env import synthetic_exact as sx
from refuel_env.generation import SamplingParams, TransformersGenerator
from refuel_env.rewards import RewardModelError
from refuel_env.synthetic import (
    BEHAVIOUR_POLICY,
    INVALID,
    MOVES,
    RESPONSES,
    STATES,
    TRANSITIONS,
    UTILITY,
    SyntheticReward,
    SyntheticUser,
    build_synthetic_policy,
    make_items,
    move_of,
    start_distribution,
)
from refuel_env.users import UserRequest

ENV_ID = "SyntheticDialogue-v0"
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27}  # chi-square quantiles at 0.999 by degrees of freedom


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs far faster on one thread than on two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return build_synthetic_policy(tmp_path_factory.mktemp("synthetic-policy"), seed=0)


@pytest.fixture(scope="module")
def generator(policy_dir):
    return TransformersGenerator.from_pretrained(str(policy_dir), device="cpu")


def make(**kwargs):
    return gym.make(ENV_ID, disable_env_checker=True, **kwargs).unwrapped


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


# ------------------------------------------------------------------------------ environment


def test_check_env_passes():
    check_env(make(), skip_render_check=False)


def test_registered_with_a_vector_entry_point():
    env = gym.make(f"refuel_env:{ENV_ID}")
    assert env.spec.id == ENV_ID
    vec = gym.make_vec(ENV_ID, num_envs=3, vectorization_mode="vector_entry_point")
    obs, info = vec.reset(seed=0)
    assert len(obs) == 3 and all(o[-1]["content"] in STATES for o in obs)


def test_moves_rewards_and_info():
    env = make()
    obs, info = env.reset(seed=3, options={"index": 2, "horizon": 3})  # item 2 starts clear
    assert obs == [{"role": "user", "content": "clear"}] and (info["turn"], info["horizon"]) == (1, 3)
    moves = [" answer ", "tell me more", "hint"]
    states = ["clear"]
    for h, action in enumerate(moves, 1):
        obs, reward, terminated, truncated, info = env.step(action)
        assert not truncated and info["action_tokens"] == len(action.split())
        if h < 3:
            assert reward == 0.0 and not terminated and obs[-1]["content"] in STATES
            states.append(obs[-1]["content"])
    assert terminated and info["turn"] == 4
    expected = sum(UTILITY[z][move_of(a)] for z, a in zip(states, moves))
    assert reward == pytest.approx(expected) and info["reward_parts"]["model_score"] == pytest.approx(expected)
    assert move_of("tell me more") == INVALID and move_of("") == INVALID and move_of("ask") == "ask"


def test_user_draws_follow_the_transition_table():
    user = SyntheticUser()
    for state, move in (("vague", "ask"), ("lost", "hint"), ("clear", INVALID)):
        reply = move if move != INVALID else "what"
        messages = ({"role": "user", "content": state}, {"role": "assistant", "content": reply})
        item = make_items("train")[0]
        turns = user.respond([UserRequest(messages=messages, item=item, turn=1, seed=s) for s in range(4000)])
        counts = np.array([sum(t.text == z for t in turns) for z in STATES])
        probs = np.array([TRANSITIONS[state][move].get(z, 0.0) for z in STATES])
        assert counts[probs == 0].sum() == 0
        assert chi_square(counts, probs) < CHI2_999[int((probs > 0).sum()) - 1 or 1]


def _play(env, actions):
    out = []
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        out.append((tuple(m["content"] for m in obs), reward))
        if terminated or truncated:
            return out
    raise AssertionError("the episode did not end")


@pytest.mark.parametrize("cut", [0, 1, 2])
def test_snapshot_restore_replays_identically(cut):
    env = make()
    actions = ["ask", "hint", "nonsense"]
    env.reset(seed=5, options={"horizon": 3, "index": 1})
    for action in actions[:cut]:
        env.step(action)
    snap = env.snapshot()
    first = _play(env, actions[cut:])
    for restored in (snap, pickle.loads(pickle.dumps(snap))):
        env.reset(options={"snapshot": restored})
        assert _play(env, actions[cut:]) == first
    branches = set()
    for seed in range(30):  # reseeded restores draw the user's stream anew
        env.reset(seed=seed, options={"snapshot": snap})
        branches.add(tuple(_play(env, actions[cut:])))
    if cut < 2:
        assert len(branches) > 1


def test_vector_env_equals_single_envs():
    n = 4
    vec = gym.make_vec(ENV_ID, num_envs=n, vectorization_mode="vector_entry_point")
    singles = [make() for _ in range(n)]
    obs, info = vec.reset(seed=10, options={"horizon": 3})
    single_obs = [env.reset(seed=10 + i, options={"horizon": 3})[0] for i, env in enumerate(singles)]
    assert list(obs) == single_obs
    for actions in (["ask", "answer", "hint", "x"], ["answer", "", "ask", "hint"], ["hint"] * 4):
        obs, rewards, terminated, truncated, _ = vec.step(actions)
        for i, env in enumerate(singles):
            o, r, t, tr, _ = env.step(actions[i])
            assert (obs[i], rewards[i], terminated[i], truncated[i]) == (o, r, t, tr)
    assert terminated.all()


def test_bad_arguments_and_foreign_prefixes_fail_clearly():
    with pytest.raises(TypeError, match="unknown SyntheticDialogue-v0 argument"):
        make(user="llm")
    with pytest.raises(ValueError, match="max_turns"):
        make(max_turns=4)
    with pytest.raises(ValueError, match="split"):
        make(split="validation")
    env = make()
    for horizon in (1, 2):  # refused at reset, not at a later step
        with pytest.raises(ValueError, match="invalid 'prefix' for reset: the synthetic task's user messages are one of"):
            env.reset(seed=0, options={"prefix": [{"role": "user", "content": "hello there"}], "horizon": horizon})
    with pytest.raises(RewardModelError, match="user messages are one of"):
        SyntheticReward().score([[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "ask"}]])


def test_offline_items_come_from_the_behaviour_policy():
    items = make_items("train")
    assert start_distribution("train") == {"vague": 0.5, "clear": 0.25, "lost": 0.25}
    assert Counter((it.questions[0], it.num_turns) for it in items) == Counter(
        {(z, k): 4 * (2 if z == "vague" else 1) for z in STATES for k in (1, 2, 3)})
    for it in items:
        assert all(r in MOVES for r in it.responses) and it.chosen != it.rejected
        last = it.questions[-1]
        assert UTILITY[last][it.chosen] > UTILITY[last][it.rejected]
        assert it.prefix(it.num_turns)[-1] == {"role": "user", "content": last}
    moves = Counter((it.questions[0], it.responses[0]) for it in items)
    assert moves[("clear", "answer")] > moves[("clear", "ask")]  # not the initial policy's near-uniform choice
    assert set(BEHAVIOUR_POLICY) == set(STATES)
    assert make_items("train") == items  # deterministic


# ------------------------------------------------------------------------------ exactness


def test_policy_gives_single_token_responses_exactly(generator):
    table = policy_table(generator.model, generator.tokenizer)  # raises unless every row sums to 1 (1e-4)
    assert len(table) == len(sx.enumerate_states(3))
    tok, model = generator.tokenizer, generator.model
    state = sx.messages_of(("vague", "ask", "clear"))
    prompt = tok(tok.apply_chat_template(state, add_generation_prompt=True, tokenize=False), add_special_tokens=False,
                 return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = torch.log_softmax(model(prompt).logits[0, -1].float(), -1)
        allowed = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", *MOVES)]
        others = [i for i in range(len(first)) if i not in allowed]
        assert first[others].max() < -100  # no other first token in float32
        for move in MOVES:
            after = torch.cat([prompt, torch.tensor([[tok.convert_tokens_to_ids(move)]])], 1)
            cont = torch.log_softmax(model(after).logits[0, -1].float(), -1)
            assert cont[tok.eos_token_id].item() == 0.0  # the end of the turn is certain
    for y in RESPONSES:  # the training encoding scores exactly response token + end-of-turn token
        enc = encode_response(tok, state, y)
        assert enc.num_response_tokens == (1 if y == "" else 2)


def test_sampling_frequencies_equal_scored_probabilities(generator):
    states = [sx.messages_of(k) for k in [("vague",), ("clear", "answer", "lost"), ("lost", "", "vague", "hint", "clear")]]
    n = 3000
    scored = policy_table(generator.model, generator.tokenizer)
    for state in states:
        probs = scored[sx.key_of(state)]
        replies = generator.chat([state] * n, SamplingParams(max_new_tokens=1, temperature=1.0), seeds=list(range(n)))
        counts = np.array([sum(c.text == y for c in replies) for y in RESPONSES])
        assert counts.sum() == n  # every sampled response is one of RESPONSES
        assert chi_square(counts, probs) < CHI2_999[3]
        # The same test tells apart a slightly different distribution (it can fail).
        sharper = probs ** 1.5 / (probs ** 1.5).sum()
        assert chi_square(counts, sharper) > CHI2_999[3]
    batch = collate([encode_response(generator.tokenizer, states[0], y) for y in RESPONSES], 0)
    with torch.no_grad():
        direct = sequence_logprobs(generator.model, batch).exp().numpy()
    np.testing.assert_allclose(direct, scored[sx.key_of(states[0])], rtol=1e-6)


# ------------------------------------------------------------------------------ exact values


def _constant(move: str) -> sx.PolicyTable:
    row = np.array([1.0 if y == move else 0.0 for y in RESPONSES])
    return {k: row for k in sx.enumerate_states(3)}


def test_exact_values_by_hand():
    table = _constant("answer")
    assert sx.expected_return(table, 1) == pytest.approx(0.5 * 0.2 + 0.25 * 2.0 + 0.25 * 0.0)
    v_vague = 0.2 + 0.4 * 0.2 + 0.6 * 0.0
    v_clear = 2.0 + 0.8 * 2.0 + 0.2 * 0.2
    v_lost = 0.0 + 0.9 * 0.0 + 0.1 * 0.2
    assert sx.expected_return(table, 2) == pytest.approx(0.5 * v_vague + 0.25 * v_clear + 0.25 * v_lost)
    q, v = sx.q_values(table, 2)
    ask = RESPONSES.index("ask")
    assert q[("vague",)][ask] == pytest.approx(0.0 + 0.9 * 2.0 + 0.1 * 0.2)
    assert q[("vague", "", "lost")][RESPONSES.index("")] == pytest.approx(-0.5 - 0.5)
    assert sx.collection_weights(2) == pytest.approx({2: 0.6, 3: 0.4})


def test_soft_improvement_and_optimum():
    rng = np.random.default_rng(0)
    tables = []
    for _ in range(5):
        p = rng.dirichlet(np.ones(len(RESPONSES)), size=len(sx.enumerate_states(3)))
        tables.append(dict(zip(sx.enumerate_states(3), p)))
    optimum = sx.optimal_policy(3)
    best = sx.average_return(optimum)
    assert all(sx.average_return(t) < best for t in tables)
    myopic = sx.optimal_policy(3, {1: 1.0, 2: 1e-9, 3: 1e-9})
    assert sx.expected_return(myopic, 1) > sx.expected_return(optimum, 1)  # the last-turn optimum ...
    assert sx.average_return(myopic) < best - 0.3  # ... loses over longer dialogues (early turns matter)
    table = tables[0]
    qbar = sx.mixture_q(table)
    new = sx.soft_improvement(table, qbar, 1.5)
    key = ("lost", "ask", "vague")
    expected = table[key] * np.exp(1.5 * qbar[key])
    np.testing.assert_allclose(new[key], expected / expected.sum())
    returns = [sx.average_return(table)]
    for _ in range(25):  # exact soft policy iteration climbs to the optimum
        table = sx.soft_improvement(table, sx.mixture_q(table), 4.0)
        returns.append(sx.average_return(table))
    assert all(b >= a - 1e-9 for a, b in zip(returns, returns[1:]))
    assert returns[-1] == pytest.approx(best, abs=5e-3)
    assert sx.win_rate(optimum, tables[0], 3) > 0.5 > sx.win_rate(tables[0], optimum, 3)
    assert sx.win_rate(optimum, optimum, 2) == pytest.approx(0.5)


# ------------------------------------------------------------------------------ REFUEL's claims


@pytest.mark.slow
def test_claim1_reward_gap_is_unbiased_for_the_q_gap(generator):
    rows, stats = collect_refuel_tuples(env_id=ENV_ID, env_kwargs={}, policy=generator,
                                        sampling=SamplingParams(max_new_tokens=1, temperature=1.0), num_prompts=6000,
                                        seed=2, progress=False)
    assert stats.dropped_truncated == 0 and len(rows) == 6000
    table = policy_table(generator.model, generator.tokenizer)
    gap = tuple_q_gaps(table, rows)
    diff = np.array([r["reward"] - r["reward_prime"] for r in rows])
    last = np.array([r["h"] == r["H"] for r in rows])
    np.testing.assert_allclose(diff[last], gap[last], atol=1e-9)  # at h = H the reward gap is the Q gap
    res = (diff - gap)[~last]
    z = res.mean() / (res.std(ddof=1) / math.sqrt(len(res)))
    assert abs(z) < 1.96
    design = np.c_[np.ones(len(res)), gap[~last]]
    coef, *_ = np.linalg.lstsq(design, diff[~last], rcond=None)
    sigma2 = ((diff[~last] - design @ coef) ** 2).sum() / (len(res) - 2)
    se = math.sqrt(sigma2 * np.linalg.inv(design.T @ design)[1, 1])
    assert abs(coef[1] - 1.0) < 1.96 * se
    assert not grouped_unbiasedness(rows, gap)["rejected"]  # per (H, s_h, y, y') group
    # The same grouped test rejects the myopic Q of horizon h in place of H (the test can fail).
    myopic = {h: sx.q_values(table, h)[0] for h in (1, 2, 3)}
    wrong = np.array([myopic[r["h"]][sx.key_of(r["state"])][sx.response_index(r["response"])]
                      - myopic[r["h"]][sx.key_of(r["state"])][sx.response_index(r["response_prime"])] for r in rows])
    assert grouped_unbiasedness(rows, wrong)["rejected"]


@pytest.mark.slow
def test_claim2_refuel_minimiser_is_the_soft_policy_improvement(generator):
    rows, _ = collect_refuel_tuples(env_id=ENV_ID, env_kwargs={}, policy=generator,
                                    sampling=SamplingParams(max_new_tokens=1, temperature=1.0), num_prompts=2000,
                                    seed=3, progress=False)
    eta = 2.0
    before = policy_table(generator.model, generator.tokenizer)
    target = sx.soft_improvement(before, sx.mixture_q(before), eta)
    model = copy.deepcopy(generator.model)
    losses = fit_refuel_minimiser(model, generator.tokenizer, rows, eta=eta, steps=150, lr=3e-3)
    after = policy_table(model, generator.tokenizer)
    weights = dict(Counter(sx.key_of(r["state"]) for r in rows))
    assert losses[-1] < 0.7 * losses[0]
    assert sx.total_variation(after, target, weights) < 0.25 * sx.total_variation(before, target, weights)
    assert sx.kl_divergence(target, after, weights) < 0.1 * sx.kl_divergence(target, before, weights)


@pytest.mark.slow
def test_claim3_refuel_iterations_approach_the_optimum(policy_dir, tmp_path):
    from refuel_agents.refuel import RefuelConfig, RefuelTrainer

    config = RefuelConfig(env_id=ENV_ID, env_kwargs={"max_turns": 3}, policy_model=str(policy_dir), iterations=6,
                          prompts_per_iteration=256, batch_size=64, micro_batch_size=64, epochs=4, lr=3e-3, eta=2.0,
                          warmup_ratio=0.0, max_new_tokens=1, temperature=1.0, logprob_temperature=1.0, eval_prompts=1,
                          reference_kl=False, progress=False, device="cpu", seed=0, output_dir=str(tmp_path), run_name="r")
    trainer = RefuelTrainer(config)
    reference = policy_table(trainer.model, trainer.train_tokenizer)
    returns = []

    def exact_evaluation():
        metrics = exact_metrics(policy_table(trainer.model, trainer.train_tokenizer), reference)
        returns.append(metrics["reward_avg"])
        return [{"H": H, "reward": J} for H, J in enumerate(metrics["reward_by_h"], 1)]

    trainer.evaluate = exact_evaluation
    trainer.train()
    best = sx.average_return(sx.optimal_policy(3))
    assert len(returns) == 7
    assert returns[-1] - returns[0] > 0.7 * (best - returns[0])
    assert sum(b > a for a, b in zip(returns, returns[1:])) >= 5


def test_the_never_ask_behaviour_policy_writes_offline_data_without_asking():
    from refuel_env.synthetic import NEVER_ASK, make_synthetic_config

    items = make_items("train", behaviour="never-ask")
    assert [i.questions[0] for i in items] == [i.questions[0] for i in make_items("train")]  # same start states
    moves = {m for i in items for m in (*i.responses, i.chosen, i.rejected)}
    assert moves == {"answer", "hint"} and "ask" not in {a for table in NEVER_ASK.values() for a in table}
    assert make_synthetic_config().config_id() != make_synthetic_config(behaviour="never-ask").config_id()
    with pytest.raises(ValueError, match="unknown behaviour"):
        make_synthetic_config(behaviour="greedy")
