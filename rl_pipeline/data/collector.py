"""Data collection: step the training env with the agent's behaviour policy and hand each vector step on."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from gymnasium.vector import VectorEnv

from rl_pipeline.envs.make import env_state, restore_env_state
from rl_pipeline.validation import expected, non_negative_int, positive_int


@dataclass
class CollectStats:
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)


class VectorStep(NamedTuple):
    """One step of every sub-env; `within_episode` is False where the sub-env's step was an autoreset,
    whose (s, s') spans two episodes."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    within_episode: np.ndarray


class Collector:
    """Steps `env` `env_steps_per_iteration` times per `collect()` call (counted over its sub-envs), unless told fewer.

    It counts the env steps and so says when the warm-up of `learning_starts` env steps is over, during
    which the agent acts uniformly at random and does not learn yet.
    """

    def __init__(self, env: VectorEnv, env_steps_per_iteration: int, learning_starts: int = 1000, seed: int = 0):
        self.env = env
        self.num_envs = env.num_envs
        self.num_actions = int(env.single_action_space.n)
        self.env_steps_per_iteration = positive_int("env_steps_per_iteration", env_steps_per_iteration)
        if env_steps_per_iteration % self.num_envs:
            raise expected(
                "env_steps_per_iteration", f"a multiple of env.num_envs ({self.num_envs})", env_steps_per_iteration
            )
        self.learning_starts = non_negative_int("learning_starts", learning_starts)
        self.seed = seed
        self.env_steps = 0
        self.observations = None
        # Under NEXT_STEP autoreset, the step after an episode's end only resets that sub-env.
        self.resetting = np.zeros(self.num_envs, dtype=bool)

    @property
    def warming_up(self) -> bool:
        return self.env_steps < self.learning_starts

    def restart_warm_up(self) -> None:
        """Act at random for another `learning_starts` env steps from here (to refill an emptied buffer)."""
        self.learning_starts += self.env_steps

    def state_dict(self) -> dict:
        return {
            "env_steps": self.env_steps,
            "observations": self.observations,
            "resetting": self.resetting,
            "env": env_state(self.env),
        }

    def load_state_dict(self, state: dict) -> None:
        self.env_steps = state["env_steps"]
        if state["env"] is not None:
            restore_env_state(self.env, state["env"])
            self.observations, self.resetting = state["observations"], state["resetting"]

    def collect(
        self, act: Callable[[np.ndarray], np.ndarray], store: Callable[[VectorStep], None], env_steps: int | None = None
    ) -> CollectStats:
        """Steps the env `env_steps` times in all (`env_steps_per_iteration` by default) with the actions that
        `act` chooses, handing each step to `store`."""
        env_steps = self.env_steps_per_iteration if env_steps is None else env_steps
        if env_steps % self.num_envs:
            raise ValueError(f"{env_steps} env steps do not divide among {self.num_envs} sub-envs")
        if self.observations is None:  # new episodes; after a resume, not the first run's again
            self.observations, _ = self.env.reset(seed=self.seed + self.env_steps)
        stats = CollectStats()
        for _ in range(env_steps // self.num_envs):
            actions = act(self.observations)
            next_observations, rewards, terminated, truncated, info = self.env.step(actions)
            store(VectorStep(
                self.observations, actions, rewards, next_observations, terminated, truncated, ~self.resetting
            ))
            if "episode" in info:
                finished = info["_episode"]
                stats.episode_returns += info["episode"]["r"][finished].tolist()
                stats.episode_lengths += info["episode"]["l"][finished].tolist()
            self.resetting = terminated | truncated
            self.observations = next_observations  # easy to forget: the next step starts from here
            self.env_steps += self.num_envs
        return stats
