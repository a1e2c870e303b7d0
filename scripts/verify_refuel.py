"""Check REFUEL's claims on SyntheticDialogue-v0, where Q^pi is known exactly.

    python scripts/verify_refuel.py                      # 5 seeds, every method, about 10 minutes on 2 CPU cores
    python scripts/verify_refuel.py --quick              # a smoke run of a few minutes
    python scripts/verify_refuel.py --seeds 3 --iterations 6 --methods refuel rebel:lt-online

Claims (the REFUEL paper, sections 2.1 and 3):

1. Unbiasedness: for tuples collected by ``collect_refuel_tuples``, E[r - r' | s_h, y, y', H] equals
   the exact Q_H(s_h, y) - Q_H(s_h, y'). Tested on the residuals (r - r') - (Q - Q'): their mean
   (95 % z-interval must contain 0) and the slope of (r - r') on Q - Q' (95 % interval must contain 1).
2. The update: minimising eq. 1 on a fixed batch moves pi toward pi_t exp(eta Qbar) / Z (eq. 3-5):
   the distance (TV, KL) to that exact target, weighted by the batch's states, before and after.
3. Convergence: REFUEL's exact expected return J(pi_t) over the iterations, next to max_pi J.
4. The paper's ordering (table 1): REFUEL against REBEL and DPO on LT-ONLINE, MT-MIXED, LT-MIXED and
   LT-OFFLINE data (``refuel_agents.baselines.make_trainer``), by the exact expected reward of
   dialogues of each length H and the exact win rate against the initial policy, over seeds with
   95 % t-intervals.
5. Covariate shift (section 4.1): REFUEL against REBEL on MT-MIXED data whose offline prefixes come
   from the task's behaviour policy and from one far from the learned policy (``never-ask``, which
   never asks), side by side. ``--covariate-shift-only`` runs this claim alone.

Writes results.md, results.json and verify_refuel.png to --output-dir.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import refuel_env  # noqa: E402, F401  (registers SyntheticDialogue-v0)
from refuel_agents.baselines import make_trainer  # noqa: E402
from refuel_agents.collection import collect_refuel_tuples  # noqa: E402
from refuel_agents.exact import (  # noqa: E402
    exact_metrics,
    fit_refuel_minimiser,
    grouped_unbiasedness,
    policy_table,
    policy_table_and_leak,
    tuple_q_gaps,
)
from refuel_env import synthetic_exact as sx  # noqa: E402
from refuel_env.generation import SamplingParams, TransformersGenerator  # noqa: E402
from refuel_env.synthetic import MAX_TURNS, build_synthetic_policy  # noqa: E402

ENV_ID = "SyntheticDialogue-v0"
METHODS = ("refuel", "rebel:lt-online", "rebel:mt-mixed", "rebel:lt-mixed", "rebel:lt-offline",
           "dpo:lt-online", "dpo:mt-mixed", "dpo:lt-mixed", "dpo:lt-offline")
# Two-sided 95 % Student t quantiles by degrees of freedom (no SciPy needed).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="seeds per method for claims 3 and 4 (policy init and data; default 5)")
    p.add_argument("--iterations", type=int, default=8, help="training iterations T per run (default 8)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 seeds, 3 iterations, 128 prompts per iteration, smaller claim 1-2 batches (4000 and 1000 tuples)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), metavar="AGENT[:MODE]",
                   help=f"methods for claim 4 (default all: {' '.join(METHODS)})")
    p.add_argument("--prompts-per-iteration", type=int, default=256, help="pairs collected per iteration (default 256)")
    p.add_argument("--epochs", type=int, default=4, help="passes over each iteration's pairs (default 4)")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per optimizer update (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    p.add_argument("--eta", type=float, default=2.0, help="eta of eq. 1 for REFUEL and REBEL (default 2.0)")
    p.add_argument("--beta", type=float, default=1.0, help="DPO's beta (default 1.0)")
    p.add_argument("--claim1-prompts", type=int, default=6000, help="tuples collected for the unbiasedness test (default 6000)")
    p.add_argument("--claim2-prompts", type=int, default=3000, help="tuples in the fixed batch of the update test (default 3000)")
    p.add_argument("--claim2-steps", type=int, default=200, help="full-batch Adam steps minimising eq. 1 in claim 2 (default 200)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tiny model is faster on one thread than on two busy cores)")
    p.add_argument("--covariate-shift-only", action="store_true",
                   help="run claim 5 alone: REFUEL and REBEL (MT-MIXED) under both behaviour policies")
    p.add_argument("--output-dir", default="runs/verify_refuel", help="where results.md/.json, the plot and the runs go")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.iterations, args.prompts_per_iteration = 2, 3, 128
        args.claim1_prompts, args.claim2_prompts, args.claim2_steps = 4000, 1000, 100  # claim 1 needs groups of 30
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {' '.join(METHODS)}")
    for name in ("seeds", "iterations", "prompts_per_iteration", "epochs", "batch_size", "claim1_prompts",
                 "claim2_prompts", "claim2_steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seeds < 2:
        p.error("--seeds must be >= 2 for confidence intervals")
    return args


def ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n < 2:
        return float(x.mean()), math.nan
    df = n - 1
    t = T95[max(k for k in T95 if k <= df)]
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(n))


def sampling() -> SamplingParams:
    return SamplingParams(max_new_tokens=1, temperature=1.0)


# ------------------------------------------------------------------------------ claims 1 and 2


def claim_unbiased(policy_dir: Path, n: int, seed: int) -> dict[str, Any]:
    gen = TransformersGenerator.from_pretrained(str(policy_dir), device="cpu")
    rows, _ = collect_refuel_tuples(env_id=ENV_ID, env_kwargs={}, policy=gen, sampling=sampling(),
                                    num_prompts=n, seed=seed, progress=True)
    table = policy_table(gen.model, gen.tokenizer)
    gap = tuple_q_gaps(table, rows)
    diff = np.array([r["reward"] - r["reward_prime"] for r in rows])
    stochastic = np.array([r["h"] < r["H"] for r in rows])
    res = diff - gap
    mean, se = float(res[stochastic].mean()), float(res[stochastic].std(ddof=1) / math.sqrt(stochastic.sum()))
    slope, slope_se = _slope(gap[stochastic], diff[stochastic])
    grouped = grouped_unbiasedness(rows, gap)
    control = grouped_unbiasedness(rows, _wrong_horizon_gaps(table, rows))
    return {
        "tuples": len(rows), "stochastic_tuples": int(stochastic.sum()),
        "last_turn_max_abs_residual": float(np.abs(res[~stochastic]).max()) if (~stochastic).any() else 0.0,
        "residual_mean": mean, "residual_ci95": [mean - 1.96 * se, mean + 1.96 * se],
        "slope": slope, "slope_ci95": [slope - 1.96 * slope_se, slope + 1.96 * slope_se],
        "grouped": grouped, "control_myopic_grouped": control,
        "holds": bool(abs(mean) <= 1.96 * se and abs(slope - 1) <= 1.96 * slope_se),
        "control_rejected": control["rejected"],
    }


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of y on x (with intercept) and its standard error."""
    design = np.c_[np.ones_like(x), x]
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    sigma2 = resid @ resid / (len(y) - 2)
    cov = sigma2 * np.linalg.inv(design.T @ design)
    return float(coef[1]), float(math.sqrt(cov[1, 1]))


