"""Every option of every config group composes through Hydra and instantiates."""

import pytest
import torch
from conftest import CONF_DIR, compose_config
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor

from rl_pipeline.run.build import build_agent
from rl_pipeline.run.checkpoints import ResumableCheckpoint
from rl_pipeline.run.config import GROUPS, check_settings, target_of
from rl_pipeline.run.train import build_callbacks
from rl_pipeline.tracking.mlflow_runs import flatten

OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]
# Options for pixels compose with the Atari preset; every other one with the CartPole one.
PIXEL_OPTIONS = {("env", "pong"), ("transforms", "atari"), ("network", "nature_cnn"), ("network", "dueling_cnn")}
# What an option is refused without: noisy layers, and none of the preset's ε settings.
NEEDS = {("exploration", "noisy"): ("network.noisy=true", "~exploration.epsilon_end", "~exploration.epsilon_fraction")}


def test_every_group_has_an_option():
    assert {group for group, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_builds(tmp_path, group, option):
    experiment = "dqn_atari" if (group, option) in PIXEL_OPTIONS else "dqn"
    cfg = compose_config(f"+experiment={experiment}", f"{group}={option}", *NEEDS.get((group, option), ()),
                         "buffer.capacity=1000", "trainer.eval_episodes=2")
    check_settings(cfg)
    agent = build_agent(cfg)
    assert isinstance(agent, target_of(cfg.agent, "agent"))
    env = agent.evaluator.screen_env
    observation = env.reset(seed=0)[0]
    assert agent.policy(torch.as_tensor(observation)).shape == (cfg.trainer.eval_episodes, env.single_action_space.n)
    callbacks = build_callbacks(cfg, tmp_path)
    assert {name: type(c).__name__ for name, c in callbacks.items()} == {
        name: node._target_.rsplit(".", 1)[1] for name, node in cfg.callbacks.items()
    }
    last = callbacks["last_checkpoint"]
    assert isinstance(last, ResumableCheckpoint) and last.path == tmp_path / "last.ckpt"
    assert last.interval_env_steps == cfg.trainer.checkpoint_interval_env_steps


def test_a_callback_added_on_the_command_line_joins_the_run(tmp_path):
    cfg = compose_config("+experiment=dqn", "+callbacks.lr_monitor={_target_: pytorch_lightning.callbacks.LearningRateMonitor}")
    callbacks = build_callbacks(cfg, tmp_path)
    assert list(callbacks) == list(cfg.callbacks) and type(callbacks["lr_monitor"]) is LearningRateMonitor


def test_a_callback_set_to_null_is_left_out(tmp_path):
    cfg = compose_config("+experiment=dqn", "callbacks.progress_bar=null", "callbacks.stop_when_solved=null")
    assert list(build_callbacks(cfg, tmp_path)) == ["best_checkpoint", "last_checkpoint", "stop_at_iteration_end"]


EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_values_win_over_the_group_defaults(experiment):
    preset = OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml")
    cfg = compose_config(f"+experiment={experiment}")
    overrides = flatten(OmegaConf.to_container(preset))
    defaults = overrides.pop("defaults", [])
    assert overrides or len(defaults) > 1, "an experiment that sets nothing but its base"
    for key, value in overrides.items():
        assert OmegaConf.select(cfg, key) == value, key


def test_the_epsilon_schedule_follows_the_trainer_budget():
    cfg = compose_config("trainer.max_env_steps=1234")
    assert cfg.exploration.max_env_steps == 1234
