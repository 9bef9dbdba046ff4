"""Q-networks: map a batch of observations to one Q-value per action."""

import math

import torch
from torch import nn

from rl_pipeline.validation import expected, one_of, positive_int

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU}


def checked_hidden_sizes(sizes) -> list[int]:
    if isinstance(sizes, (str, int)) or not sizes:
        raise expected("hidden_sizes", "a non-empty list of positive integers", sizes)
    return [positive_int("hidden_sizes", size) for size in sizes]


def dense_layers(input_size: int, sizes: list[int], activation: str) -> list[nn.Module]:
    """Linear layers of the given sizes, each followed by the activation."""
    one_of("activation", activation, ACTIVATIONS)
    layers: list[nn.Module] = []
    for n_in, n_out in zip([input_size, *sizes[:-1]], sizes):
        layers += [nn.Linear(n_in, n_out), ACTIVATIONS[activation]()]
    return layers


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
        sizes = checked_hidden_sizes(hidden_sizes)
        hidden = dense_layers(math.prod(observation_shape), sizes, activation)
        self.layers = nn.Sequential(nn.Flatten(), *hidden, nn.Linear(sizes[-1], num_actions))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.layers(observations.float())


class DuelingMLP(nn.Module):
    """The dueling architecture (Wang et al., 2016) on flat observations: Q(s, a) = V(s) + A(s, a) − mean_a' A(s, a').

    The hidden layers but the last are shared; the value and the advantage stream each get their
    own last hidden layer.
    """

    def __init__(
        self,
        observation_shape: tuple[int, ...],
        num_actions: int,
        hidden_sizes: list[int] = (64, 64),
        activation: str = "relu",
    ):
        super().__init__()
        *shared_sizes, stream_size = checked_hidden_sizes(hidden_sizes)
        input_size = math.prod(observation_shape)
        self.trunk = nn.Sequential(nn.Flatten(), *dense_layers(input_size, shared_sizes, activation))
        trunk_size = [input_size, *shared_sizes][-1]
        self.value = nn.Sequential(*dense_layers(trunk_size, [stream_size], activation), nn.Linear(stream_size, 1))
        self.advantage = nn.Sequential(
            *dense_layers(trunk_size, [stream_size], activation), nn.Linear(stream_size, num_actions)
        )

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        features = self.trunk(observations.float())
        advantage = self.advantage(features)
        return self.value(features) + advantage - advantage.mean(dim=1, keepdim=True)


@torch.no_grad()
def update_target(target_network: nn.Module, q_network: nn.Module, tau: float) -> None:
    """Polyak averaging θ⁻ ← τθ + (1 − τ)θ⁻; tau = 1 is the hard copy of the original DQN."""
    for target, online in zip(target_network.parameters(), q_network.parameters()):
        if tau == 1.0:
            target.copy_(online)  # exact, where lerp would round
        else:
            target.lerp_(online, tau)