def _wrong_horizon_gaps(table: sx.PolicyTable, rows: list[dict]) -> np.ndarray:
    """A negative control: Q - Q' of the shortest horizon, h, instead of the tuple's H (myopic values)."""
    q_by_h = {H: sx.q_values(table, H)[0] for H in range(1, MAX_TURNS + 1)}
    out = []
    for r in rows:
        key = sx.key_of(r["state"])
        q = q_by_h[r["h"]][key]
        out.append(q[sx.response_index(r["response"])] - q[sx.response_index(r["response_prime"])])
    return np.asarray(out)


def claim_update(policy_dir: Path, n: int, steps: int, eta: float, lr: float, seed: int) -> dict[str, Any]:
    gen = TransformersGenerator.from_pretrained(str(policy_dir), device="cpu")
    rows, _ = collect_refuel_tuples(env_id=ENV_ID, env_kwargs={}, policy=gen, sampling=sampling(),
                                    num_prompts=n, seed=seed, progress=True)
    before = policy_table(gen.model, gen.tokenizer)
    target = sx.soft_improvement(before, sx.mixture_q(before), eta)
    model = copy.deepcopy(gen.model)
    losses = fit_refuel_minimiser(model, gen.tokenizer, rows, eta=eta, steps=steps, lr=lr, seed=seed)
    after = policy_table(model, gen.tokenizer)
    weights = dict(Counter(sx.key_of(r["state"]) for r in rows))
    out = {
        "tuples": n, "eta": eta, "steps": steps, "loss_first": losses[0], "loss_last": losses[-1],
        "tv_before": sx.total_variation(before, target, weights), "tv_after": sx.total_variation(after, target, weights),
        "kl_before": sx.kl_divergence(target, before, weights), "kl_after": sx.kl_divergence(target, after, weights),
        "J_before": sx.average_return(before), "J_after": sx.average_return(after), "J_target": sx.average_return(target),
        "first_turn": {k[0]: {"pi_t": before[k].tolist(), "fitted": after[k].tolist(), "target": target[k].tolist()}
                       for k in before if len(k) == 1},
    }
    out["holds"] = bool(out["tv_after"] <= 0.25 * out["tv_before"])
    return out


