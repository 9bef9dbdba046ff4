"""DQN (Mnih et al., 2015) and the value-based family that shares its update: a loss on the online network's
outputs against a frozen target network's, one optimizer step, the target synced on schedule.

The loss decides what the network outputs: Q-values (DQN), quantiles (QR-DQN) or a categorical
distribution (C51); this agent is the same for all of them.
"""

import copy

import gymnasium
import torch
from torch import nn

from rl_pipeline.agents.base import OffPolicyAgent, Update, check_outputs
from rl_pipeline.agents.dqn.loss import DQNLoss
from rl_pipeline.agents.evaluation import Evaluator
from rl_pipeline.agents.exploration import EpsilonGreedy, NoisyNets
from rl_pipeline.agents.networks import update_target
from rl_pipeline.agents.noisy import resample_noise
from rl_pipeline.data.buffers import Batch, UniformReplayBuffer
from rl_pipeline.data.collector import Collector
from rl_pipeline.data.schedule import Schedule
from rl_pipeline.errors import TrainingDiverged
from rl_pipeline.validation import expected, positive_int, positive_number, probability


class DQN(OffPolicyAgent):
    """Every `updates_per_iteration` updates of an iteration minimises `loss`; every
    `target_sync_interval_updates` updates, θ⁻ ← τθ + (1 − τ)θ⁻ (τ = 1: a hard copy)."""

    def __init__(
        self,
        network: nn.Module,
        loss: DQNLoss,
        observation_space: gymnasium.Space,
        buffer: UniformReplayBuffer,
        collector: Collector,
        exploration: EpsilonGreedy | NoisyNets,
        optimizer: torch.optim.Optimizer,
        transforms: list,
        evaluator: Evaluator,
        schedule: Schedule,
        checkpoint_buffer_max_bytes: float = float("inf"),
        n_step: int = 1,
        updates_per_iteration: int = 1,
        target_sync_interval_updates: int = 1000,
        target_sync_tau: float = 1.0,
        max_grad_norm: float | None = None,
    ):
        check_outputs(network, observation_space, loss.output_shape(collector.num_actions))
        super().__init__(
            network, loss.q_values, buffer, collector, exploration, optimizer, transforms, evaluator, schedule,
            gamma=loss.gamma, n_step=n_step, updates_per_iteration=updates_per_iteration,
            checkpoint_buffer_max_bytes=checkpoint_buffer_max_bytes,
        )
        self.target_network = copy.deepcopy(network).requires_grad_(False)
        self.loss = loss
        self.target_sync_interval_updates = positive_int("target_sync_interval_updates", target_sync_interval_updates)
        if probability("target_sync_tau", target_sync_tau) == 0:
            raise expected("target_sync_tau", "a number in (0, 1]", target_sync_tau)
        self.target_sync_tau = target_sync_tau
        self.max_grad_norm = None if max_grad_norm is None else positive_number("max_grad_norm", max_grad_norm)

    def learn(self, batch: Batch) -> Update:
        """One gradient step on the loss of `batch`; writes its errors back as priorities; syncs θ⁻ on schedule."""
        resample_noise(self.network)  # noisy nets: new noise for each update, in both networks
        resample_noise(self.target_network)
        out = self.loss(self.network, self.target_network, batch)
        if not torch.isfinite(out.loss):
            raise TrainingDiverged(
                f"loss is {out.loss.item()} at env step {self.env_steps} (update {self.num_updates})"
            )
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(out.loss)
        grad_norm = self.clip_gradient()
        optimizer.step()
        self.buffer.update_priorities(batch.indices, out.errors)
        if self.num_updates % self.target_sync_interval_updates == 0:
            update_target(self.target_network, self.network, self.target_sync_tau)
        return Update(out.loss.detach(), out.q_taken.mean(), grad_norm)

    def clip_gradient(self) -> torch.Tensor:
        """Clips the gradient's norm to max_grad_norm, where that is set; returns the norm before clipping."""
        if self.max_grad_norm is None:
            return nn.utils.get_total_norm([p.grad for p in self.network.parameters() if p.grad is not None])
        return nn.utils.clip_grad_norm_(self.network.parameters(), self.max_grad_norm)
