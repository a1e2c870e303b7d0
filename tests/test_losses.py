"""Losses against hand-worked numbers, their gradients, and the original release's eta convention."""

from __future__ import annotations

import math

import pytest
import torch

from refuel_agents.losses import (
    dpo_loss,
    implied_reward_gap,
    log_ratio_gap,
    rebel_loss,
    refuel_loss,
    regression_sign_agreement,
)


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, requires_grad=grad)


# Three pairs, eta = 2.
#   pair 1: (-10 - -11) - (-12 - -12) =  1   -> 1/2 = 0.5;  r - r' = 1.0 - 0.5  =  0.5 -> residual  0
#   pair 2: (-20 - -20) - (-15 - -16) = -1   -> -0.5;       r - r' = 0.75 - 0.25 = 0.5 -> residual -1
#   pair 3: ( -5 -  -8) - ( -4 -  -3) =  4   -> 2;          r - r' = 0 - 0.5   = -0.5 -> residual  2.5
#   loss = (0 + 1 + 6.25) / 3 = 7.25 / 3
LOGP_Y, LOGP_T_Y = (-10.0, -20.0, -5.0), (-11.0, -20.0, -8.0)
LOGP_Y2, LOGP_T_Y2 = (-12.0, -15.0, -4.0), (-12.0, -16.0, -3.0)
REWARD_Y, REWARD_Y2 = (1.0, 0.75, 0.0), (0.5, 0.25, 0.5)
ETA = 2.0


def pairs(grad: bool = False) -> tuple[torch.Tensor, ...]:
    return (
        t(*LOGP_Y, grad=grad),
        t(*LOGP_T_Y),
        t(*LOGP_Y2, grad=grad),
        t(*LOGP_T_Y2),
        t(*REWARD_Y),
        t(*REWARD_Y2),
    )


def test_log_ratio_gap_and_implied_reward_gap():
    logp_y, logp_t_y, logp_y2, logp_t_y2, _, _ = pairs()
    torch.testing.assert_close(log_ratio_gap(logp_y, logp_t_y, logp_y2, logp_t_y2), t(1.0, -1.0, 4.0))
    torch.testing.assert_close(implied_reward_gap(logp_y, logp_t_y, logp_y2, logp_t_y2, ETA), t(0.5, -0.5, 2.0))


def test_refuel_loss_hand_computed():
    torch.testing.assert_close(refuel_loss(*pairs(), eta=ETA), torch.tensor(7.25 / 3))


def test_refuel_gradient_hand_computed_and_a_step_lowers_the_loss():
    """d loss / d logp_y = 2 * residual / eta / N: pair 1 -> 0, pair 2 -> 2 * -1 / 2 / 3 = -1/3,
    pair 3 -> 2 * 2.5 / 2 / 3 = 5/6; d loss / d logp_y2 is the negative of that."""
    inputs = pairs(grad=True)
    loss = refuel_loss(*inputs, eta=ETA)
    loss.backward()
    logp_y, _, logp_y2 = inputs[:3]
    torch.testing.assert_close(logp_y.grad, t(0.0, -1 / 3, 5 / 6))
    torch.testing.assert_close(logp_y2.grad, t(0.0, 1 / 3, -5 / 6))
    with torch.no_grad():
        logp_y -= 0.1 * logp_y.grad
        logp_y2 -= 0.1 * logp_y2.grad
    assert refuel_loss(*inputs, eta=ETA) < loss


def test_eta_scales_the_log_ratio_only():
    logp_y, logp_t_y, logp_y2, logp_t_y2, reward_y, reward_y2 = pairs()
    # Log ratios k times larger with eta k times larger predict the same reward gaps.
    scaled = refuel_loss(3 * logp_y, 3 * logp_t_y, 3 * logp_y2, 3 * logp_t_y2, reward_y, reward_y2, eta=3 * ETA)
    torch.testing.assert_close(scaled, refuel_loss(*pairs(), eta=ETA))
    # At pi = pi_t the log-ratio gap is zero and the loss is mean((r - r')^2) = (0.25 + 0.25 + 0.25) / 3
    # whatever eta is.
    for eta in (0.01, 1.0, 100.0):
        torch.testing.assert_close(
            refuel_loss(logp_t_y, logp_t_y, logp_t_y2, logp_t_y2, reward_y, reward_y2, eta=eta), torch.tensor(0.25)
        )


@pytest.mark.parametrize("eta", [0.5, 2.0, 10.0])
def test_original_release_variant_is_eta_squared_times_eq1(eta):
    """The original code regresses log_ratio_gap on eta * (r - r'): (g - eta*d)^2 = eta^2 (g/eta - d)^2.
    With eta = 2: (1 - 1)^2, (-1 - 1)^2, (4 + 1)^2 -> (0 + 4 + 25) / 3 = 29/3 = 4 * 7.25/3."""
    logp_y, logp_t_y, logp_y2, logp_t_y2, reward_y, reward_y2 = pairs()
    gap = log_ratio_gap(logp_y, logp_t_y, logp_y2, logp_t_y2)
    original = ((gap - eta * (reward_y - reward_y2)) ** 2).mean()
    torch.testing.assert_close(original, eta**2 * refuel_loss(*pairs(), eta=eta))
    if eta == 2.0:
        torch.testing.assert_close(original, torch.tensor(29 / 3))


