"""Exact analysis of training on ``SyntheticDialogue-v0``: the policy as the training code scores it.

:func:`scored_policy` turns a chat model into the probability callable of
:mod:`refuel_env.synthetic_exact` using exactly the functions of training
(:func:`~refuel_agents.logprobs.encode_response`, :func:`~refuel_agents.logprobs.sequence_logprobs`:
the response's tokens and its end-of-turn token), so the values computed from it are the values of
the distribution that the training loss sees. :func:`exact_metrics` gives the per-turn expected
reward and win rate of a model, :func:`fit_refuel_minimiser` minimises eq. 1 on a fixed batch of
tuples (claim: the minimiser is the soft policy improvement of eq. 3-5), and
:func:`tuple_q_gaps` gives the exact Q_H(s_h, y) - Q_H(s_h, y') of collected tuples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from refuel_agents.logprobs import collate, encode_response, sequence_logprobs
from refuel_agents.losses import refuel_loss
from refuel_env import synthetic_exact as sx
from refuel_env.synthetic import MAX_TURNS, RESPONSES
from refuel_env.types import Message


def scored_policy(model: Any, tokenizer: Any, *, temperature: float = 1.0, batch_size: int = 1024) -> sx.PolicyFn:
    """pi(y|s) for y in RESPONSES, as ``sequence_logprobs`` scores them (a callable over lists of states)."""

    @torch.no_grad()
    def probs(states: list[list[Message]]) -> np.ndarray:
        encoded = [encode_response(tokenizer, s, y) for s in states for y in RESPONSES]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out: list[torch.Tensor] = []
        for start in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[start:start + batch_size], tokenizer.pad_token_id).items()}
            out.append(sequence_logprobs(model, batch, temperature=temperature).double().cpu())
        model.train(was_training)
        return torch.cat(out).exp().numpy().reshape(len(states), len(RESPONSES))

    return probs


def policy_table(model: Any, tokenizer: Any, max_turns: int = MAX_TURNS, *, temperature: float = 1.0) -> sx.PolicyTable:
    """The model's exact response distribution at every state (raises if it is not a distribution over RESPONSES)."""
    return sx.tabulate(scored_policy(model, tokenizer, temperature=temperature), max_turns)


def policy_table_and_leak(model: Any, tokenizer: Any, max_turns: int = MAX_TURNS) -> tuple[sx.PolicyTable, float]:
    """The response distribution at every state, renormalised over RESPONSES, and the largest mass
    (over states) that the model put outside RESPONSES. The values computed from the table are exact
    only when that mass is 0 (below float32 resolution); report it next to them."""
    states = sx.enumerate_states(max_turns)
    probs = scored_policy(model, tokenizer)([sx.messages_of(k) for k in states])
    total = probs.sum(axis=1, keepdims=True)
    if not (total > 0).all():
        raise ValueError("the model puts no mass on any synthetic response at some state; nothing to renormalise")
    leak = float(np.abs(1.0 - total).max())
    return dict(zip(states, probs / total)), leak


def exact_metrics(table: sx.PolicyTable, reference: sx.PolicyTable, max_turns: int = MAX_TURNS) -> dict[str, Any]:
    """Per-turn expected reward J_H and win rate against ``reference`` (H = 1..max_turns), their means,
    and the return under REFUEL's horizon weights."""
    returns = sx.per_turn_returns(table, max_turns)
    wins = [sx.win_rate(table, reference, H) for H in range(1, max_turns + 1)]
    return {
        "reward_by_h": returns,
        "reward_avg": float(np.mean(returns)),
        "win_rate_by_h": wins,
        "win_rate_avg": float(np.mean(wins)),
        "refuel_objective": sx.average_return(table, max_turns, sx.refuel_horizon_weights(max_turns)),
    }


