import gymnasium as gym
import numpy as np
import pytest
import torch

from rl_pipeline.data.buffers import UniformReplayBuffer
from rl_pipeline.data.collector import Collector
from rl_pipeline.data.nstep import NStepReturns
from rl_pipeline.envs.make import make_vector_env, wrap_for_training
from rl_pipeline.errors import ConfigError


def make_collector(num_envs=2, max_episode_steps=None, **kwargs) -> Collector:
    env = wrap_for_training(make_vector_env("CartPole-v1", num_envs=num_envs, max_episode_steps=max_episode_steps), [])
    settings = dict(env_steps_per_iteration=64, learning_starts=10**6, seed=0)
    return Collector(env, **{**settings, **kwargs})


def random_actions(observations: np.ndarray) -> np.ndarray:
    return torch.randint(2, (len(observations),)).numpy()


def collect_into_buffer(collector: Collector, n_step: int = 1, gamma: float = 0.99):
    """One collect() at random, its steps folded into n-step transitions in a fresh buffer; returns its stats
    and the buffer."""
    buffer = UniformReplayBuffer(capacity=10_000, batch_size=1)
    fold = NStepReturns(n_step, gamma, collector.num_envs)

    def store(step):
        transitions = fold(*step)
        if transitions is not None:
            buffer.add(transitions)

    return collector.collect(random_actions, store), buffer


def cartpole_step(observation, action):
    """What CartPole-v1 returns when stepped with `action` from state `observation`."""
    env = gym.make("CartPole-v1")
    env.reset()
    env.unwrapped.state = observation.astype(np.float64)
    next_observation, _, terminated, _, _ = env.step(int(action))
    return next_observation, terminated


def test_no_stored_transition_spans_two_episodes():
    # Random actions and a 12-step limit: episodes end by termination and by truncation, in both sub-envs.
    torch.manual_seed(0)
    collector = make_collector(num_envs=2, max_episode_steps=12, env_steps_per_iteration=400)
    stats, buffer = collect_into_buffer(collector)
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
    collector = make_collector(num_envs=1, max_episode_steps=7, env_steps_per_iteration=64)
    stats, _ = collect_into_buffer(collector)
    assert stats.episode_returns and all(1 <= r <= 7 for r in stats.episode_returns)
    assert stats.episode_returns == [float(n) for n in stats.episode_lengths]  # CartPole pays 1 per step


def test_counts_env_steps_over_all_sub_envs():
    collector = make_collector(num_envs=4, env_steps_per_iteration=64)
    collect_into_buffer(collector)
    collect_into_buffer(collector)
    assert collector.env_steps == 128


def test_env_steps_per_iteration_must_divide_among_sub_envs():
    with pytest.raises(ConfigError, match="^env_steps_per_iteration: expected a multiple of env.num_envs"):
        make_collector(num_envs=3, env_steps_per_iteration=64)


def test_collector_stores_n_step_transitions():
    _, buffer = collect_into_buffer(make_collector(num_envs=2), n_step=3, gamma=0.5)
    stored = buffer.storage
    steps = stored.steps[: len(buffer)]
    assert set(steps.tolist()) <= {1, 2, 3} and (steps == 3).sum() > 0.8 * len(steps)
    # A k < 3 transition is an episode's end (CartPole ends by termination within 64 steps here).
    assert torch.equal(stored.terminated[: len(steps)][steps < 3], torch.ones(int((steps < 3).sum())))
