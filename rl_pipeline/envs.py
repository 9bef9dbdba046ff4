"""Environments: gymnasium vector envs, built from the `env` config group."""

import logging
import pickle

import gymnasium as gym
from gymnasium.wrappers.vector import RecordEpisodeStatistics

from rl_pipeline.validation import ConfigError, expected, one_of, positive_int

log = logging.getLogger(__name__)

VECTORIZATION_MODES = ("sync", "async")
# Links between layers, and the closures that built the sub-envs: structure, not state.
NOT_STATE = ("env", "env_fns")


def make_vector_env(
    id: str,
    num_envs: int = 1,
    vectorization_mode: str = "sync",
    max_episode_steps: int | None = None,
    **env_kwargs,
) -> gym.vector.VectorEnv:
    """`num_envs` copies of the registered env `id`, stepped together with NEXT_STEP autoreset."""
    positive_int("num_envs", num_envs)
    one_of("vectorization_mode", vectorization_mode, VECTORIZATION_MODES)
    if max_episode_steps is not None:
        env_kwargs["max_episode_steps"] = positive_int("max_episode_steps", max_episode_steps)
    try:
        gym.spec(id)
    except gym.error.Error:
        raise expected("id", "a registered gymnasium env id such as CartPole-v1", id) from None
    return gym.make_vec(id, num_envs=num_envs, vectorization_mode=vectorization_mode, **env_kwargs)


def require_discrete_actions(env: gym.vector.VectorEnv) -> int:
    """The number of actions; DQN picks one of finitely many."""
    space = env.single_action_space
    if not isinstance(space, gym.spaces.Discrete):
        raise ConfigError("id", f"expected an env with a Discrete action space for DQN, got {space}")
    return int(space.n)


def reward_threshold(env: gym.vector.VectorEnv) -> float | None:
    """The return at which gymnasium's registry calls the env solved (475 for CartPole-v1)."""
    return env.unwrapped.spec.reward_threshold


def wrap_for_training(env: gym.vector.VectorEnv, transforms) -> gym.vector.VectorEnv:
    """Episode statistics on the raw rewards first, then the transforms in their config order."""
    env = RecordEpisodeStatistics(env)
    for transform in transforms:
        env = transform.wrap(env)
    return env


def layers(env: gym.vector.VectorEnv):
    """The wrappers from the outside in, then the vector env itself."""
    while isinstance(env, gym.vector.VectorWrapper):
        yield env
        env = env.env
    yield env


def env_state(env: gym.vector.VectorEnv) -> bytes | None:
    """Every layer's state, pickled: the sub-envs' physics, RNGs and time limits, the wrappers' statistics.

    None where the sub-envs cannot be pickled (async ones live in other processes): a resumed run
    then starts new episodes.
    """
    try:
        return pickle.dumps([{k: v for k, v in vars(layer).items() if k not in NOT_STATE} for layer in layers(env)])
    except (TypeError, AttributeError, pickle.PicklingError) as error:
        log.warning("Checkpoints leave out the env's state (%s); a resumed run starts new episodes", error)
        return None


def restore_env_state(env: gym.vector.VectorEnv, state: bytes) -> None:
    """In place, so that whatever holds a wrapper (a transform, the collector) sees the restored one."""
    for layer, saved in zip(layers(env), pickle.loads(state), strict=True):
        vars(layer).update(saved)
