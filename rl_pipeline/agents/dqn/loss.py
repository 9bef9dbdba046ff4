"""DQN's temporal-difference loss: n-step and double-DQN targets, Huber or squared error, importance weights.

A value loss says what the network it trains must output (`output_shape`), how those outputs become
Q-values (`q_values`, the module that the acting and exported policy ends with) and what they cost
on a batch. DQN's network outputs the Q-values themselves.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rl_pipeline.data.buffers import Batch
from rl_pipeline.validation import boolean, one_of, probability

ELEMENTWISE_LOSSES = {"huber": F.smooth_l1_loss, "mse": F.mse_loss}  # called with reduction="none"


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    errors: torch.Tensor  # per sample, detached: what prioritized replay ranks by (DQN: the TD error y − Q(s, a))
    q_taken: torch.Tensor  # per sample, detached: Q(s, a)


def taken(outputs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Each sample's outputs for the action it took: [batch, actions, *rest] -> [batch, *rest]."""
    index = actions.view(-1, 1, *([1] * (outputs.dim() - 2))).expand(-1, 1, *outputs.shape[2:])
    return outputs.gather(1, index).squeeze(1)


def discounts(batch: Batch, gamma: float) -> torch.Tensor:
    """γᵏ (1 − terminated) per sample, k its env steps: what the next state's value counts for (a truncated
    episode still bootstraps)."""
    return gamma**batch.steps * (1.0 - batch.terminated)


@torch.no_grad()
def next_actions(
    q_values: nn.Module, online: nn.Module, target_outputs: torch.Tensor, batch: Batch, double_dqn: bool
) -> torch.Tensor:
    """a* in s': the target network's greedy action, or the online network's (double DQN)."""
    outputs = online(batch.next_observations) if double_dqn else target_outputs
    return q_values(outputs).argmax(dim=1)


class DQNLoss:
    def __init__(self, gamma: float = 0.99, loss: str = "huber", double_dqn: bool = False):
        self.gamma = probability("gamma", gamma)
        self.elementwise_loss = ELEMENTWISE_LOSSES[one_of("loss", loss, ELEMENTWISE_LOSSES)]
        self.double_dqn = boolean("double_dqn", double_dqn)
        self.q_values = nn.Identity()

    def output_shape(self, num_actions: int) -> tuple[int, ...]:
        return (num_actions,)

    @torch.no_grad()
    def td_target(self, q_network: nn.Module, target_network: nn.Module, batch: Batch) -> torch.Tensor:
        """y = r + γᵏ (1 − terminated) Q⁻(s', a*)."""
        next_q = target_network(batch.next_observations)
        next_value = taken(next_q, next_actions(self.q_values, q_network, next_q, batch, self.double_dqn))
        return batch.rewards + discounts(batch, self.gamma) * next_value

    def __call__(self, q_network: nn.Module, target_network: nn.Module, batch: Batch) -> LossOutput:
        td_target = self.td_target(q_network, target_network, batch)
        q_taken = taken(q_network(batch.observations), batch.actions)
        loss = (batch.weights * self.elementwise_loss(q_taken, td_target, reduction="none")).mean()
        return LossOutput(loss, (td_target - q_taken).detach(), q_taken.detach())
