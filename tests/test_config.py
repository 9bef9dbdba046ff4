"""Every option of every config group composes through Hydra and instantiates."""

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_config
from rl_pipeline.module import DQNModule
from rl_pipeline.train import GROUPS, build_module, check_settings

OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]


def test_every_group_has_an_option():
    assert {group for group, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_builds(group, option):
    cfg = compose_config("+experiment=dqn", f"{group}={option}")
    check_settings(cfg)
    module = build_module(cfg)
    assert isinstance(module, DQNModule)
    env = module.evaluator.screen_env
    observation = env.reset(seed=0)[0]
    assert module.policy(torch.as_tensor(observation)).shape == (cfg.trainer.eval_episodes, env.single_action_space.n)


def test_experiment_dqn_overrides_only_what_it_names():
    base = OmegaConf.to_container(compose_config().collector)
    dqn = OmegaConf.to_container(compose_config("+experiment=dqn").collector)
    changed = {key for key in base if base[key] != dqn[key]}
    assert changed == {"epsilon_end", "epsilon_fraction"}


def test_collector_budget_follows_the_trainer_budget():
    cfg = compose_config("trainer.max_env_steps=1234")
    assert cfg.collector.max_env_steps == 1234