def test_rebel_is_the_same_regression():
    torch.testing.assert_close(rebel_loss(*pairs(), eta=ETA), refuel_loss(*pairs(), eta=ETA))


def test_dpo_loss_hand_computed():
    """beta = 0.5.
    pair 1: (-10 - -12) - (-20 - -18) = 4 -> -logsigmoid(2) = log(1 + e^-2) = 0.126928
    pair 2: equal ratios, gap 0      -> -logsigmoid(0) = log 2          = 0.693147
    mean = 0.410038"""
    loss = dpo_loss(t(-10.0, -7.0), t(-20.0, -9.0), t(-12.0, -8.0), t(-18.0, -10.0), beta=0.5)
    expected = (math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2
    torch.testing.assert_close(loss, torch.tensor(expected))
    assert abs(expected - 0.410038) < 1e-6


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = t(-10.0, -7.0, grad=True), t(-20.0, -9.0, grad=True)
    loss = dpo_loss(chosen, rejected, t(-12.0, -8.0), t(-18.0, -10.0), beta=0.5)
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    # d/d chosen of -logsigmoid(beta*g) / N = -beta * sigmoid(-beta*g) / N; pair 2: -0.5 * 0.5 / 2 = -0.125
    torch.testing.assert_close(chosen.grad[1], torch.tensor(-0.125))
    with torch.no_grad():
        chosen -= 0.1 * chosen.grad
        rejected -= 0.1 * rejected.grad
    assert dpo_loss(chosen, rejected, t(-12.0, -8.0), t(-18.0, -10.0), beta=0.5) < loss


def test_regression_sign_agreement():
    # gaps 1, -1, 4, 0, 2 against reward gaps 0.5, 0.5, -0.5, 0.5, 0 (tie, left out):
    # agree, disagree, disagree, disagree (zero gap) -> 1/4.
    logp_y, logp_t_y = t(1.0, -1.0, 4.0, 0.0, 2.0), t(0.0, 0.0, 0.0, 0.0, 0.0)
    zeros = t(0.0, 0.0, 0.0, 0.0, 0.0)
    reward_y = t(0.5, 0.5, -0.5, 0.5, 0.0)
    assert regression_sign_agreement(logp_y, logp_t_y, zeros, zeros, reward_y, zeros).item() == 0.25
    assert regression_sign_agreement(logp_y, logp_t_y, zeros, zeros, -reward_y, zeros).item() == 0.5
    assert math.isnan(regression_sign_agreement(logp_y, logp_t_y, zeros, zeros, zeros, zeros).item())


def test_bad_input_is_reported():
    logp_y, logp_t_y, logp_y2, logp_t_y2, reward_y, reward_y2 = pairs()
    with pytest.raises(ValueError, match="eta must be > 0"):
        refuel_loss(*pairs(), eta=0.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(logp_y, logp_y2, logp_t_y, logp_t_y2, beta=-1.0)
    with pytest.raises(ValueError, match="one entry per pair"):
        refuel_loss(logp_y, logp_t_y, logp_y2, logp_t_y2, reward_y[:2], reward_y2, eta=ETA)
    with pytest.raises(ValueError, match="one entry per pair"):
        refuel_loss(*(x.reshape(3, 1) for x in pairs()), eta=ETA)
    with pytest.raises(ValueError, match="ref_rejected"):
        dpo_loss(logp_y, logp_y2, logp_t_y, logp_t_y2[:1], beta=0.1)


def test_dpo_loss_equals_trls_sigmoid_dpo_loss():
    """TRL's own code path: ``DPOTrainer._compute_loss`` with precomputed reference log-probs.

    Its ``self`` and model are minimal stand-ins: the model returns per-token log-probs whose sums
    over each sequence are the random sequence log-probs below (chosen rows first, then rejected,
    as TRL batches them), so TRL's loss is computed from exactly the inputs ``dpo_loss`` gets.
    """
    from collections import defaultdict
    from types import SimpleNamespace

    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

    torch.manual_seed(0)
    n, length, beta = 6, 5, 0.3
    policy_chosen, policy_rejected = -20 * torch.rand(n), -20 * torch.rand(n)
    ref_chosen, ref_rejected = -20 * torch.rand(n), -20 * torch.rand(n)

    class SummedLogprobs(torch.nn.Module):
        def forward(self, *, input_ids, labels, fused_lm_head, **kwargs):
            assert fused_lm_head
            per_token = torch.zeros(2 * n, length - 1)
            per_token[:, -1] = torch.cat([policy_chosen, policy_rejected])
            zeros = torch.zeros(2 * n, length - 1)
            return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                                   is_top1=zeros.bool(), aux_loss=None)

    identity = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=identity,
                                                                          gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2 * n, length, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, length, dtype=torch.long),
        "completion_mask": torch.ones(2 * n, length, dtype=torch.long),
        "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected,
    }
    theirs = trl_dpo.DPOTrainer._compute_loss(trainer, SummedLogprobs(), inputs, return_outputs=False)
    ours = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    assert trainer._metrics["train"]["rewards/accuracies"]  # TRL's full loss path ran
    assert 0.1 < ours.item() < 10  # the random margins give a non-trivial loss
