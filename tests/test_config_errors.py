"""Mistakes that can be known before training are one ConfigError naming the key, before any MLflow run exists.

In-process through `train(cfg)` with configs that Hydra composes, one case per class of mistake;
test_cli.py checks, in subprocesses, that such an error reaches the user as one line and a non-zero exit.
"""

import gymnasium as gym
import mlflow
import pytest
from conftest import all_runs, compose_config
from hydra.errors import HydraException
from torch import nn

from rl_pipeline.errors import ConfigError
from rl_pipeline.agents.base import check_outputs
from rl_pipeline.run.checkpoints import CHECKPOINT_TAG, AtomicCheckpointIO
from rl_pipeline.run.train import train

TINY = ("+experiment=dqn", "trainer.max_env_steps=1024", "collector.learning_starts=256")

CASES = [
    # (overrides, the start of the error's text)
    (("env.id=FrozenLake-v1",), "env.id: expected an env with Box (array) observations"),  # Discrete observations
    (("env.id=Blackjack-v1",), "env.id: expected an env with Box (array) observations"),  # Tuple observations
    (("network=nature_cnn",), "network.observation_shape: expected image observations"),  # pixels net, vectors
    (("buffer.capacity=1000000000000",), "buffer.capacity: expected a buffer that fits in memory"),
    (("trainer.lightning.devices=2",), "trainer.lightning.devices: expected 1 or a list of one device"),
    (("trainer.lightning.devices=auto",), "trainer.lightning.devices: expected 1 or a list of one device"),
    (("+trainer.lightning.num_nodes=2",), "trainer.lightning.num_nodes: set by the pipeline itself"),
    (("+trainer.lightning.limit_val_batches=0",), "trainer.lightning.limit_val_batches: set by the pipeline itself"),
    (("+trainer.lightning.max_time=00:00:00:01",), "trainer.lightning.max_time: set by the pipeline itself"),
    (("trainer.lightning.accelerator=tpu",), "trainer.lightning:"),  # Lightning's own check, keyed
    (("+trainer.lightning.precision=99",), "trainer.lightning.precision: expected 64 or 32 or 16 or"),
    (("trainer.max_env_steps=200",), "trainer.max_env_steps: expected at least collector.learning_starts (256)"),
    (("logger.experiment_name=''",), "logger.experiment_name: expected a name of 1 to 500 characters"),
    ((f"logger.experiment_name={'x' * 501}",), "logger.experiment_name: expected a name of 1 to 500 characters"),
    (("logger.server_timeout_s=0",), "logger.server_timeout_s: expected a positive number"),
    (("seed=4294967296",), "seed: expected an integer in [0, 4294967295]"),
    (("seed=-1",), "seed: expected an integer >= 0"),
    (("+optimizer.betas=[0.9]",), "optimizer: ConfigIndexError: list index out of range"),  # two, given one
    (("+optimizer.weight_decay=-1",), "optimizer: ValueError: Invalid weight_decay value: -1"),
    # Test seeds that evaluation (1000000 .. 1000119: 20 screening, 100 confirmation) also plays.
    (("trainer.test_seed=1000119",), "trainer.test_seed: expected test seeds apart from evaluation's (1000000 .. 1000119"),
    (("trainer.test_seed=999901",), "trainer.test_seed: expected test seeds apart from evaluation's"),
    (("trainer.test_seed=4294967290",), "trainer.test_seed: expected seeds up to 4294967295"),
    (("trainer.test_episodes=0",), "trainer.test_episodes: expected a positive integer"),
    # Evaluations and the budget's end must fall on whole vector steps of env.num_envs (4) env steps.
    (("trainer.eval_interval_env_steps=2001",),
     "trainer.eval_interval_env_steps: expected a multiple of env.num_envs (4), the env steps of one vector step, "
     "got 2001"),
    (("trainer.max_env_steps=1026",), "trainer.max_env_steps: expected a multiple of env.num_envs (4)"),
    # One step can end an episode in every sub-env, each releasing n_step transitions at once.
    (("agent.n_step=3", "buffer.capacity=11", "buffer.batch_size=8"),
     "buffer.capacity: expected at least agent.n_step x env.num_envs (12)"),
]


