"""Greedy evaluation on fixed seeds: screening and confirmation while training, a held-out test score after."""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gymnasium.vector import VectorEnv
from PIL import Image, ImageDraw
from scipy import stats
from torch import nn

from rl_pipeline.agents.networks import greedy_actions

log = logging.getLogger(__name__)

CONFIDENCE = 0.95  # of every lower bound: one-sided


def evaluate(policy: nn.Module, env: VectorEnv, seed: int, max_episode_steps: int | None = None) -> np.ndarray:
    """Greedy return of one episode per sub-env, sub-env i reset with seed `seed + i`.

    A sub-env whose episode ended starts another (autoreset); its rewards no longer count. Episodes
    still running after `max_episode_steps` are cut there, and a warning says so: an env without a
    time limit, played by a policy that never fails, would otherwise never end.
    """
    observations, _ = env.reset(seed=seed)
    returns = np.zeros(env.num_envs)
    done = np.zeros(env.num_envs, dtype=bool)
    steps, device = 0, next(policy.parameters()).device
    while not done.all():
        if steps == max_episode_steps:
            log.warning("Evaluation cut %d of %d episodes still running after %d steps "
                        "(trainer.eval_max_episode_steps); their returns count up to there",
                        np.count_nonzero(~done), env.num_envs, steps)
            break
        observations, rewards, terminated, truncated, _ = env.step(greedy_actions(policy, observations, device))
        returns += np.where(done, 0.0, rewards)
        done |= terminated | truncated
        steps += 1
    return returns


def mean_lower_bound(returns: np.ndarray) -> float:
    """One-sided 95% lower confidence bound of the mean return, with Student's t for len(returns) episodes."""
    return Score.of(returns).lower_bound


def t_half_width(std: float, n: int, quantile: float) -> float:
    """Student's t `quantile` for n - 1 degrees of freedom, times the standard error std / sqrt(n)."""
    return float(stats.t.ppf(quantile, df=n - 1) * std / np.sqrt(n))


@dataclass(frozen=True)
class Score:
    """What a set of episodes says of a policy: mean, spread, and how low the mean could plausibly be."""

    mean: float
    std: float  # sample std; 0 for one episode
    lower_bound: float  # mean - t * std / sqrt(n); the mean itself for one episode
    episodes: int

    @classmethod
    def of(cls, returns: np.ndarray) -> "Score":
        n, mean = len(returns), float(np.mean(returns))
        if n < 2:
            return cls(mean, 0.0, mean, n)
        std = float(np.std(returns, ddof=1))
        return cls(mean, std, mean - t_half_width(std, n, CONFIDENCE), n)

    def interval(self) -> tuple[float, float] | None:
        """The two-sided 95% interval of the mean, with Student's t; None for one episode."""
        if self.episodes < 2:
            return None
        half_width = t_half_width(self.std, self.episodes, (1 + CONFIDENCE) / 2)
        return self.mean - half_width, self.mean + half_width

    def metrics(self, prefix: str) -> dict[str, float]:
        """The return's statistics; the number of episodes is a setting, not a measurement."""
        return {
            f"{prefix}/return_mean": self.mean,
            f"{prefix}/return_std": self.std,
            f"{prefix}/return_lower_bound": self.lower_bound,
        }

    def __str__(self) -> str:
        return (
            f"{self.mean:.1f} ± {self.std:.1f} "
            f"({CONFIDENCE:.0%} lower bound {self.lower_bound:.1f}, {self.episodes} episodes)"
        )


def play_episodes(
    policy: nn.Module, make_env: Callable[[int], VectorEnv], episodes: int, seed: int, max_parallel: int = 100,
    max_episode_steps: int | None = None,
) -> np.ndarray:
    """Greedy returns of `episodes` episodes on seeds `seed` .. `seed + episodes - 1`, `max_parallel` at a time."""
    returns = []
    for start in range(0, episodes, max_parallel):
        env = make_env(min(max_parallel, episodes - start))
        try:
            returns.append(evaluate(policy, env, seed + start, max_episode_steps))
        finally:
            env.close()
    return np.concatenate(returns)


