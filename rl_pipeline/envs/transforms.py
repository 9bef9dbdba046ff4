"""Observation and reward transforms: gymnasium's wrappers, plus what the policy keeps of them.

A transform does one of two things. `wrap_sub_env(env)` wraps each sub-env, of the training and
the evaluation envs alike: the policy sees its output, which is what the exported model takes
(frame stacking, Atari preprocessing). `wrap(vector_env)` wraps the training env only: it shapes
the rewards the agent learns from, never the returns it is measured by (clip_reward), or gathers
statistics of the observations, which pass unchanged into the replay buffer. `policy_input()` is
the change the Q-network's input then gets, as a torch module frozen at the statistics of the
moment (normalize_obs): acting, learning, evaluation and the exported MLflow model all take the
env's own observations through it.
"""

import functools

import gymnasium as gym
import numpy as np
import torch
from gymnasium import wrappers
from gymnasium.vector import VectorEnv, VectorObservationWrapper
from gymnasium.wrappers import vector as vector_wrappers
from gymnasium.wrappers.utils import RunningMeanStd
from torch import nn

from rl_pipeline.errors import ConfigError
from rl_pipeline.validation import boolean, expected, non_negative_int, positive_int, positive_number


class ObservationNormalizer(nn.Module):
    """(obs - mean) / sqrt(var + epsilon), gymnasium's formula, with fixed statistics."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, epsilon: float):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("var", var.float())
        self.epsilon = epsilon

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return (observations - self.mean) / torch.sqrt(self.var + self.epsilon)


class ObservationStatistics(VectorObservationWrapper):
    """Running mean and variance of every observation that passes (gymnasium's RunningMeanStd); passes them raw."""

    def __init__(self, env: VectorEnv):
        super().__init__(env)
        self.obs_rms = RunningMeanStd(shape=env.single_observation_space.shape)

    def observations(self, observations: np.ndarray) -> np.ndarray:
        self.obs_rms.update(observations)
        return observations


class NormalizeObservation:
    """Running mean/std normalization of observations, with gymnasium's statistics and formula.

    The replay buffer keeps raw observations and every batch is normalized with the statistics of
    its update, as Stable-Baselines3's VecNormalize does: a transition stored early is not left
    normalized by statistics the network no longer sees.
    """

    def __init__(self, epsilon: float = 1e-8):
        self.epsilon = positive_number("epsilon", epsilon)
        self._wrapper = None

    def wrap(self, env: VectorEnv) -> VectorEnv:
        self._wrapper = ObservationStatistics(env)
        return self._wrapper

    def policy_input(self) -> nn.Module:
        stats = self._wrapper.obs_rms
        return ObservationNormalizer(torch.as_tensor(stats.mean), torch.as_tensor(stats.var), self.epsilon)


class ClipReward:
    """Rewards clipped to [min_reward, max_reward] for learning (Nature DQN clips to [-1, 1])."""

    def __init__(self, min_reward: float = -1.0, max_reward: float = 1.0):
        if not min_reward < max_reward:
            raise ConfigError("min_reward", f"expected a number below max_reward={max_reward}, got {min_reward!r}")
        self.min_reward, self.max_reward = min_reward, max_reward

    def wrap(self, env: VectorEnv) -> VectorEnv:
        # gymnasium's ClipReward keeps a lambda, which a checkpoint of the env's state cannot pickle.
        clip = functools.partial(np.clip, a_min=self.min_reward, a_max=self.max_reward)
        return vector_wrappers.TransformReward(env, clip)


class FrameStack:
    """The last `stack_size` observations stacked on a new first axis (gymnasium's FrameStackObservation)."""

    def __init__(self, stack_size: int = 4):
        self.stack_size = positive_int("stack_size", stack_size)

    def wrap_sub_env(self, env: gym.Env) -> gym.Env:
        return wrappers.FrameStackObservation(env, self.stack_size)


class AtariPreprocessing(FrameStack):
    """The Nature DQN preprocessing: no-op starts, frame skip with max-pooling, 84x84 grayscale, 4 stacked frames.

    gymnasium's AtariPreprocessing, then FrameStackObservation. The env must not skip frames itself
    (`frameskip: 1` in its config): this wrapper does.
    """

    def __init__(
        self,
        noop_max: int = 30,
        frame_skip: int = 4,
        screen_size: int = 84,
        terminal_on_life_loss: bool = False,
        stack_size: int = 4,
    ):
        super().__init__(stack_size)
        self.noop_max = non_negative_int("noop_max", noop_max)
        self.frame_skip = positive_int("frame_skip", frame_skip)
        self.screen_size = positive_int("screen_size", screen_size)
        self.terminal_on_life_loss = boolean("terminal_on_life_loss", terminal_on_life_loss)

    def wrap_sub_env(self, env: gym.Env) -> gym.Env:
        if not hasattr(env.unwrapped, "ale"):
            raise expected("id", "an Atari env such as ale_py:ALE/Pong-v5 with the atari transform", env.spec.id)
        frameskip = env.spec.kwargs.get("frameskip", 1)
        if self.frame_skip > 1 and frameskip != 1:
            raise expected("frameskip", "1 with the atari transform, which skips frames itself", frameskip)
        env = wrappers.AtariPreprocessing(
            env,
            noop_max=self.noop_max,
            frame_skip=self.frame_skip,
            screen_size=self.screen_size,
            terminal_on_life_loss=self.terminal_on_life_loss,
        )
        return super().wrap_sub_env(env)


def policy_input(transforms) -> nn.Sequential:
    """What the policy applies to a raw observation before its Q-network (empty: nothing)."""
    return nn.Sequential(*(t.policy_input() for t in transforms if hasattr(t, "policy_input")))
