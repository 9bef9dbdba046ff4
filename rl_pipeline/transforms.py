"""Observation and reward transforms: gymnasium's vector wrappers, plus what the policy keeps of them.

A transform wraps the training env. Where it changes observations, `policy_input()` returns the
same change as a torch module, frozen at the statistics of the moment, so that evaluation and the
exported MLflow model take raw env observations.
"""

import torch
from gymnasium.vector import VectorEnv
from gymnasium.wrappers import vector as vector_wrappers
from torch import nn

from rl_pipeline.validation import positive_number


class ObservationNormalizer(nn.Module):
    """(obs - mean) / sqrt(var + epsilon), gymnasium's formula, with fixed statistics."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, epsilon: float):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("var", var.float())
        self.epsilon = epsilon

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return (observations - self.mean) / torch.sqrt(self.var + self.epsilon)


class NormalizeObservation:
    """Running mean/std normalization of observations (gymnasium's NormalizeObservation)."""

    def __init__(self, epsilon: float = 1e-8):
        self.epsilon = positive_number("epsilon", epsilon)
        self._wrapper = None

    def wrap(self, env: VectorEnv) -> VectorEnv:
        self._wrapper = vector_wrappers.NormalizeObservation(env, epsilon=self.epsilon)
        return self._wrapper

    def policy_input(self) -> nn.Module:
        stats = self._wrapper.obs_rms
        return ObservationNormalizer(torch.as_tensor(stats.mean), torch.as_tensor(stats.var), self.epsilon)


def policy_input(transforms) -> nn.Sequential:
    """What the policy applies to a raw observation before its Q-network (empty: nothing)."""
    return nn.Sequential(*(t.policy_input() for t in transforms if hasattr(t, "policy_input")))