KEYED = [
    # (overrides, the key the error names); {other_config}: a checkpoint trained with another config
    ("+buffer.capcity=3", "buffer.capcity"),  # unknown key, added with +
    ("+foo=1", "foo"),  # unknown top-level key
    ("+trainer.foo=1", "trainer.foo"),  # unknown trainer key
    ("+trainer.lightning.max_epochs=3", "trainer.lightning.max_epochs"),  # the env-step budget decides
    ("+callbacks.best_checkpoint.dirpath=/tmp", "callbacks.best_checkpoint.dirpath"),  # the run decides
    ("seed=abc", "seed"),  # wrong type
    ("buffer.capacity=abc", "buffer.capacity"),  # wrong type
    ("trainer.max_env_steps=many", "trainer.max_env_steps"),  # wrong type
    ("trainer.eval_episodes=1.5", "trainer.eval_episodes"),  # wrong type
    ("trainer.eval_max_episode_steps=0", "trainer.eval_max_episode_steps"),
    ("trainer.lightning.log_every_n_steps=abc", "trainer.lightning.log_every_n_steps"),  # wrong type, Lightning's
    ("trainer.lightning.enable_model_summary=maybe", "trainer.lightning.enable_model_summary"),
    ("loss.loss=l1", "loss.loss"),  # unknown choice
    ("env.vectorization_mode=threads", "env.vectorization_mode"),  # unknown choice
    ("env.id=NoSuchEnv-v0", "env.id"),  # unknown env id
    ("env.id=Pendulum-v1", "env.id"),  # continuous actions: not for DQN
    ("transforms=atari", "env.id"),  # Atari preprocessing on CartPole
    ("env=acrobot env.vectorization_mode=vector_entry_point", "env.vectorization_mode"),  # no native vector form
    ("buffer.batch_size=512 buffer.capacity=100", "buffer.batch_size"),  # a batch larger than the buffer
    ("collector.env_steps_per_iteration=255", "collector.env_steps_per_iteration"),  # not a multiple of num_envs
    ("buffer.batch_size=0", "buffer.batch_size"),  # non-positive size
    ("env.num_envs=-2", "env.num_envs"),  # non-positive size
    ("network.hidden_sizes=[64,0]", "network.hidden_sizes"),  # non-positive size
    ("trainer.checkpoint_interval_env_steps=0", "trainer.checkpoint_interval_env_steps"),  # non-positive
    ("agent.max_grad_norm=0", "agent.max_grad_norm"),  # non-positive
    ("trainer.checkpoint_buffer_max_mb=-1", "trainer.checkpoint_buffer_max_mb"),  # out of range
    ("optimizer.lr=-1", "optimizer.lr"),  # out of range
    ("exploration.epsilon_end=1.5", "exploration.epsilon_end"),  # probability outside [0, 1]
    ("loss.gamma=-0.1", "loss.gamma"),  # probability outside [0, 1]
    ("agent.target_sync_tau=0", "agent.target_sync_tau"),  # outside (0, 1]
    ("agent.n_step=0", "agent.n_step"),  # non-positive
    ("+agent.gamma=0.9", "agent.gamma"),  # the loss's: not the agent's
    ("+agent.network=mlp", "agent.network"),  # a part the pipeline hands over
    ("exploration=noisy", "exploration.epsilon_end"),  # the preset's ε, for an exploration that takes none
    ("exploration=noisy ~exploration.epsilon_end ~exploration.epsilon_fraction", "exploration"),  # no noisy layers
    ("callbacks.stop_when_solved._target_=no.such.Callback", "callbacks.stop_when_solved._target_"),
    ("~callbacks.best_checkpoint", "callbacks.best_checkpoint"),  # the exported policy is its best
    ("callbacks.last_checkpoint=null", "callbacks.last_checkpoint"),
    ("+callbacks.five=5", "callbacks.five._target_"),  # not a callback's config
    ("~callbacks.last_checkpoint", "callbacks.last_checkpoint"),  # resume= continues from it
    ("resume=/no/such/run", "resume"),  # a resume path that does not exist
    ("resume=0123456789abcdef0123456789abcdef", "resume"),  # an unknown run id
    ("resume=last", "resume"),  # nothing to resume in this store
    ("resume={other_config}", "resume"),  # a checkpoint of another config
]


