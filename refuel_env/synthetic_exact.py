"""Exact values of policies on the synthetic task (:mod:`refuel_env.synthetic`), by enumeration.

A state s_h is the whole transcript x_1, y_1, ..., x_h, written here as a key: the tuple
``(x_1, y_1, ..., x_h)`` of user words and response strings. A policy is given as a callable that
maps a list of states (chat messages) to an array of probabilities over :data:`RESPONSES`, one row
per state; :func:`tabulate` calls it once for every state up to ``max_turns`` (the synthetic
policy's responses are exactly the elements of :data:`RESPONSES`; see
``refuel_agents.exact.scored_policy`` for the callable that scores them with the training code).

For a dialogue length H and h <= H (the reward is the sum of the turns' utilities, given at the end):

    Q_H(s_h, y) = E[ r(s_{H+1}) | s_h, y_h = y, then pi ],   V_H(s_h) = sum_y pi(y|s_h) Q_H(s_h, y),
    J_H(pi) = sum_x P(x_1 = x) V_H(x).

The environment draws H ~ U{1..max_turns} and REFUEL's collection h ~ U{1..H}; the state s_h does
not tell H, so the regression target of eq. 1 at s_h is the mixture (:func:`mixture_q`)

    Qbar(s_h, y) = sum_{H >= h} w(H | h) Q_H(s_h, y),   w(H | h) proportional to P(H) / H,

and the exact soft policy improvement of eq. 3-5 is pi_t(y|s) exp(eta Qbar(s, y)) / Z(s)
(:func:`soft_improvement`). Its fixed point is the optimum of sum_H (P(H) / H) J_H, which
:func:`optimal_policy` finds by backward induction for any horizon weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from refuel_env.synthetic import (
    MAX_TURNS,
    RESPONSES,
    STATES,
    TRANSITIONS,
    UTILITY,
    move_of,
    start_distribution,
)
from refuel_env.types import Message

StateKey = tuple[str, ...]
PolicyFn = Callable[[list[list[Message]]], np.ndarray]
PolicyTable = dict[StateKey, np.ndarray]
NUM_RESPONSES = len(RESPONSES)


def messages_of(key: StateKey) -> list[Message]:
    """The chat messages of a state key (user words at even positions, responses at odd)."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(key)]


def key_of(messages: Sequence[Message]) -> StateKey:
    """The state key of a transcript that ends with a user message."""
    body = [m for m in messages if m["role"] != "system"]
    if not body or body[-1]["role"] != "user":
        raise ValueError("a state must end with the user's message")
    return tuple(m["content"].strip() for m in body)


def depth(key: StateKey) -> int:
    """h of a state key."""
    return (len(key) + 1) // 2


def response_index(response: str) -> int:
    """Position of a response in :data:`RESPONSES` (a clear error for any other text)."""
    text = response.strip()
    if text not in RESPONSES:
        raise ValueError(f"response {response!r} is not one of the synthetic policy's responses {list(RESPONSES)}")
    return RESPONSES.index(text)


def enumerate_states(max_turns: int = MAX_TURNS) -> list[StateKey]:
    """Every state at depths 1..max_turns, shallowest first."""
    _check_turns(max_turns)
    level = [(z,) for z in STATES]
    states = list(level)
    for _ in range(max_turns - 1):
        level = [key + (y, z) for key in level for y in RESPONSES for z in STATES]
        states.extend(level)
    return states


def tabulate(policy: PolicyFn, max_turns: int = MAX_TURNS, *, atol: float = 1e-4) -> PolicyTable:
    """pi(.|s) for every state, from one call of ``policy``; rows must sum to 1 within ``atol``."""
    states = enumerate_states(max_turns)
    probs = np.asarray(policy([messages_of(k) for k in states]), dtype=np.float64)
    if probs.shape != (len(states), NUM_RESPONSES):
        raise ValueError(f"the policy returned shape {probs.shape}, expected ({len(states)}, {NUM_RESPONSES})")
    check_distributions(probs, atol)
    return dict(zip(states, probs))


def check_distributions(probs: np.ndarray, atol: float) -> None:
    """Raise unless every row is a probability distribution over RESPONSES (within ``atol``)."""
    total = probs.sum(axis=1)
    bad = np.flatnonzero((np.abs(total - 1.0) > atol) | (probs < -atol).any(axis=1))
    if bad.size:
        raise ValueError(
            f"{bad.size} state(s) have response probabilities that do not sum to 1 (e.g. {total[bad[0]]:.6f}); "
            f"the policy gives responses outside {list(RESPONSES)} (or ends its turn late), so the enumeration "
            "would not be exact"
        )


