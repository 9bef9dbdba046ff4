"""Greedy evaluation on fixed seeds, sized so that 'solved' means the policy holds."""

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from PIL import Image
from torch import nn


@torch.no_grad()
def evaluate(policy: nn.Module, env: VectorEnv, seed: int) -> np.ndarray:
    """Greedy return of one episode per sub-env, sub-env i reset with seed `seed + i`."""
    device = next(policy.parameters()).device
    observations, _ = env.reset(seed=seed)
    returns = np.zeros(env.num_envs)
    done = np.zeros(env.num_envs, dtype=bool)
    while not done.all():
        actions = policy(torch.as_tensor(observations, device=device)).argmax(dim=1).cpu().numpy()
        observations, rewards, terminated, truncated, _ = env.step(actions)
        returns += np.where(done, 0.0, rewards)
        done |= terminated | truncated
    return returns


def mean_lower_bound(returns: np.ndarray, z: float = 1.645) -> float:
    """One-sided 95% lower confidence bound of the mean return."""
    if len(returns) < 2:
        return float(np.mean(returns))
    return float(np.mean(returns) - z * np.std(returns, ddof=1) / np.sqrt(len(returns)))


class Evaluator:
    """Screens a policy on `episodes` episodes; once that passes `solved_return`, confirms on more.

    A policy can score 500 on 20 CartPole episodes and still fail one start in ten. So a screen whose
    lower confidence bound reaches the threshold is followed by `confirm_episodes` further episodes,
    and the returns of all of them are what stopping and checkpointing see.
    """

    def __init__(
        self,
        make_env: Callable[[int], VectorEnv],
        episodes: int,
        seed: int,
        solved_return: float | None = None,
        confirm_episodes: int = 0,
    ):
        self.screen_env = make_env(episodes)
        self.confirm_env = make_env(confirm_episodes) if solved_return is not None and confirm_episodes else None
        self.seed, self.solved_return = seed, solved_return

    def __call__(self, policy: nn.Module) -> np.ndarray:
        returns = evaluate(policy, self.screen_env, self.seed)
        if self.confirm_env is not None and mean_lower_bound(returns) >= self.solved_return:
            confirmation = evaluate(policy, self.confirm_env, self.seed + len(returns))
            returns = np.concatenate([returns, confirmation])
        return returns


@torch.no_grad()
def record_gif(policy: nn.Module, env: VectorEnv, path: Path, seed: int, max_frames: int = 150, every: int = 2) -> Path | None:
    """A greedy episode of `env`'s first sub-env (made with render_mode="rgb_array") as an animated GIF.

    Every `every`-th frame, at most `max_frames`. None where the env cannot render to an array.
    """
    if "rgb_array" not in env.metadata.get("render_modes", []):
        return None
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame draws off-screen; no display here
    observations, _ = env.reset(seed=seed)
    frames, done, t = [], False, 0
    while not done and len(frames) < max_frames:
        if t % every == 0:
            frames.append(Image.fromarray(env.render()[0]).reduce(2))
        actions = policy(torch.as_tensor(observations)).argmax(dim=1).numpy()
        observations, _, terminated, truncated, _ = env.step(actions)
        done, t = bool(terminated[0] or truncated[0]), t + 1
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40 * every, loop=0)
    return path
