"""System C of the benchmark: experiment=dqn as one plain PyTorch loop, with no Lightning, Hydra or MLflow.

    python -m benchmarks.plain_dqn --seed 0 [--result result.json]

The floor under the pipeline: the same hyperparameters (conf/tuned/dqn/cartpole.yaml, which
tests/test_benchmarks.py keeps in step with ARGS), the same vector env, the same evaluations and
stop rule (rl_pipeline.agents.evaluation's, on the same seeds) and the same held-out test. What it leaves
out is what the pipeline adds: config composition, checkpoints, metrics, the exported model, plots.
"""

import argparse
import json
import time
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rl_pipeline.agents.evaluation import Evaluator, Score, score_policy


@dataclass(frozen=True)
class Args:
    env_id: str = "CartPole-v1"
    num_envs: int = 4
    max_env_steps: int = 100_000
    env_steps_per_iteration: int = 256
    updates_per_iteration: int = 32
    target_sync_interval_updates: int = 32
    learning_starts: int = 1000
    epsilon_start: float = 1.0
    epsilon_end: float = 0.04
    epsilon_fraction: float = 0.04
    buffer_capacity: int = 100_000
    batch_size: int = 256
    lr: float = 2.3e-3
    gamma: float = 0.99
    hidden_sizes: tuple[int, ...] = (256, 256)
    eval_interval_env_steps: int = 2500
    eval_episodes: int = 20
    eval_seed: int = 1_000_000
    solved_return: float = 475.0
    solved_confirm_episodes: int = 100
    test_episodes: int = 100
    test_seed: int = 2_000_000


ARGS = Args()


def make_env(num_envs: int) -> gym.vector.VectorEnv:
    return gym.make_vec(ARGS.env_id, num_envs=num_envs, vectorization_mode="sync")


def q_network(observation_size: int, num_actions: int) -> nn.Sequential:
    sizes = [observation_size, *ARGS.hidden_sizes]
    layers = []
    for n_in, n_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], num_actions))


class ReplayBuffer:
    def __init__(self, capacity: int, observation_size: int):
        self.s = torch.zeros(capacity, observation_size)
        self.a = torch.zeros(capacity, dtype=torch.int64)
        self.r = torch.zeros(capacity)
        self.s_next = torch.zeros(capacity, observation_size)
        self.terminated = torch.zeros(capacity)
        self.capacity, self.cursor, self.size = capacity, 0, 0

    def add(self, s, a, r, s_next, terminated) -> None:
        rows = (self.cursor + np.arange(len(a))) % self.capacity
        self.s[rows], self.a[rows], self.r[rows] = torch.as_tensor(s), torch.as_tensor(a), torch.as_tensor(r, dtype=torch.float32)
        self.s_next[rows], self.terminated[rows] = torch.as_tensor(s_next), torch.as_tensor(terminated, dtype=torch.float32)
        self.cursor = (self.cursor + len(a)) % self.capacity
        self.size = min(self.size + len(a), self.capacity)

    def sample(self, batch_size: int):
        rows = torch.randint(self.size, (batch_size,))
        return self.s[rows], self.a[rows], self.r[rows], self.s_next[rows], self.terminated[rows]


def epsilon(env_steps: int) -> float:
    if env_steps < ARGS.learning_starts:
        return 1.0
    duration = int(ARGS.epsilon_fraction * ARGS.max_env_steps)
    return ARGS.epsilon_start + (ARGS.epsilon_end - ARGS.epsilon_start) * min(env_steps / duration, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", help="write the result here as JSON")
    args = parser.parse_args()
    seed = args.seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    env = make_env(ARGS.num_envs)
    observation_size, num_actions = env.single_observation_space.shape[0], int(env.single_action_space.n)
    q_net = q_network(observation_size, num_actions)
    target_net = q_network(observation_size, num_actions).requires_grad_(False)
    target_net.load_state_dict(q_net.state_dict())
    optimizer = torch.optim.Adam(q_net.parameters(), lr=ARGS.lr, fused=True)
    buffer = ReplayBuffer(ARGS.buffer_capacity, observation_size)
    evaluator = Evaluator(make_env, ARGS.eval_episodes, ARGS.eval_seed, ARGS.solved_return, ARGS.solved_confirm_episodes)

    first_env_step = time.time()
    s, _ = env.reset(seed=seed)
    resetting = np.zeros(ARGS.num_envs, dtype=bool)  # NEXT_STEP autoreset: the step after an episode's end resets
    env_steps, num_updates, solved_env_steps = 0, 0, None
    while env_steps < ARGS.max_env_steps and solved_env_steps is None:
        next_eval = (env_steps // ARGS.eval_interval_env_steps + 1) * ARGS.eval_interval_env_steps
        for _ in range(min(ARGS.env_steps_per_iteration, next_eval - env_steps) // ARGS.num_envs):
            a = rng.integers(num_actions, size=ARGS.num_envs)
            explore = rng.random(ARGS.num_envs) < epsilon(env_steps)
            if not explore.all():
                with torch.no_grad():
                    greedy = q_net(torch.as_tensor(s)).argmax(dim=1).numpy()
                a = np.where(explore, a, greedy)
            s_next, r, terminated, truncated, _ = env.step(a)
            within = ~resetting
            buffer.add(s[within], a[within], r[within], s_next[within], terminated[within])
            resetting = terminated | truncated
            s = s_next
            env_steps += ARGS.num_envs

        if env_steps >= ARGS.learning_starts:
            for _ in range(ARGS.updates_per_iteration):
                b_s, b_a, b_r, b_s_next, b_terminated = buffer.sample(ARGS.batch_size)
                with torch.no_grad():
                    y = b_r + ARGS.gamma * (1.0 - b_terminated) * target_net(b_s_next).max(dim=1).values
                q_taken = q_net(b_s).gather(1, b_a.unsqueeze(1)).squeeze(1)
                loss = F.smooth_l1_loss(q_taken, y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                num_updates += 1
                if num_updates % ARGS.target_sync_interval_updates == 0:
                    target_net.load_state_dict(q_net.state_dict())
            last_update = time.time()

        if env_steps % ARGS.eval_interval_env_steps == 0 or env_steps >= ARGS.max_env_steps:
            if evaluator.solved(Score.of(evaluator(q_net)).lower_bound):
                solved_env_steps = env_steps

    test = score_policy(q_net, make_env, ARGS.test_episodes, ARGS.test_seed)
    print(f"plain DQN seed {seed}: solved at {solved_env_steps} env steps, test return {test}")
    result = {
        "env_steps": env_steps, "solved_env_steps": solved_env_steps, "test_return_mean": test.mean,
        "first_env_step": first_env_step, "last_update": last_update, "args": asdict(ARGS),
    }
    if args.result:
        with open(args.result, "w") as file:
            json.dump(result, file)


if __name__ == "__main__":
    main()
