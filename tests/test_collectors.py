import gymnasium as gym
import numpy as np
import pytest
import torch

from rl_pipeline.buffers import UniformReplayBuffer
from rl_pipeline.collectors import Collector, linear_schedule
from rl_pipeline.envs import make_vector_env, wrap_for_training
from rl_pipeline.networks import MLP
from rl_pipeline.validation import ConfigError


def make_collector(num_envs=2, max_episode_steps=None, **kwargs) -> Collector:
    env = wrap_for_training(make_vector_env("CartPole-v1", num_envs=num_envs, max_episode_steps=max_episode_steps), [])
    settings = dict(frames_per_iteration=64, max_env_steps=1000, learning_starts=10**6, seed=0)
    return Collector(env, UniformReplayBuffer(capacity=10_000, batch_size=1), **{**settings, **kwargs})


def cartpole_step(observation, action):
    """What CartPole-v1 returns when stepped with `action` from state `observation`."""
    env = gym.make("CartPole-v1")
    env.reset()
    env.unwrapped.state = observation.astype(np.float64)
    next_observation, _, terminated, _, _ = env.step(int(action))
    return next_observation, terminated


@pytest.mark.parametrize(
    ("t", "expected"), [(0, 1.0), (50, 0.525), (100, 0.05), (10_000, 0.05)]
)
def test_linear_schedule(t, expected):
    assert linear_schedule(1.0, 0.05, 100, t) == pytest.approx(expected)


def test_epsilon_is_one_while_warming_up_then_anneals_over_the_budget_fraction():
    collector = make_collector(max_env_steps=1000, epsilon_fraction=0.5, epsilon_end=0.1, learning_starts=100)
    assert collector.epsilon == 1.0
    collector.env_steps = 250
    assert collector.epsilon == pytest.approx(1.0 - 0.9 * 250 / 500)
    collector.env_steps = 600
    assert collector.epsilon == pytest.approx(0.1)


def test_no_stored_transition_spans_two_episodes():
    # Random actions and a 12-step limit: episodes end by termination and by truncation, in both sub-envs.
    torch.manual_seed(0)
    collector = make_collector(num_envs=2, max_episode_steps=12, frames_per_iteration=400)
    stats = collector.collect(MLP((4,), 2, [8]))
    buffer = collector.buffer
    episodes = len(stats.episode_returns)
    assert episodes >= 20
    # Under NEXT_STEP autoreset, the step after each episode's end only resets and must not be stored;
    # episodes that end on the last step of the collection have not had that step yet.
    assert 400 - episodes <= len(buffer) <= 400 - episodes + 2
    terminated_seen = 0
    for i in range(len(buffer)):
        s, a = buffer.storage.observations[i].numpy(), buffer.storage.actions[i]
        expected_next, expected_terminated = cartpole_step(s, a)
        np.testing.assert_allclose(buffer.storage.next_observations[i].numpy(), expected_next, atol=1e-5)
        assert buffer.storage.terminated[i].item() == float(expected_terminated)
        terminated_seen += int(expected_terminated)
    assert 0 < terminated_seen < episodes  # some episodes fell over, the others were truncated


def test_episode_returns_count_raw_rewards():
    collector = make_collector(num_envs=1, max_episode_steps=7, frames_per_iteration=64)
    stats = collector.collect(MLP((4,), 2, [8]))
    assert stats.episode_returns and all(1 <= r <= 7 for r in stats.episode_returns)
    assert stats.episode_returns == [float(n) for n in stats.episode_lengths]  # CartPole pays 1 per step


def test_counts_env_steps_over_all_sub_envs():
    collector = make_collector(num_envs=4, frames_per_iteration=64)
    collector.collect(MLP((4,), 2, [8]))
    collector.collect(MLP((4,), 2, [8]))
    assert collector.env_steps == 128


def test_greedy_actions_once_epsilon_is_zero():
    torch.manual_seed(0)
    collector = make_collector(num_envs=4, learning_starts=0, epsilon_start=0.0, epsilon_end=0.0)
    q_network = MLP((4,), 2, [8])
    observations = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    expected = q_network(torch.as_tensor(observations)).argmax(1).numpy()
    np.testing.assert_array_equal(collector.act(q_network, observations), expected)


def test_frames_per_iteration_must_divide_among_sub_envs():
    with pytest.raises(ConfigError, match="^frames_per_iteration: expected a multiple of env.num_envs"):
        make_collector(num_envs=3, frames_per_iteration=64)
