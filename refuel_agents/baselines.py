"""The baselines of paper section 4.1: REBEL and DPO, each trained on one data mode.

    python scripts/train_agent.py --agent rebel --mode lt-online
    python scripts/train_agent.py --agent dpo --mode mt-mixed --beta 0.1

Both reuse :class:`~refuel_agents.refuel.RefuelTrainer`'s loop (collect, log-probs of pi_t once
per iteration, mini-batch updates, checkpoints, evaluation) and change only what differs:

* the data: :func:`refuel_agents.modes.collect_pairs` in the configured ``mode`` (lt-offline,
  lt-mixed, lt-online, mt-mixed) instead of REFUEL's own collection;
* the loss. REBEL regresses the reward gap with the log-ratio gap, exactly eq. 1
  (:data:`~refuel_agents.losses.rebel_loss`), so only its data differ from REFUEL's. DPO orders
  each pair by reward (the higher reward is "chosen"; pairs with equal rewards are dropped and
  counted) and minimises the logistic loss :func:`~refuel_agents.losses.dpo_loss` with ``beta``.
  Its reference is the iteration's frozen policy pi_t by default (log-probs computed once before
  the updates, as REFUEL's are), or the initial policy pi_0 with ``reference_policy="initial"``.

:func:`make_trainer` builds any agent (REFUEL included) from its name, a mode and config fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from refuel_agents.losses import dpo_loss, log_ratio_gap
from refuel_agents.modes import BASELINE_MODES, MODE_HELP, ModeStats, collect_pairs, draw_prompt_indices
from refuel_agents.prompt_plan import iteration_seed
from refuel_agents.refuel import RefuelConfig, RefuelTrainer

REFERENCE_POLICIES = ("iteration", "initial")


@dataclass
class BaselineConfig(RefuelConfig):
    """A REFUEL configuration plus the data mode of a baseline."""

    mode: str | None = None
    """Data mode (required): lt-offline, lt-mixed, lt-online or mt-mixed (paper section 4.1; see refuel_agents.modes)."""

    def validate(self) -> None:
        if self.mode not in BASELINE_MODES:
            raise ValueError(
                f"invalid {type(self).__name__}: mode must be one of {list(BASELINE_MODES)}, got {self.mode!r} ("
                + "; ".join(f"{m}: {MODE_HELP[m]}" for m in BASELINE_MODES) + ")"
            )
        super().validate()


@dataclass
class RebelConfig(BaselineConfig):
    """REBEL: eq. 1's regression (eta as for REFUEL) on the pairs of one data mode."""


@dataclass
class DpoConfig(BaselineConfig):
    """DPO: the logistic loss on reward-ordered pairs of one data mode."""

    eta: float = 1.0
    """Not used by DPO (beta scales its log-ratio gap); kept so that every agent's config has one shape."""
    beta: float = 0.1
    """DPO's beta: the loss is -log sigmoid(beta * (log-ratio of chosen - log-ratio of rejected))."""
    reference_policy: str = "iteration"
    """DPO's reference: 'iteration' (the frozen policy pi_t of each iteration) or 'initial' (pi_0; needs reference_kl)."""

    def validate(self) -> None:
        problems = []
        if not self.beta > 0:
            problems.append(f"beta must be > 0, got {self.beta}")
        if self.reference_policy not in REFERENCE_POLICIES:
            problems.append(f"reference_policy must be one of {list(REFERENCE_POLICIES)}, got {self.reference_policy!r}")
        elif self.reference_policy == "initial" and not self.reference_kl:
            problems.append("reference_policy='initial' needs reference_kl (the frozen copy of the initial policy)")
        if problems:
            raise ValueError("invalid DPO configuration: " + "; ".join(problems))
        super().validate()


class RebelTrainer(RefuelTrainer):
    """REBEL on one data mode: REFUEL's loop and loss (eq. 1), the mode's pairs."""

    agent = "rebel"
    config: BaselineConfig

    @property
    def mode(self) -> str:
        return str(self.config.mode)

    def collect(self, iteration: int) -> tuple[list[dict], ModeStats]:
        cfg = self.config
        self.model.eval()
        # The on-policy modes walk the split as REFUEL does; the offline roll-ins draw usable training items
        # themselves, never a held-out one (with several ranks, the draw of the whole iteration is made on every
        # rank and each takes its shard).
        indices, seed = None, iteration_seed(cfg.seed, iteration)
        allowed = self.plan.training_indices()
        if self.mode == "lt-online":
            indices, seed = self.rank_prompts(self.prompt_indices(iteration), iteration)
        elif self.world > 1:
            drawn = draw_prompt_indices(self.mode, cfg.env_id, self.collect_env_kwargs, cfg.prompts_per_iteration or None,
                                        seed, allowed)
            indices, seed = self.rank_prompts(drawn, iteration)
        return collect_pairs(
            mode=self.mode, env_id=cfg.env_id, env_kwargs=self.collect_env_kwargs, policy=self.rollout_policy(),
            sampling=self.collection_sampling,
            num_prompts=len(indices) if indices is not None else cfg.prompts_per_iteration or None,
            seed=seed, prompt_indices=indices,
            kl_logprobs=self._kl_logprobs if self._env_has_kl() else None, progress=cfg.progress and self.rank == 0,
            penalties=self.penalties, allowed=allowed,
        )


