"""System B of the benchmark: Stable-Baselines3's DQN with rl-baselines3-zoo's CartPole-v1 hyperparameters.

    python -m benchmarks.sb3_dqn --seed 0 [--result result.json]     (pip install -e '.[bench]')

Stopped by the pipeline's rule: every 2,500 env steps a greedy evaluation on the seeds that
experiment=dqn evaluates on, confirmed on 100 more once it passes (rl_pipeline.agents.evaluation, the same
code), within the same budget of 100,000 env steps; then the same 100-episode held-out test.
"""

import argparse
import json
import time

import gymnasium as gym
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback

from benchmarks.plain_dqn import ARGS, make_env
from rl_pipeline.agents.evaluation import Evaluator, Score, score_policy

ZOO_HYPERPARAMETERS = {  # rl-baselines3-zoo, hyperparams/dqn.yml, CartPole-v1
    "learning_rate": 2.3e-3,
    "batch_size": 64,
    "buffer_size": 100_000,
    "learning_starts": 1000,
    "gamma": 0.99,
    "target_update_interval": 10,
    "train_freq": 256,
    "gradient_steps": 128,
    "exploration_fraction": 0.16,
    "exploration_final_eps": 0.04,
    "policy_kwargs": {"net_arch": [256, 256]},
}


class StopWhenSolved(BaseCallback):
    """Evaluates every `ARGS.eval_interval_env_steps` env steps; stops training once solved; times its ends."""

    def __init__(self):
        super().__init__()
        self.evaluator = Evaluator(
            make_env, ARGS.eval_episodes, ARGS.eval_seed, ARGS.solved_return, ARGS.solved_confirm_episodes
        )
        self.solved_env_steps = None
        self.first_env_step = self.last_update = None

    def _on_training_start(self) -> None:
        self.first_env_step = time.time()

    def _on_rollout_start(self) -> None:
        self.last_update = time.time()  # SB3 trains between rollouts

    def _on_step(self) -> bool:
        if self.num_timesteps % ARGS.eval_interval_env_steps:
            return True
        if self.evaluator.solved(Score.of(self.evaluator(self.model.q_net)).lower_bound):
            self.solved_env_steps = self.num_timesteps
            return False
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", help="write the result here as JSON")
    args = parser.parse_args()

    model = DQN("MlpPolicy", gym.make(ARGS.env_id), seed=args.seed, device="cpu", **ZOO_HYPERPARAMETERS)
    stop = StopWhenSolved()
    model.learn(total_timesteps=ARGS.max_env_steps, callback=stop)
    test = score_policy(model.q_net, make_env, ARGS.test_episodes, ARGS.test_seed)
    print(f"SB3 DQN seed {args.seed}: solved at {stop.solved_env_steps} env steps, test return {test}")
    if args.result:
        result = {
            "env_steps": model.num_timesteps, "solved_env_steps": stop.solved_env_steps, "test_return_mean": test.mean,
            "first_env_step": stop.first_env_step, "last_update": stop.last_update,
        }
        with open(args.result, "w") as file:
            json.dump(result, file)


if __name__ == "__main__":
    main()