# ------------------------------------------------------------------------------ claims 3 and 4


def train_run(method: str, seed: int, policy_dir: Path, args: argparse.Namespace, run_root: Path,
              behaviour: str = "mixed") -> dict[str, Any]:
    agent, _, mode = method.partition(":")
    overrides = dict(
        env_id=BEHAVIOUR_ENV_IDS[behaviour], env_kwargs={"max_turns": MAX_TURNS}, policy_model=str(policy_dir), iterations=args.iterations,
        prompts_per_iteration=args.prompts_per_iteration, batch_size=args.batch_size, micro_batch_size=args.batch_size,
        epochs=args.epochs, lr=args.lr, eta=args.eta, warmup_ratio=0.0, max_new_tokens=1, temperature=1.0,
        logprob_temperature=1.0, eval_prompts=1, reference_kl=False, progress=False, device="cpu", seed=seed,
        output_dir=str(run_root), run_name=f"{method.replace(':', '_')}__seed{seed}"
        + (f"__{behaviour}" if behaviour != "mixed" else ""),
    )
    if agent == "dpo":
        overrides["beta"] = args.beta
    trainer = make_trainer(agent, mode or None, **overrides)
    reference = policy_table(trainer.model, trainer.train_tokenizer)
    history: list[dict[str, Any]] = []

    def exact_evaluation() -> list[dict]:
        table, leak = policy_table_and_leak(trainer.model, trainer.train_tokenizer)
        history.append({**exact_metrics(table, reference), "leak": leak})
        return [{"H": H, "reward": J} for H, J in enumerate(history[-1]["reward_by_h"], 1)]

    # The trainer's evaluation (played dialogues) is replaced by the exact values of the current policy.
    trainer.evaluate = exact_evaluation
    log = run_root / f"{overrides['run_name']}.log"
    with open(log, "w") as fh, contextlib.redirect_stdout(fh):
        trainer.train()
    # DPO makes no update in an iteration whose pairs all tie (a deterministic policy): read from the
    # iterations' collection stats.
    stats = [json.loads(f.read_text()) for f in trainer.run_dir.glob("iteration_*/collection.json")]
    idle = sum(1 for st in stats if 0 < st.get("dropped_ties", 0) == st["tuples"])
    return {"method": method, "seed": seed, "history": history, "final": history[-1], "idle_iterations": idle,
            "max_leak": max(h["leak"] for h in history), "behaviour": behaviour}


