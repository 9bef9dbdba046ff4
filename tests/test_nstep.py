import numpy as np

from rl_pipeline.data.nstep import NStepReturns


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
