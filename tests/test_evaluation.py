"""Evaluation: greedy episodes on fixed seeds, scored the same way for screening, confirmation and testing."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import greedy_episode_return
from PIL import Image, ImageSequence
from torch import nn

from rl_pipeline.agents.evaluation import (
    Evaluator,
    Score,
    captioned,
    evaluate,
    mean_lower_bound,
    play_episodes,
    record_gif,
    score_policy,
)
from rl_pipeline.agents.networks import MLP
from rl_pipeline.envs.make import make_vector_env


class PoleBalancer(nn.Module):
    """A hand-written CartPole controller as a Q-function: push right when the pole falls right."""

    def __init__(self, gain=(0.0, 0.0, 3.0, 1.0)):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(gain))

    def forward(self, observations):
        lean = observations @ self.gain
        return torch.stack([-lean, lean], dim=1)


def make_cartpoles(num_envs: int, max_episode_steps: int | None = None):
    return make_vector_env("CartPole-v1", num_envs=num_envs, max_episode_steps=max_episode_steps)


def weak_policy() -> nn.Module:
    """A random MLP: CartPole episodes of 11 to 87 steps, seed by seed."""
    torch.manual_seed(1)
    return MLP((4,), (2,), [8])


@pytest.mark.parametrize("max_episode_steps", [None, 75])
def test_a_vectorized_evaluation_equals_greedy_single_env_episodes_seed_by_seed(max_episode_steps):
    # Sub-envs end at different steps and start new episodes (autoreset): those rewards must not count.
    policy = weak_policy()
    returns = evaluate(policy, make_cartpoles(6, max_episode_steps), seed=40)
    reference = [greedy_episode_return(policy, 40 + i, max_episode_steps) for i in range(6)]
    np.testing.assert_array_equal(returns, reference)
    assert len(set(reference)) > 2, "episodes of different lengths, or the test proves nothing"
    if max_episode_steps:
        assert 0 < reference.count(max_episode_steps) < 6, "some episodes truncated, some not"


def test_episodes_that_never_end_are_cut_at_the_step_cap_with_a_warning(caplog):
    # MountainCar without its time limit, and a policy that never pushes: the flag is never reached.
    never_ends = gym.vector.SyncVectorEnv([lambda: gym.make("MountainCar-v0").unwrapped] * 2)
    coasting = nn.Linear(2, 3)
    nn.init.zeros_(coasting.weight)
    coasting.bias.data = torch.tensor([0.0, 1.0, 0.0])  # action 1: no push
    returns = evaluate(coasting, never_ends, seed=0, max_episode_steps=300)
    np.testing.assert_array_equal(returns, [-300.0, -300.0])
    assert "Evaluation cut 2 of 2 episodes still running after 300 steps (trainer.eval_max_episode_steps)" in caplog.text


def test_evaluation_is_greedy_whatever_the_rng():
    policy = weak_policy()
    env = make_cartpoles(5)
    torch.manual_seed(0)
    first = evaluate(policy, env, seed=7)
    torch.manual_seed(1)
    np.random.seed(1)
    np.testing.assert_array_equal(evaluate(policy, env, seed=7), first)
    np.testing.assert_array_equal(first, [greedy_episode_return(policy, 7 + i) for i in range(5)])


def test_the_lower_bound_uses_students_t_for_the_number_of_episodes():
    # mean 3, sample std sqrt(2.5), n 5: t(0.95, df 4) = 2.1318 from the table
    assert mean_lower_bound(np.array([1.0, 2, 3, 4, 5])) == pytest.approx(3 - 2.1318 * np.sqrt(0.5), abs=1e-4)
    returns = np.array([400.0, 500.0] * 10)  # n 20: t(0.95, df 19) = 1.7291, not z = 1.645
    expected = 450 - 1.7291 * returns.std(ddof=1) / np.sqrt(20)
    assert mean_lower_bound(returns) == pytest.approx(expected, abs=1e-3)
    assert mean_lower_bound(np.array([500.0] * 20)) == 500.0
    assert mean_lower_bound(np.array([321.0])) == 321.0


def test_a_score_holds_mean_sample_std_bound_and_count():
    returns = np.array([10.0, 20.0, 60.0])
    score = Score.of(returns)
    assert (score.mean, score.episodes) == (30.0, 3)
    assert score.std == pytest.approx(np.sqrt(700))  # sample std: squares 400 + 100 + 900 over n - 1
    assert score.lower_bound == mean_lower_bound(returns)
    assert score.metrics("test") == {
        "test/return_mean": 30.0, "test/return_std": score.std, "test/return_lower_bound": score.lower_bound,
    }


def test_play_episodes_plays_each_seed_once_whatever_the_width():
    policy = weak_policy()
    in_chunks = play_episodes(policy, make_cartpoles, episodes=7, seed=100, max_parallel=3)
    np.testing.assert_array_equal(in_chunks, [greedy_episode_return(policy, 100 + i) for i in range(7)])
    score = score_policy(policy, make_cartpoles, episodes=7, seed=100)
    assert score == Score.of(in_chunks)


def test_a_passing_screen_is_confirmed_on_the_next_seeds_alone():
    policy = weak_policy()
    evaluator = Evaluator(make_cartpoles, episodes=4, seed=10, solved_return=0, confirm_episodes=6)
    returns = evaluator(policy)
    np.testing.assert_array_equal(returns, [greedy_episode_return(policy, seed) for seed in range(14, 20)])


def test_a_screen_exactly_at_the_threshold_passes():
    # 500 on every episode: a lower bound of exactly 500, which is solved (>=), so it is confirmed.
    evaluator = Evaluator(make_cartpoles, episodes=4, seed=0, solved_return=500, confirm_episodes=6)
    returns = evaluator(PoleBalancer())
    assert len(returns) == 6 and returns.min() == 500


def test_a_failing_screen_is_not_confirmed():
    policy = weak_policy()
    evaluator = Evaluator(make_cartpoles, episodes=4, seed=0, solved_return=475, confirm_episodes=6)
    returns = evaluator(policy)
    np.testing.assert_array_equal(returns, [greedy_episode_return(policy, seed) for seed in range(4)])


def test_no_confirmation_without_a_threshold():
    evaluator = Evaluator(make_cartpoles, episodes=4, seed=0, solved_return=None, confirm_episodes=6)
    assert evaluator.confirm_env is None and len(evaluator(PoleBalancer())) == 4


def test_the_gif_shows_each_captioned_frame_in_its_own_colours(tmp_path):
    env = make_vector_env("CartPole-v1", num_envs=1, render_mode="rgb_array")
    policy = MLP((4,), (2,), hidden_sizes=[8])
    record_gif(policy, env, tmp_path / "episode.gif", seed=3)
    env.reset(seed=3)
    expected = np.asarray(captioned(env.render()[0], 0, 0.0).convert("RGB"), dtype=float)
    with Image.open(tmp_path / "episode.gif") as gif:
        frames = [np.asarray(frame.convert("RGB"), dtype=float) for frame in ImageSequence.Iterator(gif)]
    env.close()
    assert frames[0].shape == expected.shape and np.abs(frames[0] - expected).mean() < 1.0
    caption = frames[0][:12, :120]
    assert ((caption[..., 0] > 150) & (caption[..., 1] < 60)).any(), "the caption's red survives the palette"
    assert any(np.abs(frame - frames[0]).mean() > 0.1 for frame in frames[1:]), "the cart and pole move"
