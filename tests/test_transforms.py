import numpy as np
import torch

from rl_pipeline.envs import make_vector_env, wrap_for_training
from rl_pipeline.transforms import NormalizeObservation, policy_input


def test_policy_input_reproduces_the_wrappers_normalization_on_raw_observations():
    transform = NormalizeObservation()
    env = wrap_for_training(make_vector_env("CartPole-v1", num_envs=2), [transform])
    env.reset(seed=0)
    for _ in range(50):
        env.step(env.action_space.sample())
    frozen = policy_input([transform])
    raw = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    transform._wrapper.update_running_mean = False
    expected = transform._wrapper.observations(raw)
    np.testing.assert_allclose(frozen(torch.as_tensor(raw)).numpy(), expected, rtol=1e-5, atol=1e-6)


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
