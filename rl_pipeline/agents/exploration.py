"""How the behaviour policy departs from the greedy one once the warm-up is over: ε-greedy, or noisy nets."""

import numpy as np
import torch
from torch import nn

from rl_pipeline.agents.networks import greedy_actions
from rl_pipeline.agents.noisy import noisy_layers, resample_noise
from rl_pipeline.data.schedule import linear_schedule
from rl_pipeline.errors import ConfigError
from rl_pipeline.validation import positive_int, probability


def epsilon_greedy(
    policy: nn.Module, observations: np.ndarray, epsilon: float, num_actions: int, device: torch.device
) -> np.ndarray:
    """Each observation's greedy action, or with probability ε a uniformly random one."""
    explore = torch.rand(len(observations)) < epsilon
    random_actions = torch.randint(num_actions, (len(observations),)).numpy()
    if explore.all():  # no greedy action needed: spare the forward pass (all of warm-up)
        return random_actions
    return np.where(explore.numpy(), random_actions, greedy_actions(policy, observations, device))


class EpsilonGreedy:
    """ε annealed linearly from `epsilon_start` to `epsilon_end` over `epsilon_fraction` of the env-step budget."""

    def __init__(
        self, max_env_steps: int, epsilon_start: float = 1.0, epsilon_end: float = 0.05, epsilon_fraction: float = 0.1
    ):
        self.epsilon_start = probability("epsilon_start", epsilon_start)
        self.epsilon_end = probability("epsilon_end", epsilon_end)
        self.epsilon_duration = int(probability("epsilon_fraction", epsilon_fraction) * positive_int(
            "max_env_steps", max_env_steps
        ))

    def check_network(self, network: nn.Module) -> None:
        """Any network explores by ε."""

    def epsilon(self, env_steps: int) -> float:
        return linear_schedule(self.epsilon_start, self.epsilon_end, self.epsilon_duration, env_steps)

    def perturb(self, network: nn.Module) -> None:
        """ε-greedy leaves the network as it is."""


class NoisyNets:
    """Exploration by the network's own noisy layers (Fortunato et al., 2018): fresh noise at every act
    step, then the greedy action; no ε."""

    def check_network(self, network: nn.Module) -> None:
        if not noisy_layers(network):
            raise ConfigError(
                "exploration", "noisy exploration needs a network with noisy layers (network.noisy=true)", rooted=True
            )

    def epsilon(self, env_steps: int) -> float:
        return 0.0

    def perturb(self, network: nn.Module) -> None:
        resample_noise(network)
