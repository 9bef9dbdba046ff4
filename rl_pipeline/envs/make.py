"""Environments: gymnasium vector envs, built from the `env` config group."""

import importlib
import logging
import pickle
from collections.abc import Callable, Sequence

import gymnasium as gym
from gymnasium.envs.registration import EnvSpec
from gymnasium.wrappers.vector import RecordEpisodeStatistics

from rl_pipeline.errors import ConfigError
from rl_pipeline.validation import expected, one_of, positive_int

log = logging.getLogger(__name__)

# vector_entry_point: the env's own batched implementation, where gymnasium has one (CartPole, ALE).
VECTORIZATION_MODES = ("sync", "async", "vector_entry_point")
# Links between layers, and the closures that built the sub-envs: structure, not state.
NOT_STATE = ("env", "env_fns")


def make_vector_env(
    id: str,
    num_envs: int = 1,
    vectorization_mode: str = "sync",
    max_episode_steps: int | None = None,
    wrappers: Sequence[Callable[[gym.Env], gym.Env]] = (),
    **env_kwargs,
) -> gym.vector.VectorEnv:
    """`num_envs` copies of the registered env `id`, stepped together with NEXT_STEP autoreset.

    `wrappers` wrap each sub-env, in order (frame stacking, Atari preprocessing).
    """
    positive_int("num_envs", num_envs)
    one_of("vectorization_mode", vectorization_mode, VECTORIZATION_MODES)
    if max_episode_steps is not None:
        env_kwargs["max_episode_steps"] = positive_int("max_episode_steps", max_episode_steps)
    spec = registered_spec(id)
    if vectorization_mode == "vector_entry_point":
        if spec.vector_entry_point is None:
            raise expected("vectorization_mode", f"sync or async: {id} has no vector_entry_point", vectorization_mode)
        if wrappers:
            raise expected("vectorization_mode", "sync or async with a transform that wraps each sub-env", vectorization_mode)
        return gym.make_vec(spec.id, num_envs=num_envs, vectorization_mode=vectorization_mode, **env_kwargs)
    return gym.make_vec(
        spec.id, num_envs=num_envs, vectorization_mode=vectorization_mode, wrappers=list(wrappers), **env_kwargs
    )


def registered_spec(id: str) -> EnvSpec:
    """The spec of `id`; `module:id` (gymnasium's syntax) first imports the module that registers it (ale_py)."""
    module, _, name = id.rpartition(":")
    try:
        if module:
            importlib.import_module(module)
        return gym.spec(name)
    except (ImportError, gym.error.Error):
        raise expected("id", "a registered gymnasium env id such as CartPole-v1 or ale_py:ALE/Pong-v5", id) from None


def require_discrete_actions(env: gym.vector.VectorEnv) -> int:
    """The number of actions; DQN picks one of finitely many."""
    space = env.single_action_space
    if not isinstance(space, gym.spaces.Discrete):
        raise ConfigError("id", f"expected an env with a Discrete action space for DQN, got {space}")
    return int(space.n)


def require_array_observations(env: gym.vector.VectorEnv) -> gym.spaces.Box:
    """A sub-env's observation space; the Q-networks take arrays (Box), not Discrete, Tuple or Dict ones."""
    space = env.single_observation_space
    if not isinstance(space, gym.spaces.Box):
        raise ConfigError("id", f"expected an env with Box (array) observations for the Q-network, got {space}")
    return space


def sub_env_wrappers(transforms) -> list[Callable[[gym.Env], gym.Env]]:
    """The transforms that wrap each sub-env (what the policy sees, in training and evaluation alike)."""
    return [t.wrap_sub_env for t in transforms if hasattr(t, "wrap_sub_env")]


def wrap_for_training(env: gym.vector.VectorEnv, transforms) -> gym.vector.VectorEnv:
    """Episode statistics on the env's own rewards first, then the training-only transforms in config order."""
    env = RecordEpisodeStatistics(env)
    for transform in transforms:
        if hasattr(transform, "wrap"):
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

    None where the sub-envs cannot be pickled (async ones live in other processes), or do not come
    back as they were (ALE's emulators pickle, but a restored one plays on differently): a resumed
    run then starts new episodes.
    """
    sub_envs = getattr(list(layers(env))[-1], "envs", ())
    if any(hasattr(sub_env.unwrapped, "ale") for sub_env in sub_envs):
        log.warning("Checkpoints leave out the state of ALE's emulators; a resumed run starts new episodes")
        return None
    try:
        return pickle.dumps([{k: v for k, v in vars(layer).items() if k not in NOT_STATE} for layer in layers(env)])
    except (TypeError, AttributeError, pickle.PicklingError) as error:
        log.warning("Checkpoints leave out the env's state (%s); a resumed run starts new episodes", error)
        return None


def restore_env_state(env: gym.vector.VectorEnv, state: bytes) -> None:
    """In place, so that whatever holds a wrapper (a transform, the collector) sees the restored one."""
    for layer, saved in zip(layers(env), pickle.loads(state), strict=True):
        vars(layer).update(saved)
