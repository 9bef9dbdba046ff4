"""Noisy nets (Fortunato et al., 2018): linear layers whose weights carry learned, factorised Gaussian noise.

In training mode a layer computes with μ + σ ⊙ ε, the noise ε held as a buffer (so checkpoints keep
it) until `resample_noise` draws a new one; in eval mode it computes with μ alone: evaluation and the
exported policy act on the mean weights.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def scaled_noise(size: int) -> torch.Tensor:
    """f(x) = sgn(x) √|x| of standard normal draws: the paper's factorised noise."""
    x = torch.randn(size)
    return x.sign() * x.abs().sqrt()


class NoisyLinear(nn.Module):
    """y = (μʷ + σʷ ⊙ εʷ) x + μᵇ + σᵇ ⊙ εᵇ, with εʷ = f(ε_out) f(ε_in)ᵀ and εᵇ = f(ε_out)."""

    def __init__(self, in_features: int, out_features: int, sigma_0: float = 0.5):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1 / math.sqrt(in_features)
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.weight_sigma = nn.Parameter(torch.full((out_features, in_features), sigma_0 * bound))
        self.bias_mu = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        self.bias_sigma = nn.Parameter(torch.full((out_features,), sigma_0 * bound))
        self.register_buffer("weight_epsilon", torch.zeros(out_features, in_features))
        self.register_buffer("bias_epsilon", torch.zeros(out_features))
        self.resample()

    @torch.no_grad()
    def resample(self) -> None:
        epsilon_in, epsilon_out = scaled_noise(self.in_features), scaled_noise(self.out_features)
        self.weight_epsilon.copy_(torch.outer(epsilon_out, epsilon_in))
        self.bias_epsilon.copy_(epsilon_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.weight_mu, self.bias_mu)
        weight = self.weight_mu + self.weight_sigma * self.weight_epsilon
        return F.linear(x, weight, self.bias_mu + self.bias_sigma * self.bias_epsilon)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def noisy_layers(network: nn.Module) -> list[NoisyLinear]:
    return [module for module in network.modules() if isinstance(module, NoisyLinear)]


def resample_noise(network: nn.Module) -> None:
    """New noise in every noisy layer of `network`; nothing for a network without any."""
    for layer in noisy_layers(network):
        layer.resample()