def past_reward(key: StateKey) -> float:
    """Sum of the utilities of the turns completed in a state."""
    return float(sum(UTILITY[key[i]][move_of(key[i + 1])] for i in range(0, len(key) - 1, 2)))


def q_values(table: PolicyTable, horizon: int) -> tuple[dict[StateKey, np.ndarray], dict[StateKey, float]]:
    """Q_H(s, .) (array over RESPONSES) and V_H(s) for every state at depths 1..horizon."""
    _check_turns(horizon)
    by_depth: dict[int, list[StateKey]] = {}
    for key in table:
        if depth(key) <= horizon:
            by_depth.setdefault(depth(key), []).append(key)
    if len(by_depth) < horizon:
        raise ValueError(f"the policy table covers depths {sorted(by_depth)}, not 1..{horizon}")
    q: dict[StateKey, np.ndarray] = {}
    v: dict[StateKey, float] = {}
    for h in range(horizon, 0, -1):
        for key in by_depth[h]:
            q[key] = _q_row(key, h, horizon, v)
            v[key] = float(table[key] @ q[key])
    return q, v


def _q_row(key: StateKey, h: int, horizon: int, v: dict[StateKey, float]) -> np.ndarray:
    z = key[-1]
    if h == horizon:
        return np.array([past_reward(key) + UTILITY[z][move_of(y)] for y in RESPONSES])
    return np.array([
        sum(p * v[key + (y, nxt)] for nxt, p in TRANSITIONS[z][move_of(y)].items()) for y in RESPONSES
    ])


def expected_return(table: PolicyTable, horizon: int, start: dict[str, float] | None = None) -> float:
    """J_H(pi): the expected reward of dialogues of length ``horizon``."""
    start = start or start_distribution()
    _, v = q_values(table, horizon)
    return float(sum(p * v[(z,)] for z, p in start.items()))


def per_turn_returns(table: PolicyTable, max_turns: int = MAX_TURNS, start: dict[str, float] | None = None) -> list[float]:
    """[J_1, ..., J_max_turns]."""
    return [expected_return(table, H, start) for H in range(1, max_turns + 1)]


def collection_weights(h: int, max_turns: int = MAX_TURNS) -> dict[int, float]:
    """w(H | h): P(H | the collection branches at turn h), H ~ U{1..max_turns}, h ~ U{1..H}."""
    raw = {H: 1.0 / H for H in range(h, max_turns + 1)}
    total = sum(raw.values())
    return {H: w / total for H, w in raw.items()}


def mixture_q(table: PolicyTable, max_turns: int = MAX_TURNS) -> dict[StateKey, np.ndarray]:
    """Qbar(s_h, .) = sum_{H >= h} w(H | h) Q_H(s_h, .): the regression target of eq. 1 at s_h."""
    per_h = {H: q_values(table, H)[0] for H in range(1, max_turns + 1)}
    out = {}
    for key in table:
        h = depth(key)
        out[key] = sum(w * per_h[H][key] for H, w in collection_weights(h, max_turns).items())
    return out


def soft_improvement(table: PolicyTable, qbar: dict[StateKey, np.ndarray], eta: float) -> PolicyTable:
    """pi_t(y|s) exp(eta Qbar(s, y)) / Z(s) for every state (eq. 3-5)."""
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    out = {}
    for key, probs in table.items():
        logits = np.log(np.maximum(probs, 1e-300)) + eta * qbar[key]
        logits -= logits.max()
        weights = np.exp(logits) * (probs > 0)
        out[key] = weights / weights.sum()
    return out


def optimal_policy(max_turns: int = MAX_TURNS, horizon_weights: dict[int, float] | None = None) -> PolicyTable:
    """A deterministic policy maximising sum_H omega_H J_H (default omega_H = 1: every H alike).

    Backward induction: a state's descendants are fixed first, then its response maximises
    sum_{H >= h} omega_H Q_H(s, y) (reaching s does not depend on H, so this is optimal).
    """
    _check_turns(max_turns)
    omega = horizon_weights or {H: 1.0 for H in range(1, max_turns + 1)}
    states = enumerate_states(max_turns)
    table: PolicyTable = {}
    v: dict[int, dict[StateKey, float]] = {H: {} for H in range(1, max_turns + 1)}
    for key in reversed(states):
        h = depth(key)
        rows = {H: _q_row(key, h, H, v[H]) for H in range(h, max_turns + 1)}
        score = sum(omega.get(H, 0.0) * rows[H] for H in rows)
        best = np.zeros(NUM_RESPONSES)
        best[int(np.argmax(score))] = 1.0
        table[key] = best
        for H, row in rows.items():
            v[H][key] = float(best @ row)
    return table


