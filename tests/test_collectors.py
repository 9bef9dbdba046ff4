import gymnasium as gym
import numpy as np
import pytest
import torch

from rl_pipeline.agents.networks import MLP
from rl_pipeline.data.buffers import UniformReplayBuffer
from rl_pipeline.data.collector import Collector, NStepReturns
from rl_pipeline.data.schedule import linear_schedule
from rl_pipeline.envs.make import make_vector_env, wrap_for_training
from rl_pipeline.errors import ConfigError


def make_collector(num_envs=2, max_episode_steps=None, **kwargs) -> Collector:
    env = wrap_for_training(make_vector_env("CartPole-v1", num_envs=num_envs, max_episode_steps=max_episode_steps), [])
    settings = dict(env_steps_per_iteration=64, max_env_steps=1000, learning_starts=10**6, seed=0)
    return Collector(env, **{**settings, **kwargs})


def collect_into_buffer(collector: Collector):
    """One collect() with a small random network, into a fresh buffer; returns its stats and the buffer."""
    buffer = UniformReplayBuffer(capacity=10_000, batch_size=1)
    return collector.collect(MLP((4,), 2, [8]), buffer.add), buffer


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


def test_greedy_actions_once_epsilon_is_zero():
    torch.manual_seed(0)
    collector = make_collector(num_envs=4, learning_starts=0, epsilon_start=0.0, epsilon_end=0.0)
    q_network = MLP((4,), 2, [8])
    observations = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    expected = q_network(torch.as_tensor(observations)).argmax(1).numpy()
    np.testing.assert_array_equal(collector.act(q_network, observations), expected)


def test_env_steps_per_iteration_must_divide_among_sub_envs():
    with pytest.raises(ConfigError, match="^env_steps_per_iteration: expected a multiple of env.num_envs"):
        make_collector(num_envs=3, env_steps_per_iteration=64)


def fold(n_step: NStepReturns, steps) -> list[tuple]:
    """Feed (rewards, terminated, truncated, within_episode) per step, observations numbered by step; collect the output.

    Returns (env, s, R, s', terminated, k) with s and s' as step numbers."""
    out = []
    for t, (rewards, terminated, truncated, within_episode) in enumerate(steps):
        num_envs = len(rewards)
        observations = np.array([[t, env] for env in range(num_envs)], dtype=np.float32)
        next_observations = observations + [1, 0]
        transitions = n_step(observations, np.zeros(num_envs, dtype=int), np.array(rewards, dtype=np.float64),
                             next_observations, np.array(terminated), np.array(truncated), np.array(within_episode))
        complete = [] if transitions is None else list(zip(*transitions))
        out += [(int(env), int(s[0]), r, int(s2[0]), bool(term), int(k)) for s, _, r, s2, term, k, env in complete]
        assert all(s[1] == env for s, *_, env in complete)  # each transition names the env it came from
    return out


def test_n_step_returns_by_hand_with_an_episode_ending_inside_the_window():
    # One env; rewards 1..5; the episode terminates on the 5th step (s5 is terminal). n = 3, γ = 0.5.
    steps = [([r], [r == 5], [False], [True]) for r in (1, 2, 3, 4, 5)]
    assert fold(NStepReturns(n=3, gamma=0.5, num_envs=1), steps) == [
        (0, 0, 1 + 0.5 * 2 + 0.25 * 3, 3, False, 3),
        (0, 1, 2 + 0.5 * 3 + 0.25 * 4, 4, False, 3),
        (0, 2, 3 + 0.5 * 4 + 0.25 * 5, 5, True, 3),
        (0, 3, 4 + 0.5 * 5, 5, True, 2),
        (0, 4, 5.0, 5, True, 1),
    ]


def test_n_step_returns_keep_two_envs_streams_apart_when_episodes_end_at_different_steps():
    # env 0 is truncated on its 2nd step (bootstraps from s2), skips the reset step 2, then runs on;
    # env 1 terminates on its 3rd step. Rewards are 1 for env 0 and 10 for env 1. n = 2, γ = 0.5.
    steps = [
        ([1, 10], [False, False], [False, False], [True, True]),
        ([1, 10], [False, False], [True, False], [True, True]),
        ([1, 10], [False, True], [False, False], [False, True]),  # env 0 resets
        ([1, 10], [False, False], [False, False], [True, False]),  # env 1 resets
        ([1, 10], [False, False], [False, False], [True, True]),
    ]
    out = fold(NStepReturns(n=2, gamma=0.5, num_envs=2), steps)
    assert sorted(t for t in out if t[0] == 0) == [
        (0, 0, 1.5, 2, False, 2),
        (0, 1, 1.0, 2, False, 1),  # truncated: not terminal, k = 1
        (0, 3, 1.5, 5, False, 2),
    ]
    assert sorted(t for t in out if t[0] == 1) == [
        (1, 0, 15.0, 2, False, 2),
        (1, 1, 15.0, 3, True, 2),
        (1, 2, 10.0, 3, True, 1),
    ]  # env 1's step 4 waits in its window: one step is not yet n


def test_one_step_returns_pass_each_transition_through_at_once():
    steps = [
        ([1, 2], [False, True], [False, False], [True, True]),
        ([3, 4], [False, False], [False, False], [True, False]),  # env 1 resets: nothing from it
        ([5, 6], [False, False], [False, False], [False, False]),  # both reset: nothing at all
    ]
    assert fold(NStepReturns(n=1, gamma=0.9, num_envs=2), steps) == [
        (0, 0, 1.0, 1, False, 1), (1, 0, 2.0, 1, True, 1), (0, 1, 3.0, 2, False, 1),
    ]


def test_collector_stores_n_step_transitions():
    _, buffer = collect_into_buffer(make_collector(num_envs=2, n_step=3, gamma=0.5))
    stored = buffer.storage
    steps = stored.steps[: len(buffer)]
    assert set(steps.tolist()) <= {1, 2, 3} and (steps == 3).sum() > 0.8 * len(steps)
    # A k < 3 transition is an episode's end (CartPole ends by termination within 64 steps here).
    assert torch.equal(stored.terminated[: len(steps)][steps < 3], torch.ones(int((steps < 3).sum())))
