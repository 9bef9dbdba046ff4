"""Q-networks: map a batch of observations to one Q-value per action."""

import math

import torch
from torch import nn

from rl_pipeline.validation import expected, one_of, positive_int

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU}


class MLP(nn.Module):
    """Fully connected Q-network on flat observations."""

    def __init__(
        self,
        observation_shape: tuple[int, ...],
        num_actions: int,
        hidden_sizes: list[int] = (64, 64),
        activation: str = "relu",
    ):
        super().__init__()
        if isinstance(hidden_sizes, (str, int)) or not hidden_sizes:
            raise expected("hidden_sizes", "a non-empty list of positive integers", hidden_sizes)
        for size in hidden_sizes:
            positive_int("hidden_sizes", size)
        one_of("activation", activation, ACTIVATIONS)
        sizes = [math.prod(observation_shape), *hidden_sizes]
        layers: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(n_in, n_out), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(sizes[-1], num_actions))
        self.layers = nn.Sequential(*layers)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.layers(observations.float())


@torch.no_grad()
def update_target(target_network: nn.Module, q_network: nn.Module, tau: float) -> None:
    """Polyak averaging θ⁻ ← τθ + (1 − τ)θ⁻; tau = 1 is the hard copy of the original DQN."""
    for target, online in zip(target_network.parameters(), q_network.parameters()):
        if tau == 1.0:
            target.copy_(online)  # exact, where lerp would round
        else:
            target.lerp_(online, tau)
