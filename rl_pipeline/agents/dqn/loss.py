"""DQN's temporal-difference loss: n-step and double-DQN targets, Huber or squared error, importance weights."""

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
    td_error: torch.Tensor  # per sample, detached: y - Q(s, a)
    q_taken: torch.Tensor  # per sample, detached: Q(s, a)


class DQNLoss:
    def __init__(self, gamma: float = 0.99, loss: str = "huber", double_dqn: bool = False):
        self.gamma = probability("gamma", gamma)
        self.elementwise_loss = ELEMENTWISE_LOSSES[one_of("loss", loss, ELEMENTWISE_LOSSES)]
        self.double_dqn = boolean("double_dqn", double_dqn)

    @torch.no_grad()
    def td_target(self, q_network: nn.Module, target_network: nn.Module, batch: Batch) -> torch.Tensor:
        """y = r + γᵏ (1 − terminated) Q⁻(s', a*), k the transition's env steps: a truncated episode still bootstraps."""
        next_q = target_network(batch.next_observations)
        if self.double_dqn:  # a* from the online network, its value from the target network
            next_actions = q_network(batch.next_observations).argmax(dim=1, keepdim=True)
            next_value = next_q.gather(1, next_actions).squeeze(1)
        else:
            next_value = next_q.max(dim=1).values
        return batch.rewards + self.gamma**batch.steps * (1.0 - batch.terminated) * next_value

    def __call__(self, q_network: nn.Module, target_network: nn.Module, batch: Batch) -> LossOutput:
        td_target = self.td_target(q_network, target_network, batch)
        q_taken = q_network(batch.observations).gather(1, batch.actions.unsqueeze(1)).squeeze(1)
        loss = (batch.weights * self.elementwise_loss(q_taken, td_target, reduction="none")).mean()
        return LossOutput(loss, (td_target - q_taken).detach(), q_taken.detach())