BEHAVIOURS = ("mixed", "never-ask")
SHIFT_BASELINE = "rebel:mt-mixed"
BEHAVIOUR_ENV_IDS = {"mixed": ENV_ID, "never-ask": "SyntheticDialogueNeverAsk-v0"}
"""The synthetic task with each behaviour policy's offline data (registered below, behaviour set in the spec)."""
if BEHAVIOUR_ENV_IDS["never-ask"] not in gym.registry:
    gym.register(id=BEHAVIOUR_ENV_IDS["never-ask"], entry_point="refuel_env.envs.synthetic:SyntheticDialogueEnv",
                 vector_entry_point="refuel_env.envs.synthetic:SyntheticDialogueVectorEnv",
                 kwargs={"behaviour": "never-ask"}, nondeterministic=False)


def claim_covariate_shift(runs: list[dict], policies: dict[int, Path], args: argparse.Namespace,
                          run_root: Path) -> dict[str, Any]:
    """REFUEL and REBEL (MT-MIXED) under each behaviour policy: final exact reward, mean and 95 % CI over seeds.

    REFUEL collects on-policy and reads no offline data, so its runs are the same under both; they and the
    MT-MIXED runs with the task's own behaviour policy are taken from ``runs`` when claim 4 made them."""
    def have(method: str, behaviour: str) -> list[dict]:
        return [r for r in runs if r["method"] == method and r.get("behaviour", "mixed") == behaviour]

    todo = [(m, b, s) for m, b in (("refuel", "mixed"), *((SHIFT_BASELINE, b) for b in BEHAVIOURS))
            for s in range(args.seeds) if s not in {r["seed"] for r in have(m, b)}]
    for method, behaviour, seed in tqdm(todo, desc="claim 5 runs", unit="run"):
        runs.append(train_run(method, seed, policies[seed], args, run_root, behaviour))
    refuel = [r["final"]["reward_avg"] for r in have("refuel", "mixed")]
    out: dict[str, Any] = {"refuel": ci95(refuel), "seeds": args.seeds}
    for b in BEHAVIOURS:
        baseline = have(SHIFT_BASELINE, b)
        gaps = [next(r for r in have("refuel", "mixed") if r["seed"] == x["seed"])["final"]["reward_avg"]
                - x["final"]["reward_avg"] for x in baseline]
        out[b] = {"mt_mixed": ci95([r["final"]["reward_avg"] for r in baseline]), "refuel_minus_mt_mixed": ci95(gaps)}
    return out


def covariate_shift_markdown(c5: dict[str, Any]) -> str:
    rows = ["## Claim 5: covariate shift (REFUEL against REBEL on MT-MIXED data from two behaviour policies)", "",
            f"Exact expected reward averaged over H, mean ± 95 % CI over {c5['seeds']} seeds; the difference is paired "
            "by seed (the same initial policy).", "",
            "| Behaviour policy of the offline prefixes | REFUEL | REBEL (MT-MIXED) | REFUEL - REBEL (MT-MIXED) |",
            "|---|---|---|---|"]
    for b in BEHAVIOURS:
        rows.append(f"| {b} | {cell(c5['refuel'])} | {cell(c5[b]['mt_mixed'])} | {cell(c5[b]['refuel_minus_mt_mixed'])} |")
    return "\n".join(rows) + "\n"


def label(method: str) -> str:
    agent, _, mode = method.partition(":")
    return agent.upper() + (f" ({mode.upper()})" if mode else "")


def summarise(runs: list[dict], methods: list[str], seeds: int) -> dict[str, Any]:
    out = {}
    for m in methods:
        finals = [r["final"] for r in runs if r["method"] == m]
        out[m] = {
            "reward_by_h": [ci95([f["reward_by_h"][i] for f in finals]) for i in range(MAX_TURNS)],
            "reward_avg": ci95([f["reward_avg"] for f in finals]),
            "win_rate_by_h": [ci95([f["win_rate_by_h"][i] for f in finals]) for i in range(MAX_TURNS)],
            "win_rate_avg": ci95([f["win_rate_avg"] for f in finals]),
            "curve": [ci95([r["history"][t]["reward_avg"] for r in runs if r["method"] == m and len(r["history"]) > t])
                      for t in range(max(len(r["history"]) for r in runs if r["method"] == m))],
            "idle_iterations": sum(r["idle_iterations"] for r in runs if r["method"] == m),
            "max_leak": max(r["max_leak"] for r in runs if r["method"] == m),
            "seeds": len(finals),
        }
    return out