def tuple_q_gaps(table: sx.PolicyTable, rows: Sequence[dict]) -> np.ndarray:
    """Exact Q_H(s_h, y) - Q_H(s_h, y') of each collected tuple (H = the tuple's dialogue length)."""
    q_by_h = {H: sx.q_values(table, H)[0] for H in sorted({int(r["H"]) for r in rows})}
    gaps = []
    for r in rows:
        q = q_by_h[int(r["H"])][sx.key_of(r["state"])]
        gaps.append(q[sx.response_index(r["response"])] - q[sx.response_index(r["response_prime"])])
    return np.asarray(gaps)


def fit_refuel_minimiser(model: Any, tokenizer: Any, rows: Sequence[dict], *, eta: float, steps: int = 300,
                         lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Minimise eq. 1 (``refuel_loss`` over every row, full batch, Adam) in place; returns the losses.

    ``rows`` hold ``state``, ``response``, ``response_prime``, ``reward``, ``reward_prime``; log pi_t is
    the model's before the first update. Each distinct (state, response) is scored once per step and
    gathered into the pairs, so the loss is exactly the mean over the rows at a fraction of the cost.
    """
    torch.manual_seed(seed)
    index: dict[tuple, int] = {}
    encoded = []
    pairs = []
    for r in rows:
        ids = []
        for response in (r["response"], r["response_prime"]):
            key = (sx.key_of(r["state"]), response)
            if key not in index:
                index[key] = len(encoded)
                encoded.append(encode_response(tokenizer, r["state"], response))
            ids.append(index[key])
        pairs.append(ids)
    batch = collate(encoded, tokenizer.pad_token_id)
    first, second = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    reward = torch.tensor([r["reward"] for r in rows], dtype=torch.float32)
    reward_prime = torch.tensor([r["reward_prime"] for r in rows], dtype=torch.float32)
    with torch.no_grad():
        model.eval()
        logp_t = sequence_logprobs(model, batch)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logp = sequence_logprobs(model, batch)
        loss = refuel_loss(logp[first], logp_t[first], logp[second], logp_t[second], reward, reward_prime, eta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def grouped_unbiasedness(rows: Sequence[dict], gaps: np.ndarray, *, min_group: int = 30) -> dict[str, float]:
    """A chi-square test that E[r - r'] = ``gaps`` within every group of tuples with the same
    (H, s_h, y, y') and h < H (at h = H the reward is deterministic): the sum over groups of
    z_g^2, z_g = mean residual / its standard error, against the 95 % quantile of chi-square with
    one degree of freedom per group (Wilson-Hilferty). Groups with fewer than ``min_group`` tuples
    (or no spread) are left out. Returns the statistic, the critical value, an approximate p-value
    and whether the test rejects at 5 %."""
    diff = np.array([r["reward"] - r["reward_prime"] for r in rows]) - np.asarray(gaps)
    groups: dict[tuple, list[float]] = {}
    for r, res in zip(rows, diff):
        if r["h"] < r["H"]:
            key = (int(r["H"]), sx.key_of(r["state"]), r["response"], r["response_prime"])
            groups.setdefault(key, []).append(float(res))
    z = [np.mean(v) / (np.std(v, ddof=1) / np.sqrt(len(v))) for v in groups.values()
         if len(v) >= min_group and np.std(v) > 0]
    if not z:
        raise ValueError(f"no group of (H, s_h, y, y') has {min_group} or more tuples with h < H; collect more tuples")
    k = len(z)
    critical = k * (1 - 2 / (9 * k) + 1.6449 * np.sqrt(2 / (9 * k))) ** 3
    statistic = float(np.sum(np.square(z)))
    # Wilson-Hilferty: (X / k)^(1/3) is about normal with mean 1 - 2/(9k) and variance 2/(9k).
    normal = ((statistic / k) ** (1 / 3) - (1 - 2 / (9 * k))) / np.sqrt(2 / (9 * k))
    p_value = 0.5 * math.erfc(normal / math.sqrt(2))
    return {"groups": k, "statistic": statistic, "critical_95": float(critical), "p_value": float(p_value),
            "rejected": bool(statistic > critical)}
