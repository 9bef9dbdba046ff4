"""The agents' networks: a batch of observations to outputs of a given shape each (Q-values, return distributions)."""

import math

import numpy as np
import torch
from torch import nn

from rl_pipeline.agents.noisy import NoisyLinear
from rl_pipeline.validation import boolean, expected, one_of, positive_int

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU}


def checked_hidden_sizes(sizes) -> list[int]:
    if isinstance(sizes, (str, int)) or not sizes:
        raise expected("hidden_sizes", "a non-empty list of positive integers", sizes)
    return [positive_int("hidden_sizes", size) for size in sizes]


def dense_layers(input_size: int, sizes: list[int], activation: str, noisy: bool = False) -> list[nn.Module]:
    """Linear layers of the given sizes (noisy ones where asked), each followed by the activation."""
    one_of("activation", activation, ACTIVATIONS)
    linear = NoisyLinear if noisy else nn.Linear
    layers: list[nn.Module] = []
    for n_in, n_out in zip([input_size, *sizes[:-1]], sizes):
        layers += [linear(n_in, n_out), ACTIVATIONS[activation]()]
    return layers


def checked_output_shape(shape) -> tuple[int, ...]:
    """(num_actions,) for one Q-value per action, (num_actions, atoms) for a distribution over each."""
    if isinstance(shape, (str, int)) or not shape:
        raise expected("output_shape", "a non-empty tuple of positive integers", shape)
    return tuple(positive_int("output_shape", size) for size in shape)


class LinearHead(nn.Module):
    """One linear layer from features to the outputs, shaped [batch, *output_shape]."""

    def __init__(self, in_features: int, output_shape: tuple[int, ...], noisy: bool = False):
        super().__init__()
        self.output_shape = output_shape
        self.linear = (NoisyLinear if noisy else nn.Linear)(in_features, math.prod(output_shape))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features).view(-1, *self.output_shape)


class DuelingHead(nn.Module):
    """The dueling architecture (Wang et al., 2016): Q(s, a) = V(s) + A(s, a) − mean_a' A(s, a').

    The value and the advantage stream each have one hidden layer of their own on shared features.
    For a distribution over each action's return (output_shape (actions, atoms)), the streams combine
    atom by atom, as in Rainbow.
    """

    def __init__(
        self, in_features: int, hidden_size: int, output_shape: tuple[int, ...], activation: str = "relu",
        noisy: bool = False,
    ):
        super().__init__()
        num_actions, *atoms = output_shape
        self.value = nn.Sequential(
            *dense_layers(in_features, [hidden_size], activation, noisy), LinearHead(hidden_size, (1, *atoms), noisy)
        )
        self.advantage = nn.Sequential(
            *dense_layers(in_features, [hidden_size], activation, noisy), LinearHead(hidden_size, output_shape, noisy)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        advantage = self.advantage(features)
        return self.value(features) + advantage - advantage.mean(dim=1, keepdim=True)


class MLP(nn.Module):
    """Fully connected network on flat observations, to outputs of `output_shape` per observation.

    `dueling` puts a dueling head on it instead of a linear one: the hidden layers but the last are
    shared, and the last is each stream's. `noisy` makes every linear layer a noisy one.
    """

    def __init__(
        self,
        observation_shape: tuple[int, ...],
        output_shape: tuple[int, ...],
        hidden_sizes: list[int] = (64, 64),
        activation: str = "relu",
        dueling: bool = False,
        noisy: bool = False,
    ):
        super().__init__()
        sizes = checked_hidden_sizes(hidden_sizes)
        output_shape = checked_output_shape(output_shape)
        input_size = math.prod(observation_shape)
        dueling, noisy = boolean("dueling", dueling), boolean("noisy", noisy)
        trunk_sizes = sizes[:-1] if dueling else sizes
        self.trunk = nn.Sequential(nn.Flatten(), *dense_layers(input_size, trunk_sizes, activation, noisy))
        features = [input_size, *trunk_sizes][-1]
        if dueling:
            self.head = DuelingHead(features, sizes[-1], output_shape, activation, noisy)
        else:
            self.head = LinearHead(features, output_shape, noisy)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(observations.float()))


def nature_conv_trunk(observation_shape: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    """The Nature DQN's three conv layers on [channels, height, width] pixels; returns it and its output size."""
    if len(observation_shape) != 3 or min(observation_shape[1:]) < 36:
        raise expected(
            "observation_shape", "image observations [channels, height >= 36, width >= 36] (transforms=atari)",
            tuple(observation_shape),
        )
    trunk = nn.Sequential(
        nn.Conv2d(observation_shape[0], 32, kernel_size=8, stride=4), nn.ReLU(),
        nn.Conv2d(32, 64, kernel_size=4, stride=2), nn.ReLU(),
        nn.Conv2d(64, 64, kernel_size=3, stride=1), nn.ReLU(),
        nn.Flatten(),
    )
    with torch.no_grad():
        features = trunk(torch.zeros(1, *observation_shape)).shape[1]
    return trunk, features


class NatureCNN(nn.Module):
    """The Nature DQN (Mnih et al., 2015): three conv layers, a hidden layer of 512, the outputs per observation.

    `dueling` puts a dueling head on the conv layers instead, its streams of `hidden_size` each;
    `noisy` makes the fully connected layers noisy ones.
    Takes uint8 pixels and scales them to [0, 1] itself, so the exported model takes the env's frames.
    """

    def __init__(
        self, observation_shape: tuple[int, ...], output_shape: tuple[int, ...], hidden_size: int = 512,
        dueling: bool = False, noisy: bool = False,
    ):
        super().__init__()
        self.trunk, features = nature_conv_trunk(observation_shape)
        hidden_size = positive_int("hidden_size", hidden_size)
        output_shape, noisy = checked_output_shape(output_shape), boolean("noisy", noisy)
        if boolean("dueling", dueling):
            self.head = DuelingHead(features, hidden_size, output_shape, noisy=noisy)
        else:
            self.head = nn.Sequential(
                *dense_layers(features, [hidden_size], "relu", noisy), LinearHead(hidden_size, output_shape, noisy)
            )

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(observations.float() / 255.0))


@torch.no_grad()
def update_target(target_network: nn.Module, q_network: nn.Module, tau: float) -> None:
    """Polyak averaging θ⁻ ← τθ + (1 − τ)θ⁻; tau = 1 is the hard copy of the original DQN."""
    for target, online in zip(target_network.parameters(), q_network.parameters()):
        if tau == 1.0:
            target.copy_(online)  # exact, where lerp would round
        else:
            target.lerp_(online, tau)


@torch.no_grad()
def greedy_actions(policy: nn.Module, observations: np.ndarray, device: torch.device | None = None) -> np.ndarray:
    """argmax_a Q(s, a) for each observation of the batch, on the policy's device (given, where known: finding
    it walks the policy's modules)."""
    device = device or next(policy.parameters()).device
    return policy(torch.as_tensor(observations, device=device)).argmax(dim=1).cpu().numpy()