@pytest.fixture
def store(tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    return tracking_uri


@pytest.mark.parametrize(("overrides", "said"), CASES, ids=[" ".join(o)[:60] for o, _ in CASES])
def test_a_config_mistake_is_one_error_naming_the_key_before_any_run(store, tmp_path, overrides, said):
    cfg = compose_config(*TINY, *overrides, f"paths.output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError) as raised:
        train(cfg)
    assert str(raised.value).startswith(said)
    assert "\n" not in str(raised.value)
    assert not all_runs(store)
    assert not (tmp_path / "run").exists()  # nothing written: no checkpoint folder, no lock


@pytest.mark.parametrize(("overrides", "key"), KEYED, ids=[o for o, _ in KEYED])
def test_a_mistake_of_each_kind_names_its_key_before_any_run(store, tmp_path, overrides, key):
    other_config = tmp_path / "other" / "last.ckpt"
    run = {"mlflow_run_id": "0" * 32, "config": {"seed": "99"}, "training_done": False}
    AtomicCheckpointIO().save_checkpoint({"run": run, "state_dict": {}}, other_config)
    cfg = compose_config(*TINY, *overrides.format(other_config=other_config).split(), f"paths.output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError) as raised:
        train(cfg)
    assert raised.value.key == key and "\n" not in str(raised.value)
    assert not all_runs(store)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("override", "named"), [("network=transformer", "network/transformer"),
                                                 ("transforms=whiten", "transforms/whiten"),
                                                 ("optimizer.lrr=0.1", "optimizer.lrr")])  # a new key needs +
def test_an_unknown_group_option_or_key_is_refused_by_composition_naming_it(override, named):
    with pytest.raises(HydraException, match=named):
        compose_config(*TINY, override)


@pytest.mark.parametrize(
    ("uri", "said"),
    [
        ("ftp://127.0.0.1/mlflow", "MLFLOW_TRACKING_URI: expected an http(s):// MLflow server or a database URI"),
        ("./mlruns", "MLFLOW_TRACKING_URI: expected an http(s):// MLflow server or a database URI"),
        ("sqlite:///{tmp_path}/notes.txt", "MLFLOW_TRACKING_URI: expected an SQLite database file, got"),
        ("sqlite:///{tmp_path}", "MLFLOW_TRACKING_URI: expected an SQLite database file, got"),
        ("http://127.0.0.1:9", "MLFLOW_TRACKING_URI: expected a reachable MLflow server"),  # nothing listens on 9
    ],
    ids=["unknown-scheme", "a-bare-path", "a-text-file", "a-folder", "no-server"],
)
def test_a_tracking_uri_that_is_no_store_is_refused_and_a_file_it_names_is_left_alone(tmp_path, monkeypatch, uri, said):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, not a database\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp_path=tmp_path))
    cfg = compose_config(*TINY, f"paths.output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError) as raised:
        train(cfg)
    assert str(raised.value).startswith(said)
    assert notes.read_text() == "my notes, not a database\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_network_that_cannot_take_the_observations_is_named():
    space = gym.spaces.Box(-1, 1, shape=(4,))
    check_outputs(nn.Linear(4, 2), space, (2,))
    with pytest.raises(ConfigError, match=r"^network: cannot take the env's observations of shape \(4,\) \(float32\)"):
        check_outputs(nn.Linear(3, 2), space, (2,))
    with pytest.raises(ConfigError, match=r"^network: expected outputs of shape \(1, 2\) for one observation, got \(1, 5\)"):
        check_outputs(nn.Linear(4, 5), space, (2,))


def test_resuming_a_run_whose_checkpoint_was_deleted_names_the_missing_file(store, tmp_path):
    client = mlflow.MlflowClient(store)
    deleted = tmp_path / "old-run" / "checkpoints" / "last.ckpt"
    run_id = client.create_run(client.create_experiment("rl_pipeline"), tags={CHECKPOINT_TAG: str(deleted)}).info.run_id
    cfg = compose_config(*TINY, f"resume={run_id}", f"paths.output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=rf"^resume: the checkpoint of MLflow run {run_id} is missing: no file at {deleted} "):
        train(cfg)
