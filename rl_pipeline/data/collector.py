"""Data collection: step the training env with the ε-greedy behaviour policy, hand on n-step transitions."""

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from gymnasium.vector import VectorEnv
from torch import nn

from rl_pipeline.agents.networks import greedy_actions
from rl_pipeline.data.buffers import Transitions
from rl_pipeline.data.schedule import linear_schedule
from rl_pipeline.envs.make import env_state, restore_env_state
from rl_pipeline.validation import expected, non_negative_int, positive_int, probability


@dataclass
class CollectStats:
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)


class NStepReturns:
    """Folds each env's stream of 1-step transitions into n-step ones, env by env.

    The transition from s_t holds R = r_t + γ r_(t+1) + … + γ^(k-1) r_(t+k-1), s' = s_(t+k) and k:
    k = n, or fewer where the episode ended first. Then `terminated` says whether s' is terminal; a
    truncated episode bootstraps from its last observation like any other. n = 1 is plain DQN.
    """

    def __init__(self, n: int, gamma: float, num_envs: int):
        self.n, self.gamma = n, gamma
        self.pending = [deque() for _ in range(num_envs)]  # per env: (s, a, r) still short of n steps

    def __call__(
        self, observations, actions, rewards, next_observations, terminated, truncated, within_episode
    ) -> Transitions | None:
        """This vector step -> the n-step transitions it completes, None if none.

        `within_episode` masks out the sub-envs whose step was a reset: their (s, s') spans two episodes.
        """
        envs = np.flatnonzero(within_episode)
        if self.n == 1:  # each step is a whole transition: the same arrays as below, without the per-env loop
            if not len(envs):
                return None
            return Transitions(observations[envs], actions[envs], rewards[envs], next_observations[envs],
                               terminated[envs], np.ones(len(envs), dtype=np.int64), envs)
        complete = []
        for env in envs:
            pending = self.pending[env]
            pending.append((observations[env], actions[env], rewards[env]))
            ended = terminated[env] or truncated[env]
            while len(pending) == self.n or (ended and pending):
                discounted = sum(self.gamma**i * reward for i, (_, _, reward) in enumerate(pending))
                observation, action, _ = pending.popleft()
                complete.append(
                    (observation, action, discounted, next_observations[env], terminated[env], len(pending) + 1, env)
                )
        return Transitions(*map(np.stack, zip(*complete))) if complete else None


class Collector:
    """Steps `env` `env_steps_per_iteration` times per `collect()` call (counted over its sub-envs), unless told fewer.

    Actions are uniformly random until `learning_starts` env steps, then ε-greedy on the Q-network
    with ε annealed linearly from `epsilon_start` to `epsilon_end` over `epsilon_fraction` of the
    budget. Each step's `n_step` transitions, discounted by `gamma` (the loss's), go to `store`.
    """

    def __init__(
        self,
        env: VectorEnv,
        env_steps_per_iteration: int,
        max_env_steps: int,
        epsilon_start: float = 1.0,
        epsilon_end: float = 0.05,
        epsilon_fraction: float = 0.1,
        learning_starts: int = 1000,
        n_step: int = 1,
        gamma: float = 0.99,
        seed: int = 0,
    ):
        self.env = env
        self.num_envs = env.num_envs
        self.env_steps_per_iteration = positive_int("env_steps_per_iteration", env_steps_per_iteration)
        if env_steps_per_iteration % self.num_envs:
            raise expected(
                "env_steps_per_iteration", f"a multiple of env.num_envs ({self.num_envs})", env_steps_per_iteration
            )
        self.epsilon_start = probability("epsilon_start", epsilon_start)
        self.epsilon_end = probability("epsilon_end", epsilon_end)
        self.epsilon_fraction = probability("epsilon_fraction", epsilon_fraction)
        self.epsilon_duration = int(epsilon_fraction * positive_int("max_env_steps", max_env_steps))
        self.learning_starts = non_negative_int("learning_starts", learning_starts)
        self.n_step_returns = NStepReturns(positive_int("n_step", n_step), probability("gamma", gamma), self.num_envs)
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

    @property
    def epsilon(self) -> float:
        if self.warming_up:
            return 1.0
        return linear_schedule(self.epsilon_start, self.epsilon_end, self.epsilon_duration, self.env_steps)

    def act(self, q_network: nn.Module, observations: np.ndarray, device: torch.device | None = None) -> np.ndarray:
        explore = torch.rand(self.num_envs) < self.epsilon
        random_actions = torch.randint(int(self.env.single_action_space.n), (self.num_envs,)).numpy()
        if explore.all():  # no greedy action needed: spare the forward pass (all of warm-up)
            return random_actions
        return np.where(explore.numpy(), random_actions, greedy_actions(q_network, observations, device))

    def state_dict(self) -> dict:
        return {
            "env_steps": self.env_steps,
            "observations": self.observations,
            "resetting": self.resetting,
            "n_step_pending": self.n_step_returns.pending,
            "env": env_state(self.env),
        }

    def load_state_dict(self, state: dict) -> None:
        self.env_steps = state["env_steps"]
        if state["env"] is not None:
            restore_env_state(self.env, state["env"])
            self.observations, self.resetting = state["observations"], state["resetting"]
            self.n_step_returns.pending = state["n_step_pending"]

    def collect(
        self, q_network: nn.Module, store: Callable[[Transitions], None], env_steps: int | None = None
    ) -> CollectStats:
        """Steps the env `env_steps` times in all (`env_steps_per_iteration` by default), storing as it goes."""
        env_steps = self.env_steps_per_iteration if env_steps is None else env_steps
        if env_steps % self.num_envs:
            raise ValueError(f"{env_steps} env steps do not divide among {self.num_envs} sub-envs")
        if self.observations is None:  # new episodes; after a resume, not the first run's again
            self.observations, _ = self.env.reset(seed=self.seed + self.env_steps)
        stats = CollectStats()
        device = next(q_network.parameters()).device
        for _ in range(env_steps // self.num_envs):
            actions = self.act(q_network, self.observations, device)
            next_observations, rewards, terminated, truncated, info = self.env.step(actions)
            transitions = self.n_step_returns(
                self.observations, actions, rewards, next_observations, terminated, truncated, ~self.resetting
            )
            if transitions is not None:
                store(transitions)
            if "episode" in info:
                finished = info["_episode"]
                stats.episode_returns += info["episode"]["r"][finished].tolist()
                stats.episode_lengths += info["episode"]["l"][finished].tolist()
            self.resetting = terminated | truncated
            self.observations = next_observations  # easy to forget: the next step starts from here
            self.env_steps += self.num_envs
        return stats
