"""Every part of the agent, built from its config group and checked against the others it meets."""

import os

import torch
from omegaconf import DictConfig

from rl_pipeline.agents.base import OffPolicyAgent
from rl_pipeline.agents.evaluation import Evaluator
from rl_pipeline.data.schedule import Schedule
from rl_pipeline.envs.make import (
    registered_spec,
    require_array_observations,
    require_discrete_actions,
    sub_env_wrappers,
    wrap_for_training,
)
from rl_pipeline.errors import ConfigError
from rl_pipeline.run.config import build, build_around
from rl_pipeline.validation import expected, positive_number


def build_transforms(cfg: DictConfig) -> list:
    return [build(node, f"transforms.{name}") for name, node in cfg.transforms.items()]


def build_env(cfg: DictConfig, transforms: list, **kwargs):
    """The env of cfg.env with the sub-env transforms, which the policy's input includes."""
    return build(cfg.env, "env", wrappers=sub_env_wrappers(transforms), **kwargs)


def eval_env_maker(cfg: DictConfig, transforms: list):
    """num_envs -> the env of cfg.env, stepped in this process so that sub-env i resets with seed + i."""
    def make_env(num_envs: int):
        return build_env(cfg, transforms, num_envs=num_envs, vectorization_mode="sync")

    return make_env


def solved_return(cfg: DictConfig) -> float | None:
    """What solved means: trainer.solved_return, else the env's threshold in gymnasium's registry (None: never).

    Evaluation confirms and the run records its first solving evaluation whether or not it stops there.
    """
    if cfg.trainer.solved_return is not None:
        return cfg.trainer.solved_return
    return registered_spec(cfg.env.id).reward_threshold


def build_optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    if "lr" in cfg.optimizer:
        positive_number("optimizer.lr", cfg.optimizer.lr)
    make_optimizer = build(cfg.optimizer, "optimizer")
    try:
        return make_optimizer(params)
    except Exception as error:  # torch's own argument checks: ValueError, TypeError, IndexError (betas=[0.9])
        raise ConfigError("optimizer", f"{type(error).__name__}: {str(error).splitlines()[0]}") from None


def check_buffer_holds_episode_ends(cfg: DictConfig, buffer, num_envs: int) -> None:
    """An episode's end releases up to n_step transitions per sub-env in one add."""
    needed = cfg.agent.get("n_step", 1) * num_envs
    if buffer.capacity < needed:
        raise expected(
            "buffer.capacity", f"at least agent.n_step x env.num_envs ({needed}), the transitions one step can add",
            buffer.capacity,
        )


def check_buffer_fits(buffer, space) -> None:
    """A buffer that cannot be allocated is refused now, not at its first add, mid-run."""
    needed = buffer.planned_nbytes(space.shape, space.dtype)
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise ConfigError(
            "buffer.capacity", f"expected a buffer that fits in memory: {buffer.capacity} transitions of "
            f"{space.shape} {space.dtype} take {needed / 2**30:,.1f} GiB, this machine has {available / 2**30:,.1f} GiB",
        )


def build_evaluator(cfg: DictConfig, transforms: list) -> Evaluator:
    return Evaluator(
        eval_env_maker(cfg, transforms),
        episodes=cfg.trainer.eval_episodes,
        seed=cfg.trainer.eval_seed,
        solved_return=solved_return(cfg),
        confirm_episodes=cfg.trainer.solved_confirm_episodes,
        max_episode_steps=cfg.trainer.eval_max_episode_steps,
    )


def build_schedule(cfg: DictConfig, num_envs: int) -> Schedule:
    """Evaluations and the budget's end fall on whole vector steps, or the run could not keep to them."""
    for key in ("eval_interval_env_steps", "max_env_steps"):
        if cfg.trainer[key] % num_envs:
            raise expected(
                f"trainer.{key}", f"a multiple of env.num_envs ({num_envs}), the env steps of one vector step",
                cfg.trainer[key],
            )
    return Schedule(
        cfg.collector.env_steps_per_iteration, cfg.trainer.eval_interval_env_steps, cfg.trainer.max_env_steps
    )


def build_agent(cfg: DictConfig) -> OffPolicyAgent:
    """Every part, in data-flow order, then the agent of cfg.agent around them; all config mistakes surface
    here, before MLflow or training."""
    transforms = build_transforms(cfg)
    env = build_env(cfg, transforms)
    try:
        num_actions = require_discrete_actions(env)
        space = require_array_observations(env)
    except ConfigError as error:
        raise error.within("env") from None
    loss = build(cfg.loss, "loss")
    network = build(cfg.network, "network", observation_shape=space.shape, output_shape=loss.output_shape(num_actions))
    buffer = build(cfg.buffer, "buffer")
    check_buffer_holds_episode_ends(cfg, buffer, env.num_envs)
    check_buffer_fits(buffer, space)
    return build_around(
        cfg.agent,
        "agent",
        network=network,
        loss=loss,
        observation_space=space,
        buffer=buffer,
        collector=build(cfg.collector, "collector", env=wrap_for_training(env, transforms)),
        exploration=build(cfg.exploration, "exploration"),
        optimizer=build_optimizer(cfg, network.parameters()),
        transforms=transforms,
        evaluator=build_evaluator(cfg, transforms),
        schedule=build_schedule(cfg, env.num_envs),
        checkpoint_buffer_max_bytes=cfg.trainer.checkpoint_buffer_max_mb * 2**20,
    )
