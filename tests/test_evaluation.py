import numpy as np
import pytest
import torch
from torch import nn

from rl_pipeline.envs import make_vector_env
from rl_pipeline.evaluation import Evaluator, evaluate, mean_lower_bound
from rl_pipeline.networks import MLP


class PoleBalancer(nn.Module):
    """A hand-written CartPole controller as a Q-function: push right when the pole falls right."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor([0.0, 0.0, 3.0, 1.0]))

    def forward(self, observations):
        lean = observations @ self.gain
        return torch.stack([-lean, lean], dim=1)


def make_cartpoles(num_envs: int):
    return make_vector_env("CartPole-v1", num_envs=num_envs)


def test_evaluate_plays_one_full_episode_per_sub_env_with_fixed_seeds():
    q_network = MLP((4,), 2, [8])
    env = make_vector_env("CartPole-v1", num_envs=3, max_episode_steps=50)
    first = evaluate(q_network, env, seed=7)
    assert first.shape == (3,) and np.all((first >= 1) & (first <= 50))
    np.testing.assert_array_equal(evaluate(q_network, env, seed=7), first)


def test_mean_lower_bound_by_hand():
    # mean 3, sample std sqrt(2.5), n 5: 3 - 1.645 * sqrt(2.5 / 5)
    assert mean_lower_bound(np.array([1.0, 2, 3, 4, 5])) == pytest.approx(3 - 1.645 * np.sqrt(0.5))
    assert mean_lower_bound(np.array([500.0] * 20)) == 500.0


def test_a_passing_screen_is_confirmed_on_more_episodes():
    evaluator = Evaluator(make_cartpoles, episodes=4, seed=0, solved_return=475, confirm_episodes=6)
    returns = evaluator(PoleBalancer())
    assert len(returns) == 10 and returns.min() == 500


def test_a_failing_screen_is_not_confirmed():
    evaluator = Evaluator(make_cartpoles, episodes=4, seed=0, solved_return=475, confirm_episodes=6)
    returns = evaluator(MLP((4,), 2, [8]))
    assert len(returns) == 4 and returns.max() < 475


def test_no_confirmation_without_a_threshold():
    evaluator = Evaluator(make_cartpoles, episodes=4, seed=0, solved_return=None, confirm_episodes=6)
    assert evaluator.confirm_env is None and len(evaluator(PoleBalancer())) == 4
