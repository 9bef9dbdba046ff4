"""QR-DQN's loss by hand: the quantile Huber loss with its asymmetric weights, and its target quantiles."""

import pytest
import torch
from torch import nn

from rl_pipeline.agents.qrdqn.loss import QuantileHuberLoss, QuantileMean, quantile_huber_loss
from rl_pipeline.data.buffers import Batch


class Fixed(nn.Module):
    """A network that outputs the same [actions, N] values for every observation."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values, dtype=torch.float32)

    def forward(self, observations):
        return self.values.expand(len(observations), *self.values.shape)


def batch(rewards=(1.0,), terminated=(0.0,), steps=(1,), weights=(1.0,), actions=(0,)) -> Batch:
    n = len(rewards)
    return Batch(
        observations=torch.zeros(n, 1), actions=torch.tensor(actions), rewards=torch.tensor(rewards),
        next_observations=torch.zeros(n, 1), terminated=torch.tensor(terminated), steps=torch.tensor(steps),
        weights=torch.tensor(weights),
    )


@pytest.mark.parametrize(("kappa", "expected"), [(1.0, 0.90625), (2.0, 0.640625)])
def test_the_quantile_huber_loss_by_hand(kappa, expected):
    # N = 2: τ̂ = (0.25, 0.75); θ = (0, 1); targets (0.5, 3). Each (i, j): |τ̂_i − 1{u < 0}| L_κ(u) / κ, u = T_j − θ_i.
    # κ = 1: i = 0: (0.25·0.125 + 0.25·2.5) / 2; i = 1: (0.25·0.125 + 0.75·1.5) / 2; summed over i.
    loss = quantile_huber_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 3.0]]), kappa)
    assert loss.tolist() == [expected]


def test_quantiles_below_their_targets_are_pulled_up_by_tau_and_those_above_pulled_down_by_one_minus_tau():
    # In the Huber loss's linear zone, ∂ρ/∂θ_i = −τ̂_i where the targets lie above, 1 − τ̂_i where below:
    # the asymmetry that makes θ_i the τ̂_i-quantile. τ̂ = (0.125, 0.375, 0.625, 0.875).
    for targets, expected in ((10.0, [-0.125, -0.375, -0.625, -0.875]), (-10.0, [0.875, 0.625, 0.375, 0.125])):
        quantiles = torch.zeros(1, 4, requires_grad=True)
        quantile_huber_loss(quantiles, torch.full((1, 3), targets), kappa=1.0).sum().backward()
        assert quantiles.grad.squeeze(0).tolist() == pytest.approx(expected, abs=1e-6)


def test_target_quantiles_follow_the_greedy_action_by_its_mean_quantile():
    # Q⁻(s', ·) = (mean(0, 4), mean(1, 2)) = (2, 1.5): a* = 0; double DQN asks the online network: a* = 1.
    target, online = Fixed([[0.0, 4.0], [1.0, 2.0]]), Fixed([[0.0, 0.0], [5.0, 5.0]])
    loss = QuantileHuberLoss(gamma=0.5, num_quantiles=2)
    assert loss.target_quantiles(online, target, batch()).tolist() == [[1.0, 3.0]]
    double = QuantileHuberLoss(gamma=0.5, num_quantiles=2, double_dqn=True)
    assert double.target_quantiles(online, target, batch()).tolist() == [[1.5, 2.0]]
    # terminated: no bootstrap; an n-step transition bootstraps with γ^k
    assert loss.target_quantiles(online, target, batch(terminated=(1.0,))).tolist() == [[1.0, 1.0]]
    assert loss.target_quantiles(online, target, batch(steps=(3,))).tolist() == [[1.0, 1.5]]


def test_the_loss_weighs_each_sample_and_reports_its_error_and_q_value():
    network = Fixed([[0.0, 1.0], [7.0, 9.0]])
    target = Fixed([[0.0, 4.0], [1.0, 2.0]])
    loss = QuantileHuberLoss(gamma=0.5, num_quantiles=2)
    # Sample 0 took action 0 (θ = (0, 1)), sample 1 action 1 (θ = (7, 9)); targets r + 0.5 (0, 4) = (1, 3).
    out = loss(network, target, batch(rewards=(1.0, 1.0), terminated=(0.0, 0.0), steps=(1, 1),
                                      weights=(1.0, 0.5), actions=(0, 1)))
    per_sample = quantile_huber_loss(torch.tensor([[0.0, 1.0], [7.0, 9.0]]), torch.tensor([[1.0, 3.0]] * 2), 1.0)
    assert out.errors.tolist() == per_sample.tolist()
    assert out.loss.item() == pytest.approx((per_sample[0] + 0.5 * per_sample[1]).item() / 2)
    assert out.q_taken.tolist() == [0.5, 8.0]


def test_q_values_are_the_mean_quantile_and_the_network_is_asked_for_n_per_action():
    assert QuantileMean()(torch.tensor([[[1.0, 3.0], [0.0, 10.0]]])).tolist() == [[2.0, 5.0]]
    assert QuantileHuberLoss(num_quantiles=25).output_shape(3) == (3, 25)