def average_return(table: PolicyTable, max_turns: int = MAX_TURNS, horizon_weights: dict[int, float] | None = None,
                   start: dict[str, float] | None = None) -> float:
    """sum_H omega_H J_H / sum_H omega_H (default: the mean over H = 1..max_turns)."""
    omega = horizon_weights or {H: 1.0 for H in range(1, max_turns + 1)}
    returns = per_turn_returns(table, max_turns, start)
    return float(sum(omega[H] * returns[H - 1] for H in omega) / sum(omega.values()))


def refuel_horizon_weights(max_turns: int = MAX_TURNS) -> dict[int, float]:
    """omega_H = P(H) / H: the objective whose optimum is REFUEL's fixed point (H ~ U, h ~ U{1..H})."""
    return {H: 1.0 / H for H in range(1, max_turns + 1)}


def return_distribution(table: PolicyTable, horizon: int, start_state: str) -> dict[float, float]:
    """P(r(s_{H+1}) = r) for dialogues of length ``horizon`` from ``start_state``."""
    out: dict[float, float] = {}

    def walk(key: StateKey, prob: float) -> None:
        h = depth(key)
        for i, y in enumerate(RESPONSES):
            p = prob * table[key][i]
            if p == 0.0:
                continue
            if h == horizon:
                r = round(past_reward(key) + UTILITY[key[-1]][move_of(y)], 9)
                out[r] = out.get(r, 0.0) + p
            else:
                for nxt, q in TRANSITIONS[key[-1]][move_of(y)].items():
                    walk(key + (y, nxt), p * q)

    walk((start_state,), 1.0)
    return out


def win_rate(table: PolicyTable, reference: PolicyTable, horizon: int, start: dict[str, float] | None = None) -> float:
    """P(r(pi's dialogue) > r(reference's dialogue)) + 1/2 P(tie), both from the same first message."""
    start = start or start_distribution()
    total = 0.0
    for z, pz in start.items():
        mine = return_distribution(table, horizon, z)
        theirs = return_distribution(reference, horizon, z)
        for r, p in mine.items():
            for r2, p2 in theirs.items():
                total += pz * p * p2 * (1.0 if r > r2 else 0.5 if r == r2 else 0.0)
    return float(total)


def total_variation(a: PolicyTable, b: PolicyTable, weights: dict[StateKey, float]) -> float:
    """sum_s weights(s) * TV(a(.|s), b(.|s)) / sum weights."""
    total = sum(weights.values())
    return float(sum(w * 0.5 * np.abs(a[k] - b[k]).sum() for k, w in weights.items()) / total)


def kl_divergence(a: PolicyTable, b: PolicyTable, weights: dict[StateKey, float]) -> float:
    """sum_s weights(s) * KL(a(.|s) || b(.|s)) / sum weights."""
    total = sum(weights.values())
    out = 0.0
    for k, w in weights.items():
        p, q = a[k], b[k]
        mask = p > 0
        out += w * float((p[mask] * (np.log(p[mask]) - np.log(np.maximum(q[mask], 1e-300)))).sum())
    return out / total


def collection_state_weights(table: PolicyTable, max_turns: int = MAX_TURNS,
                             start: dict[str, float] | None = None) -> dict[StateKey, float]:
    """P(the collection branches at s): sum_H P(H) (1/H) sum_{h <= H} d_h^pi(s), the states REFUEL regresses on."""
    start = start or start_distribution()
    reach: dict[StateKey, float] = {(z,): p for z, p in start.items()}
    for key in enumerate_states(max_turns):
        if depth(key) == max_turns or key not in reach:
            continue
        for i, y in enumerate(RESPONSES):
            for nxt, q in TRANSITIONS[key[-1]][move_of(y)].items():
                child = key + (y, nxt)
                reach[child] = reach.get(child, 0.0) + reach[key] * table[key][i] * q
    branch = {h: sum(1.0 / max_turns / H for H in range(h, max_turns + 1)) for h in range(1, max_turns + 1)}
    return {k: p * branch[depth(k)] for k, p in reach.items() if p > 0}


def _check_turns(max_turns: int) -> None:
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or not 1 <= max_turns <= MAX_TURNS:
        raise ValueError(f"the synthetic task's horizon is an int in 1..{MAX_TURNS}, got {max_turns!r}")
