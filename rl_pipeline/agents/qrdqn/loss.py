"""QR-DQN's loss: N quantiles θ_1..θ_N of each action's return at the midpoints τ̂_i = (2i − 1) / 2N, fitted to
the target distribution's N samples T θ_j = r + γᵏ (1 − terminated) θ_j(s', a*) by the quantile Huber loss.

    ρ^κ_τ̂(u) = |τ̂ − 1{u < 0}| L_κ(u) / κ,   u = T θ_j − θ_i(s, a),   L_κ the Huber loss of threshold κ

summed over the N quantiles i and averaged over the N targets j (the paper's eq. 10). Q(s, a) is the
mean of its quantiles: a* = argmax_a of it, on the target network (or the online one: double DQN).
"""

import torch
from torch import nn

from rl_pipeline.agents.dqn.loss import LossOutput, discounts, next_actions, taken
from rl_pipeline.data.buffers import Batch
from rl_pipeline.validation import boolean, positive_int, positive_number, probability


class QuantileMean(nn.Module):
    """Q(s, a) = mean_i θ_i(s, a): [batch, actions, quantiles] -> [batch, actions]."""

    def forward(self, quantiles: torch.Tensor) -> torch.Tensor:
        return quantiles.mean(dim=-1)


def quantile_huber_loss(quantiles: torch.Tensor, targets: torch.Tensor, kappa: float) -> torch.Tensor:
    """Per sample: Σ_i mean_j ρ^κ_τ̂i(T θ_j − θ_i), for quantiles and targets of shape [batch, N]."""
    n = quantiles.shape[1]
    tau_hat = (torch.arange(n, device=quantiles.device, dtype=quantiles.dtype) + 0.5) / n
    u = targets.unsqueeze(1) - quantiles.unsqueeze(2)  # [batch, i, j]
    huber = torch.where(u.abs() <= kappa, 0.5 * u.pow(2), kappa * (u.abs() - 0.5 * kappa))
    weight = (tau_hat.view(1, n, 1) - (u.detach() < 0).to(u.dtype)).abs()
    return (weight * huber / kappa).mean(dim=2).sum(dim=1)


class QuantileHuberLoss:
    def __init__(self, gamma: float = 0.99, num_quantiles: int = 50, kappa: float = 1.0, double_dqn: bool = False):
        self.gamma = probability("gamma", gamma)
        self.num_quantiles = positive_int("num_quantiles", num_quantiles)
        self.kappa = positive_number("kappa", kappa)
        self.double_dqn = boolean("double_dqn", double_dqn)
        self.q_values = QuantileMean()

    def output_shape(self, num_actions: int) -> tuple[int, ...]:
        return (num_actions, self.num_quantiles)

    @torch.no_grad()
    def target_quantiles(self, network: nn.Module, target_network: nn.Module, batch: Batch) -> torch.Tensor:
        """T θ_j = r + γᵏ (1 − terminated) θ_j(s', a*), [batch, N]."""
        next_quantiles = target_network(batch.next_observations)
        a_star = next_actions(self.q_values, network, next_quantiles, batch, self.double_dqn)
        return batch.rewards.unsqueeze(1) + discounts(batch, self.gamma).unsqueeze(1) * taken(next_quantiles, a_star)

    def __call__(self, network: nn.Module, target_network: nn.Module, batch: Batch) -> LossOutput:
        targets = self.target_quantiles(network, target_network, batch)
        quantiles = taken(network(batch.observations), batch.actions)
        per_sample = quantile_huber_loss(quantiles, targets, self.kappa)
        loss = (batch.weights * per_sample).mean()
        return LossOutput(loss, per_sample.detach(), quantiles.mean(dim=1).detach())