def cell(mean_hw: tuple[float, float], scale: float = 1.0) -> str:
    mean, hw = mean_hw
    return f"{mean * scale:.3f} ± {hw * scale:.3f}" if not math.isnan(hw) else f"{mean * scale:.3f}"


def markdown(results: dict[str, Any]) -> str:
    c1, c2, c3, summary = results["claim1"], results["claim2"], results["claim3"], results["claim4"]
    opt = results["optimum"]
    lines = ["# REFUEL on SyntheticDialogue-v0: claims checked against exact Q-values", "",
             f"Run: {results['config']['seeds']} seeds, T = {results['config']['iterations']} iterations, "
             f"{results['config']['prompts_per_iteration']} pairs per iteration, {results['wall_s'] / 60:.1f} min.", "",
             "## Claim 1: r - r' is an unbiased estimate of Q(s_h, y) - Q(s_h, y')", "",
             f"{c1['tuples']} tuples ({c1['stochastic_tuples']} with h < H). Residual (r - r') - (Q - Q'): mean "
             f"{c1['residual_mean']:+.4f}, 95 % CI [{c1['residual_ci95'][0]:+.4f}, {c1['residual_ci95'][1]:+.4f}]; "
             f"slope of r - r' on Q - Q': {c1['slope']:.3f}, 95 % CI [{c1['slope_ci95'][0]:.3f}, {c1['slope_ci95'][1]:.3f}]; "
             f"h = H tuples: largest |residual| {c1['last_turn_max_abs_residual']:.1e}. Per (H, s_h, y, y') group "
             f"(>= 30 tuples): sum of z^2 = {c1['grouped']['statistic']:.1f} over {c1['grouped']['groups']} groups, "
             f"95 % chi-square critical value {c1['grouped']['critical_95']:.1f}, p = {c1['grouped']['p_value']:.3f}. "
             f"**{'Holds' if c1['holds'] else 'Does not hold'}** (criterion: the mean residual's and the slope's 95 % "
             "intervals contain 0 and 1; the grouped test is reported beside them, at 5 % it rejects a true null "
             "one time in twenty). Control (the myopic Q of horizon h instead of H): "
             f"sum of z^2 = {c1['control_myopic_grouped']['statistic']:.1f}, p = {c1['control_myopic_grouped']['p_value']:.1e}, "
             f"{'rejected' if c1['control_rejected'] else 'NOT rejected'} by the same test.", "",
             "## Claim 2: the minimiser of eq. 1 is the soft policy improvement pi_t exp(eta Q) / Z", "",
             f"{c2['tuples']} tuples, eta = {c2['eta']}, {c2['steps']} full-batch Adam steps (loss {c2['loss_first']:.3f} -> "
             f"{c2['loss_last']:.3f}). Distance to the exact target, weighted by the batch's states: TV "
             f"{c2['tv_before']:.4f} -> {c2['tv_after']:.4f}, KL(target || pi) {c2['kl_before']:.4f} -> {c2['kl_after']:.5f}. "
             f"J: pi_t {c2['J_before']:.3f}, fitted {c2['J_after']:.3f}, exact target {c2['J_target']:.3f}. "
             f"**{'Holds' if c2['holds'] else 'Does not hold'}** (criterion: TV shrinks at least 4x).", "",
             "## Claim 3: J(pi_t) of REFUEL rises toward max_pi J", "",
             f"max_pi J = {opt['J_avg']:.3f} (per H: {', '.join(f'{x:.3f}' for x in opt['reward_by_h'])}); initial "
             f"J = {c3['curve'][0][0]:.3f}. Mean over seeds (± 95 % CI) after each iteration: "
             + ", ".join(f"{m:.3f} ± {hw:.3f}" for m, hw in c3["curve"]) + ". "
             f"Final share of the possible gain: {c3['gain_share']:.2f}. **{'Holds' if c3['holds'] else 'Does not hold'}** "
             "(criterion: non-decreasing mean curve up to 0.02 and at least 80 % of the gain).", "",
             "## Claim 4: table 1's layout (exact expected reward of dialogues of length H; mean ± 95 % CI over seeds)", "",
             "| Method | " + " | ".join(f"H = {h}" for h in range(1, MAX_TURNS + 1)) + " | Avg | Win rate vs pi_0 (avg) |",
             "|---" * (MAX_TURNS + 3) + "|"]
    for m, s in summary.items():
        lines.append(f"| {label(m)} | " + " | ".join(cell(x) for x in s["reward_by_h"]) + f" | {cell(s['reward_avg'])} | "
                     f"{cell(s['win_rate_avg'], 100)} % |")
    lines.append("| max_pi J (optimum) | " + " | ".join(f"{x:.3f}" for x in opt["reward_by_h"]) + f" | {opt['J_avg']:.3f} | |")
    lines.append("| pi_0 (initial, mean) | " + " | ".join(f"{x:.3f}" for x in results["initial"]["reward_by_h"])
                 + f" | {results['initial']['reward_avg']:.3f} | 50 % |")
    lines += ["", "Win rate against the initial policy by H (%):", "",
              "| Method | " + " | ".join(f"H = {h}" for h in range(1, MAX_TURNS + 1)) + " |", "|---" * (MAX_TURNS + 1) + "|"]
    for m, s in summary.items():
        lines.append(f"| {label(m)} | " + " | ".join(cell(x, 100) for x in s["win_rate_by_h"]) + " |")
    lines += ["", "Ordering: " + results["ordering"], ""]
    if "claim5" in results:
        lines += [covariate_shift_markdown(results["claim5"])]
    notes = [f"- {label(m)}: {s['idle_iterations']} of {s['seeds'] * results['config']['iterations']} iterations "
             "(all seeds) had only tied pairs and made no update" for m, s in summary.items() if s["idle_iterations"]]
    notes += [f"- {label(m)}: the policy put up to {s['max_leak']:.1e} of its mass outside the synthetic responses at some "
              "state and iteration; its values are for the renormalised distribution" for m, s in summary.items()
              if s["max_leak"] > 1e-4]
    if notes:
        lines += ["Notes:", "", *notes, ""]
    return "\n".join(lines)