def score_policy(
    policy: nn.Module, make_env: Callable[[int], VectorEnv], episodes: int, seed: int,
    max_episode_steps: int | None = None,
) -> Score:
    """A run's test score, and what `python -m rl_pipeline.evaluate` prints."""
    return Score.of(play_episodes(policy, make_env, episodes, seed, max_episode_steps=max_episode_steps))


def is_solved(lower_bound: float, solved_return: float | None) -> bool:
    """What stopping, confirmation and a run's `solved` all mean: a lower bound >= solved_return."""
    return solved_return is not None and lower_bound >= solved_return


class Evaluator:
    """Screens a policy on `episodes` episodes; once that passes `solved_return`, confirms on fresh ones.

    A policy can score 500 on 20 CartPole episodes and still fail one start in ten, and a screen
    that passed was picked for passing. So a screen whose lower confidence bound reaches the
    threshold is followed by `confirm_episodes` episodes on the next seeds, and their returns alone
    are what stopping and checkpointing see. Passing means a lower bound >= `solved_return`.
    """

    def __init__(
        self,
        make_env: Callable[[int], VectorEnv],
        episodes: int,
        seed: int,
        solved_return: float | None = None,
        confirm_episodes: int = 0,
        max_episode_steps: int | None = None,
    ):
        self.screen_env = make_env(episodes)
        self.confirm_env = make_env(confirm_episodes) if solved_return is not None and confirm_episodes else None
        self.seed, self.solved_return, self.max_episode_steps = seed, solved_return, max_episode_steps

    def solved(self, lower_bound: float) -> bool:
        return is_solved(lower_bound, self.solved_return)

    def __call__(self, policy: nn.Module) -> np.ndarray:
        returns = evaluate(policy, self.screen_env, self.seed, self.max_episode_steps)
        if self.confirm_env is not None and self.solved(mean_lower_bound(returns)):
            return evaluate(policy, self.confirm_env, self.seed + len(returns), self.max_episode_steps)
        return returns


def record_gif(
    policy: nn.Module, env: VectorEnv, path: Path, seed: int, every: int = 2, max_frames: int = 1000
) -> Path | None:
    """One whole greedy episode of `env`'s first sub-env (made with render_mode="rgb_array") as an animated GIF.

    Every `every`-th step, each frame captioned with its step and the return so far, and the last
    frame the episode's end; an episode longer than `every` x `max_frames` steps is cut there.
    None where the env cannot render to an array.
    """
    if "rgb_array" not in env.metadata.get("render_modes", []):
        return None
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame draws off-screen; no display here
    observations, _ = env.reset(seed=seed)
    frames, step, episode_return, done = [], 0, 0.0, False
    device = next(policy.parameters()).device
    while not done and len(frames) < max_frames:
        if step % every == 0:
            frames.append(captioned(env.render()[0], step, episode_return))
        observations, rewards, terminated, truncated, _ = env.step(greedy_actions(policy, observations, device))
        step, episode_return, done = step + 1, episode_return + float(rewards[0]), bool(terminated[0] or truncated[0])
    frames.append(captioned(env.render()[0], step, episode_return))
    # One palette, the first frame's (caption included), for every frame: 10x faster than one each.
    palette = frames[0].quantize(colors=64, method=Image.Quantize.FASTOCTREE)
    frames = [frame.quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40 * every, loop=0)
    return path


def captioned(frame: np.ndarray, step: int, episode_return: float) -> Image.Image:
    image = Image.fromarray(frame)
    if image.width >= 400:  # halve big renders (CartPole's 600x400); Atari's 160x210 stays
        image = image.reduce(2)
    ImageDraw.Draw(image).text((4, 2), f"step {step}  return {episode_return:g}", fill=(200, 0, 0))
    return image
