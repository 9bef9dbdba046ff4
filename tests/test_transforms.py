import numpy as np
import pytest
import torch
from gymnasium.wrappers import vector as vector_wrappers

from rl_pipeline.envs.make import make_vector_env, sub_env_wrappers, wrap_for_training
from rl_pipeline.envs.transforms import AtariPreprocessing, ClipReward, FrameStack, NormalizeObservation, policy_input
from rl_pipeline.errors import ConfigError


def make_env(id="CartPole-v1", transforms=(), num_envs=2, **kwargs):
    env = make_vector_env(id, num_envs=num_envs, wrappers=sub_env_wrappers(transforms), **kwargs)
    return wrap_for_training(env, transforms)


def test_policy_input_is_gymnasiums_normalization_with_the_running_statistics_of_raw_observations():
    transform = NormalizeObservation()
    env = wrap_for_training(make_vector_env("CartPole-v1", num_envs=2), [transform])
    plain = make_vector_env("CartPole-v1", num_envs=2)
    seen = [env.reset(seed=0)[0]]
    np.testing.assert_array_equal(seen[0], plain.reset(seed=0)[0])
    for _ in range(50):
        actions = env.action_space.sample()
        seen.append(env.step(actions)[0])
        np.testing.assert_array_equal(seen[-1], plain.step(actions)[0])  # observations pass raw
    stats = transform._wrapper.obs_rms
    np.testing.assert_allclose(stats.mean, np.concatenate(seen).mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(stats.var, np.concatenate(seen).var(axis=0), rtol=1e-3)
    # gymnasium's own wrapper, given the same statistics, normalizes as the policy's input does.
    reference = vector_wrappers.NormalizeObservation(make_vector_env("CartPole-v1", num_envs=2))
    reference.obs_rms, reference.update_running_mean = stats, False
    raw = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    frozen = policy_input([transform])
    np.testing.assert_allclose(frozen(torch.as_tensor(raw)).numpy(), reference.observations(raw), rtol=1e-5, atol=1e-6)


def test_policy_input_is_a_snapshot_that_later_steps_do_not_change():
    transform = NormalizeObservation()
    env = wrap_for_training(make_vector_env("CartPole-v1", num_envs=2), [transform])
    env.reset(seed=0)
    frozen = policy_input([transform])
    mean_then = frozen[0].mean.clone()
    for _ in range(20):
        env.step(env.action_space.sample())
    assert torch.equal(frozen[0].mean, mean_then)
    assert not np.allclose(transform._wrapper.obs_rms.mean, mean_then.numpy())


def test_no_transform_leaves_observations_raw():
    observations = torch.randn(3, 4)
    assert torch.equal(policy_input([])(observations), observations)


def test_clip_reward_clips_what_the_agent_learns_from_not_the_recorded_return():
    env = make_env("MountainCar-v0", [ClipReward(-0.25, 1.0)], max_episode_steps=20)  # -1 a step
    env.reset(seed=0)
    for _ in range(20):
        _, rewards, _, _, info = env.step(np.zeros(2, dtype=np.int64))
        assert rewards.tolist() == [-0.25, -0.25]
    assert info["episode"]["r"].tolist() == [-20.0, -20.0]  # the env's own return


def test_frame_stack_stacks_the_last_observations_in_each_sub_env():
    env = make_env(transforms=[FrameStack(3)])
    first, _ = env.reset(seed=0)
    assert first.shape == (2, 3, 4)
    np.testing.assert_array_equal(first[:, 0], first[:, 2])  # padded with the reset observation
    second = env.step(np.zeros(2, dtype=np.int64))[0]
    np.testing.assert_array_equal(second[:, :2], first[:, 1:])


def test_atari_preprocessing_gives_four_stacked_84x84_grayscale_frames():
    env = make_env("ale_py:ALE/Pong-v5", [AtariPreprocessing()], frameskip=1)
    observations, _ = env.reset(seed=0)
    assert observations.shape == (2, 4, 84, 84) and observations.dtype == np.uint8


@pytest.mark.parametrize(
    ("id", "kwargs", "message"),
    [
        ("CartPole-v1", {}, "^id: expected an Atari env"),
        ("ale_py:ALE/Pong-v5", {"frameskip": 4}, "^frameskip: expected 1 with the atari transform"),
    ],
)
def test_atari_preprocessing_refuses_an_env_it_does_not_fit(id, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_env(id, [AtariPreprocessing()], **kwargs)


def test_clip_reward_needs_a_range():
    with pytest.raises(ConfigError, match="^min_reward: expected a number below max_reward"):
        ClipReward(1.0, -1.0)
