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


CLASSIC_ENVS = ("cartpole", "acrobot", "mountain_car", "lunar_lander")
VALUE_PRESETS = ("dqn", "rainbow_lite", "qrdqn", "c51", "rainbow")


def tuned_values(path) -> dict:
    """A tuned file's settings, after those of the files its defaults list includes (as Hydra merges them)."""
    tuned = OmegaConf.load(path)
    merged = OmegaConf.create()
    for included in tuned.pop("defaults", []):
        merged.merge_with(tuned_values(CONF_DIR / f"{included.lstrip('/')}.yaml"))
    return flatten(OmegaConf.to_container(OmegaConf.merge(merged, tuned)))


@pytest.mark.parametrize("env", CLASSIC_ENVS)
@pytest.mark.parametrize("experiment", VALUE_PRESETS)
def test_every_preset_composes_with_every_env_and_brings_its_tuned_settings(experiment, env):
    tuned = CONF_DIR / "tuned" / experiment / f"{env}.yaml"
    assert tuned.exists(), f"no settings for {experiment} on {env}"
    cfg = compose_config(f"+experiment={experiment}", f"env={env}")
    for key, value in tuned_values(tuned).items():
        assert OmegaConf.select(cfg, key) == value, key
    cfg = compose_config(f"+experiment={experiment}", f"env={env}", "buffer.capacity=1000", "trainer.eval_episodes=2")
    check_settings(cfg)
    agent = build_agent(cfg)
    assert agent.evaluator.screen_env.spec.id == cfg.env.id


def test_the_env_choice_picks_its_own_settings_and_an_override_still_wins():
    cartpole, acrobot = compose_config("+experiment=dqn"), compose_config("+experiment=dqn", "env=acrobot")
    mountain_car = compose_config("+experiment=dqn", "env=mountain_car")
    assert (cartpole.optimizer.lr, acrobot.optimizer.lr) == (2.3e-3, 6.3e-4)
    assert (cartpole.trainer.max_env_steps, mountain_car.trainer.max_env_steps) == (100_000, 120_000)
    mine = compose_config("+experiment=dqn", "env=acrobot", "optimizer.lr=0.01", "trainer.max_env_steps=20000")
    assert (mine.optimizer.lr, mine.trainer.max_env_steps, mine.exploration.max_env_steps) == (0.01, 20_000, 20_000)
    assert mine.buffer.batch_size == acrobot.buffer.batch_size == 128  # the rest still Acrobot's


def test_an_env_without_tuned_settings_takes_the_group_defaults():
    cfg = compose_config("+experiment=dqn_atari")
    assert not (CONF_DIR / "tuned" / "dqn_atari").exists() and cfg.env.id == "ale_py:ALE/Pong-v5"
    bare = compose_config("env=acrobot")  # no experiment: nothing tuned
    assert bare.optimizer.lr == OmegaConf.load(CONF_DIR / "optimizer" / "adam.yaml").lr
