"""n-step returns: each env's stream of 1-step transitions folded into n-step ones."""

from collections import deque

import numpy as np

from rl_pipeline.data.buffers import Transitions


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
