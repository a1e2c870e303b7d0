"""Losses of REFUEL and its baselines, as pure functions of per-pair tensors.

Every input is a 1-D tensor with one entry per pair: summed response log-probabilities (see
:mod:`refuel_agents.logprobs`) under the policy being trained (``logp_*``) and under the
iteration's frozen policy pi_t or reference model (``logp_t_*`` / ``ref_*``), and rewards.
Each loss returns the mean over the pairs and nothing else.

REFUEL (paper eq. 1) regresses the relative future reward with the scaled log-ratio gap::

    ( (1/eta) * [ (log pi(y|s) - log pi_t(y|s)) - (log pi(y'|s) - log pi_t(y'|s)) ] - (r - r') )^2

REBEL is the same regression on single-turn (last-turn) data, so :data:`rebel_loss` is
:func:`refuel_loss`. DPO is the logistic loss on the same log-ratio gap, chosen minus rejected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pairs(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"expected 1-D tensors of one shape (one entry per pair), got shapes {shapes}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def log_ratio_gap(
    logp_y: torch.Tensor, logp_t_y: torch.Tensor, logp_y2: torch.Tensor, logp_t_y2: torch.Tensor
) -> torch.Tensor:
    """Per pair: (log pi(y) - log pi_t(y)) - (log pi(y') - log pi_t(y'))."""
    _check_pairs(logp_y=logp_y, logp_t_y=logp_t_y, logp_y2=logp_y2, logp_t_y2=logp_t_y2)
    return (logp_y - logp_t_y) - (logp_y2 - logp_t_y2)


def refuel_loss(
    logp_y: torch.Tensor,
    logp_t_y: torch.Tensor,
    logp_y2: torch.Tensor,
    logp_t_y2: torch.Tensor,
    reward_y: torch.Tensor,
    reward_y2: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """REFUEL's squared regression loss (paper eq. 1), averaged over the pairs.

    mean( ((1/eta) * log_ratio_gap - (reward_y - reward_y2))^2 ).

    :func:`refuel_loss_original` is the original release's form, exactly ``eta**2`` times this
    one: the same minimiser, gradients ``eta**2`` times larger. Adam divides each gradient element
    by the root of its second moment plus ``eps``, so the scale cancels only for elements well
    above ``eps``. At large eta this form's gradients are ``eta**2`` times smaller and many
    elements fall near or below ``eps`` (1e-8): the steps are smaller than the original form's,
    and learning rates copied from the release are too small here. On the 2-layer test model
    with a reward gap of 0.01, the first AdamW step at eta = 1e3 is 0.87x the original form's
    (0.61x at eta = 1e4; ``tests/test_paper_fidelity.py``); at eta = 1 the two are identical.
    Pick ``loss_scale="original"`` in the trainers to train with the release's form.
    """
    _check_positive("eta", eta)
    _check_pairs(logp_y=logp_y, reward_y=reward_y, reward_y2=reward_y2)
    gap = log_ratio_gap(logp_y, logp_t_y, logp_y2, logp_t_y2)
    return ((gap / eta - (reward_y - reward_y2)) ** 2).mean()


def refuel_loss_original(
    logp_y: torch.Tensor,
    logp_t_y: torch.Tensor,
    logp_y2: torch.Tensor,
    logp_t_y2: torch.Tensor,
    reward_y: torch.Tensor,
    reward_y2: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """The original release's parameterisation of eq. 1, averaged over the pairs.

    mean( (log_ratio_gap - eta * (reward_y - reward_y2))^2 ) = eta^2 * :func:`refuel_loss`.
    """
    _check_positive("eta", eta)
    _check_pairs(logp_y=logp_y, reward_y=reward_y, reward_y2=reward_y2)
    gap = log_ratio_gap(logp_y, logp_t_y, logp_y2, logp_t_y2)
    return ((gap - eta * (reward_y - reward_y2)) ** 2).mean()


#: The trainers' ``loss_scale`` choices: eq. 1 as the paper writes it, or the original release's form.
LOSS_SCALES = {"paper": refuel_loss, "original": refuel_loss_original}

rebel_loss = refuel_loss
"""REBEL's loss: the REFUEL regression applied to last-turn pairs (same arguments, same formula)."""


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO's sigmoid loss, averaged over the pairs.

    mean( -logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))) ).
    """
    _check_positive("beta", beta)
    _check_pairs(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
    )
    return -F.logsigmoid(beta * log_ratio_gap(policy_chosen, ref_chosen, policy_rejected, ref_rejected)).mean()


def implied_reward_gap(
    logp_y: torch.Tensor, logp_t_y: torch.Tensor, logp_y2: torch.Tensor, logp_t_y2: torch.Tensor, eta: float
) -> torch.Tensor:
    """Per pair: the reward gap r - r' that the policy predicts, (1/eta) * log_ratio_gap (for logging)."""
    _check_positive("eta", eta)
    return log_ratio_gap(logp_y, logp_t_y, logp_y2, logp_t_y2) / eta


@torch.no_grad()
def regression_sign_agreement(
    logp_y: torch.Tensor,
    logp_t_y: torch.Tensor,
    logp_y2: torch.Tensor,
    logp_t_y2: torch.Tensor,
    reward_y: torch.Tensor,
    reward_y2: torch.Tensor,
) -> torch.Tensor:
    """Fraction of pairs whose log-ratio gap has the (strict) sign of the reward gap (for logging).

    Pairs with equal rewards carry no sign and are left out; NaN when every pair ties. A zero
    log-ratio gap (as at the start of an iteration, where pi = pi_t) agrees with no pair.
    """
    _check_pairs(logp_y=logp_y, reward_y=reward_y, reward_y2=reward_y2)
    reward_sign = torch.sign(reward_y - reward_y2)
    agree = torch.sign(log_ratio_gap(logp_y, logp_t_y, logp_y2, logp_t_y2)) == reward_sign
    return agree[reward_sign != 0].float().mean()