class DpoTrainer(RebelTrainer):
    """DPO on one data mode: pairs ordered by reward, ties dropped, the logistic loss."""

    agent = "dpo"
    config: DpoConfig

    def collect(self, iteration: int) -> tuple[list[dict], ModeStats]:
        rows, stats = super().collect(iteration)
        kept = [r for r in rows if r["reward"] != r["reward_prime"]]
        stats.dropped_ties = len(rows) - len(kept)
        if rows and not kept:  # e.g. a policy that became deterministic: nothing to prefer, no update
            print(f"iteration {iteration}: all {len(rows)} pairs have equal rewards, so DPO has no preferred "
                  "response to learn from; this iteration makes no update", flush=True)
        return kept, stats

    def train_step(self, batch_rows: list[dict]) -> dict[str, float]:
        """One micro-batch: forward y and y' together, order each pair by reward, DPO's loss, backward."""
        n = len(batch_rows)
        logp, entropy, batch = self.pair_logprobs(self.engine.model, batch_rows, entropy=True)
        col = lambda key: torch.tensor([r[key] for r in batch_rows], dtype=torch.float32, device=self.device)  # noqa: E731
        ref = "logp_t" if self.config.reference_policy == "iteration" else "logp_ref"
        # y is the chosen response. Compared in Python floats (float64), the precision in which
        # collect() drops ties: float32 copies would round r = 0.30000001 and 0.3 to one value.
        first = torch.tensor([float(r["reward"]) > float(r["reward_prime"]) for r in batch_rows], device=self.device)
        pick = lambda a, b: (torch.where(first, a, b), torch.where(first, b, a))  # noqa: E731
        chosen, rejected = pick(logp[:n], logp[n:])
        ref_chosen, ref_rejected = pick(col(ref), col(f"{ref}_prime"))
        loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.config.beta)
        self.engine.backward(loss)
        margin = self.config.beta * log_ratio_gap(chosen.detach(), ref_chosen, rejected.detach(), ref_rejected)
        out = {
            "losses/loss": loss.item(),
            "charts/preference_accuracy": (margin > 0).float().mean().item(),
            "charts/margin": margin.mean().item(),
            "charts/entropy": entropy.mean().item(),
            "charts/reward_mean": float(np.mean([r["reward"] for r in batch_rows] + [r["reward_prime"] for r in batch_rows])),
            "tokens": int(batch["attention_mask"].sum()),
        }
        if self.reference is not None:
            out["charts/logratio_to_init"] = (logp.detach() - torch.cat([col("logp_ref"), col("logp_ref_prime")])).mean().item()
        return out


AGENTS: dict[str, tuple[type[RefuelConfig], type[RefuelTrainer]]] = {
    "refuel": (RefuelConfig, RefuelTrainer),
    "rebel": (RebelConfig, RebelTrainer),
    "dpo": (DpoConfig, DpoTrainer),
}


def make_config(agent: str, mode: str | None = None, **config_overrides: Any) -> RefuelConfig:
    """The config of ``agent`` ('refuel', 'rebel', 'dpo') in ``mode`` with fields overridden; validated."""
    if agent not in AGENTS:
        raise ValueError(f"unknown agent {agent!r}; the agents are {sorted(AGENTS)}")
    config_cls, _ = AGENTS[agent]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config_overrides) - names)
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no field(s) {unknown}; its fields are {sorted(names)}")
    if agent == "refuel":
        if mode not in (None, "refuel"):
            raise ValueError(f"REFUEL collects its own data (on-policy, multi-turn); it takes no mode, got {mode!r}")
        config = config_cls(**config_overrides)
    else:
        if "mode" in config_overrides:
            raise ValueError("pass the mode as make_trainer's second argument, not as a config field")
        config = config_cls(mode=mode, **config_overrides)
    config.validate()
    return config


def make_trainer(agent: str, mode: str | None = None, *, reward_model: Any = None,
                 **config_overrides: Any) -> RefuelTrainer:
    """The trainer of ``agent`` ('refuel', 'rebel' or 'dpo') on data ``mode`` (None for REFUEL).

    ``config_overrides`` are fields of the agent's config (``RefuelConfig``, ``RebelConfig`` or
    ``DpoConfig``), e.g. ``make_trainer("dpo", "lt-mixed", env_id="SyntheticDialogue-v0",
    iterations=1, beta=0.5)``; ``reward_model`` replaces the environment's reward model.
    """
    config = make_config(agent, mode, **config_overrides)
    return AGENTS[agent][1](config, reward_model=reward_model)
