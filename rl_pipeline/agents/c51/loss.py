"""C51's loss: each action's return as a categorical distribution p(s, a) over N fixed atoms
z_i = v_min + i Δz, Δz = (v_max − v_min) / (N − 1), the network giving its logits.

The target distribution moves each atom of p(s', a*) to T z_j = r + γᵏ (1 − terminated) z_j, clipped to
[v_min, v_max], and projects it back onto the atoms: atom i receives from atom j the share
max(0, 1 − |T z_j − z_i| / Δz) of its mass (all of it where T z_j lands on z_i, split between the
two neighbours otherwise). The loss is the cross-entropy −Σ_i m_i log p_i(s, a); Q(s, a) = Σ_i z_i p_i(s, a).
"""

import torch
import torch.nn.functional as F
from torch import nn

from rl_pipeline.agents.dqn.loss import LossOutput, discounts, next_actions, taken
from rl_pipeline.data.buffers import Batch
from rl_pipeline.errors import ConfigError
from rl_pipeline.validation import boolean, positive_int, probability


class CategoricalMean(nn.Module):
    """Q(s, a) = Σ_i z_i softmax(logits(s, a))_i: [batch, actions, atoms] -> [batch, actions]."""

    def __init__(self, support: torch.Tensor):
        super().__init__()
        self.register_buffer("support", support)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1) @ self.support


def project(probabilities: torch.Tensor, shifted_atoms: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """The distribution of mass `probabilities` [batch, N] at `shifted_atoms` [batch, N], clipped to the
    support's ends and split linearly between the two nearest atoms of `support` [N, evenly spaced].

    Each mass goes to atoms l and l + 1 with b = (T z − v_min) / Δz in [l, l + 1], l ≤ N − 2, in shares
    1 − (b − l) and b − l: mass exactly on an atom goes whole to it, where floor(b) and ceil(b) as the
    two atoms would share it out as 0 and 0.
    """
    n = len(support)
    b = (shifted_atoms.clamp(support[0], support[-1]) - support[0]) / (support[1] - support[0])
    lower = b.floor().clamp(max=n - 2).long()
    upper_share = b - lower
    m = probabilities.new_zeros(len(probabilities), n)
    m.scatter_add_(1, lower, probabilities * (1 - upper_share))
    m.scatter_add_(1, lower + 1, probabilities * upper_share)
    return m


class CategoricalLoss:
    def __init__(
        self, gamma: float = 0.99, num_atoms: int = 51, v_min: float = -10.0, v_max: float = 10.0,
        double_dqn: bool = False,
    ):
        self.gamma = probability("gamma", gamma)
        if positive_int("num_atoms", num_atoms) < 2:
            raise ConfigError("num_atoms", f"expected at least 2 atoms, got {num_atoms}")
        if not v_min < v_max:
            raise ConfigError("v_min", f"expected a number below v_max={v_max}, got {v_min!r}")
        self.double_dqn = boolean("double_dqn", double_dqn)
        # The atoms live in the Q-value head, a module of the agent's: they move to its device with it.
        self.q_values = CategoricalMean(torch.linspace(v_min, v_max, num_atoms))

    def output_shape(self, num_actions: int) -> tuple[int, ...]:
        return (num_actions, len(self.q_values.support))

    @torch.no_grad()
    def target_distribution(self, network: nn.Module, target_network: nn.Module, batch: Batch) -> torch.Tensor:
        """m: p(s', a*) moved to r + γᵏ (1 − terminated) z and projected onto the atoms, [batch, N]."""
        support = self.q_values.support
        next_logits = target_network(batch.next_observations)
        a_star = next_actions(self.q_values, network, next_logits, batch, self.double_dqn)
        shifted = batch.rewards.unsqueeze(1) + discounts(batch, self.gamma).unsqueeze(1) * support
        return project(taken(next_logits, a_star).softmax(dim=-1), shifted, support)

    def __call__(self, network: nn.Module, target_network: nn.Module, batch: Batch) -> LossOutput:
        m = self.target_distribution(network, target_network, batch)
        logits = taken(network(batch.observations), batch.actions)
        log_p = F.log_softmax(logits, dim=-1)
        cross_entropy = -(m * log_p).sum(dim=1)
        loss = (batch.weights * cross_entropy).mean()
        # Prioritized replay ranks by the KL divergence of p from m, as Rainbow does: the cross-entropy less m's entropy.
        kl = cross_entropy.detach() + torch.special.xlogy(m, m).sum(dim=1)
        q_taken = (log_p.detach().exp() * self.q_values.support).sum(dim=1)
        return LossOutput(loss, kl, q_taken)