def ordering(summary: dict[str, Any]) -> str:
    if "refuel" not in summary:
        return "REFUEL was not run."
    ref = summary["refuel"]["reward_avg"]
    others = {m: s["reward_avg"] for m, s in summary.items() if m != "refuel"}
    if not others:
        return "no baseline was run."
    beaten = [m for m, v in others.items() if ref[0] - ref[1] > v[0] + v[1]]
    best = max(summary, key=lambda m: summary[m]["reward_avg"][0])
    ranking = " > ".join(label(m) for m in sorted(summary, key=lambda m: -summary[m]["reward_avg"][0]))
    return (f"by average exact reward: {ranking}. REFUEL has the highest mean: {best == 'refuel'}; its 95 % interval "
            f"lies above those of {len(beaten)} of {len(others)} baselines"
            + (f" (not: {', '.join(label(m) for m in others if m not in beaten)})" if len(beaten) < len(others) else "") + ".")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["claim4"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, s in summary.items():
        mean = np.array([c[0] for c in s["curve"]])
        hw = np.array([c[1] for c in s["curve"]])
        x = np.arange(len(mean))
        a.plot(x, mean, label=label(m), lw=2.5 if m == "refuel" else 1.2)
        a.fill_between(x, mean - hw, mean + hw, alpha=0.15)
    a.axhline(results["optimum"]["J_avg"], color="k", ls="--", label="max J")
    a.set(xlabel="iteration t", ylabel="exact J(pi_t), mean over H", title="Exact expected reward during training")
    a.legend(fontsize=7)
    width = 0.8 / max(1, len(summary))
    for i, (m, s) in enumerate(summary.items()):
        means = [x[0] for x in s["reward_by_h"]]
        errs = [x[1] for x in s["reward_by_h"]]
        b.bar(np.arange(MAX_TURNS) + i * width, means, width, yerr=errs, label=label(m))
    b.plot(np.arange(MAX_TURNS) + 0.4 - width / 2, results["optimum"]["reward_by_h"], "k_", ms=30, mew=2, label="max J")
    b.set_xticks(np.arange(MAX_TURNS) + 0.4 - width / 2, [f"H = {h}" for h in range(1, MAX_TURNS + 1)])
    b.set(ylabel="exact expected reward", title="Final policies by dialogue length (95 % CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_root = out / "runs"
    if run_root.exists() and any(run_root.iterdir()):
        print(f"{run_root} is not empty; choose another --output-dir or remove it", file=sys.stderr)
        return 2
    start = time.perf_counter()
    run_root.mkdir(parents=True, exist_ok=True)
    policies = {s: build_synthetic_policy(out / "policies" / f"seed{s}", seed=s) for s in range(args.seeds)}
    if args.covariate_shift_only:
        runs: list[dict] = []
        c5 = claim_covariate_shift(runs, policies, args, run_root)
        results = {"config": vars(args), "claim5": c5, "runs": runs, "wall_s": time.perf_counter() - start}
        (out / "results.json").write_text(json.dumps(results, indent=1))
        text = covariate_shift_markdown(c5) + f"\nRun: {results['wall_s'] / 60:.1f} min.\n"
        (out / "results.md").write_text(text)
        print(text + f"\nwrote {out / 'results.md'}, {out / 'results.json'}")
        return 0
    print("claim 1: unbiasedness of r - r'", flush=True)
    c1 = claim_unbiased(policies[0], args.claim1_prompts, seed=11)
    print("claim 2: the minimiser of eq. 1", flush=True)
    c2 = claim_update(policies[0], args.claim2_prompts, args.claim2_steps, args.eta, args.lr, seed=12)
    methods = list(dict.fromkeys(["refuel", *args.methods]))
    runs = []
    for method, seed in tqdm([(m, s) for m in methods for s in range(args.seeds)], desc="train runs", unit="run"):
        runs.append(train_run(method, seed, policies[seed], args, run_root))
    summary = summarise(runs, methods, args.seeds)
    print("claim 5: covariate shift", flush=True)
    c5 = claim_covariate_shift(runs, policies, args, run_root)
    optimum = sx.optimal_policy(MAX_TURNS)
    initial = [r["history"][0] for r in runs if r["method"] == "refuel"]
    opt_returns = sx.per_turn_returns(optimum)
    curve = summary["refuel"]["curve"]
    gain = (curve[-1][0] - curve[0][0]) / (float(np.mean(opt_returns)) - curve[0][0])
    c3 = {"curve": curve, "gain_share": gain,
          "holds": bool(all(b[0] >= a[0] - 0.02 for a, b in zip(curve, curve[1:])) and gain >= 0.8)}
    results = {
        "config": {k: v for k, v in vars(args).items()},
        "claim1": c1, "claim2": c2, "claim3": c3, "claim4": summary, "claim5": c5,
        "optimum": {"reward_by_h": opt_returns, "J_avg": float(np.mean(opt_returns)),
                    "refuel_objective": sx.average_return(optimum, MAX_TURNS, sx.refuel_horizon_weights())},
        "initial": {"reward_by_h": np.mean([h["reward_by_h"] for h in initial], axis=0).tolist(),
                    "reward_avg": float(np.mean([h["reward_avg"] for h in initial]))},
        "runs": runs,
        "wall_s": time.perf_counter() - start,
    }
    results["ordering"] = ordering(summary)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "verify_refuel.png")
    print(markdown(results))
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'verify_refuel.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
