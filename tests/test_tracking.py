import os
import re
import signal
import textwrap
import threading
import time
from contextlib import nullcontext

import mlflow
import pytest
import torch
from conftest import all_runs, compose_config
from mlflow.entities import LoggedModelStatus

from rl_pipeline.run.checkpoints import SigtermExits
from rl_pipeline.tracking import mlflow_runs


@pytest.fixture
def store(tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    return tracking_uri


def test_flatten_gives_the_keys_a_user_overrides():
    nested = {"optimizer": {"lr": 0.1, "betas": [0.9, 0.99]}, "seed": 0, "transforms": {}}
    assert mlflow_runs.flatten(nested) == {"optimizer.lr": 0.1, "optimizer.betas": [0.9, 0.99], "seed": 0, "transforms": {}}


def test_run_name_is_the_env_the_overrides_the_seed_and_a_random_part():
    cfg = compose_config("+experiment=dqn", "optimizer.lr=0.001", "seed=1")
    overrides = ["+experiment=dqn", "seed=1", "optimizer.lr=0.001"]
    first, second = mlflow_runs.run_name(cfg, overrides), mlflow_runs.run_name(cfg, overrides)
    assert re.fullmatch(r"CartPole-v1 experiment=dqn optimizer\.lr=0\.001 seed=1 [0-9a-f]{6}", first)
    assert first != second, "repeats of one command tell apart"
    assert re.fullmatch(r"CartPole-v1 seed=0 [0-9a-f]{6}", mlflow_runs.run_name(compose_config(), []))


def test_params_are_the_settings_under_the_keys_one_overrides(store):
    cfg = compose_config("+experiment=dqn", "paths.output_dir=somewhere", "buffer=prioritized")
    params = mlflow_runs.params(cfg)
    assert params["optimizer.lr"] == "0.0023" and params["seed"] == "0" and params["buffer.alpha"] == "0.6"
    assert not [key for key in params if "_target_" in key or "_partial_" in key]
    # Copies of another key (collector.seed: ${seed}), where a job writes, how it is watched: none.
    for key in ("collector.seed", "exploration.max_env_steps", "buffer.beta_steps", "paths.output_dir",
                "logger.experiment_name", "trainer.lightning.enable_progress_bar", "resume"):
        assert key not in params
    # A value set in place of the copy is a setting again; the whole config is still there for resume.
    overridden = compose_config("+experiment=dqn", "paths.output_dir=x", "buffer=prioritized", "buffer.beta_steps=5000")
    assert mlflow_runs.params(overridden)["buffer.beta_steps"] == "5000"
    assert mlflow_runs.resolved_config(cfg)["collector.seed"] == "0"


def test_sqlite_artifacts_live_beside_the_database(tmp_path):
    assert mlflow_runs.artifact_location(f"sqlite:///{tmp_path}/mlflow.db") == (tmp_path / "mlartifacts").as_uri()
    assert mlflow_runs.artifact_location("http://127.0.0.1:5000") is None


@pytest.mark.parametrize(
    ("error", "status"), [(None, "FINISHED"), (RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_run_ends_with_the_status_of_how_its_block_ended(store, error, status):
    cfg = compose_config("+experiment=dqn", "paths.output_dir=unused")
    with pytest.raises(type(error)) if error else nullcontext():
        with mlflow_runs.mlflow_run(cfg):
            if error:
                raise error
    (run,) = all_runs(store)
    assert run.info.status == status
    assert mlflow.active_run() is None


def test_sigterm_from_the_run_start_on_ends_the_run_killed(store):
    cfg = compose_config("+experiment=dqn", "paths.output_dir=unused")
    with pytest.raises(SystemExit) as exited:
        with SigtermExits(), mlflow_runs.mlflow_run(cfg):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # never reached: the handler raises at once
    assert exited.value.code == 128 + signal.SIGTERM
    (run,) = all_runs(store)
    assert run.info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back


def test_sigterm_inside_a_library_exits_once_the_call_returns():
    # Raised inside a library, SystemExit could leave an import lock or an SQLite write behind.
    finished, started = [], time.monotonic()
    with pytest.raises(SystemExit) as exited, SigtermExits():
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
        finished.append(textwrap.fill("word " * 1_000_000, width=50))  # about a second of stdlib Python
        time.sleep(10)  # never slept through: the exit comes here
    assert finished, "the library call was cut short"
    assert exited.value.code == 128 + signal.SIGTERM and time.monotonic() - started < 8


def test_sigterm_during_lightning_fit_waits_for_fit_to_return():
    returned = False
    with pytest.raises(SystemExit), SigtermExits() as sigterm:
        with sigterm.lightning_fit():
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's own handler would stop at the next batch
            returned = True
    assert returned


def test_a_failed_run_keeps_the_error_line_as_a_tag(store):
    cfg = compose_config("+experiment=dqn", "paths.output_dir=unused")
    with pytest.raises(RuntimeError):
        with mlflow_runs.mlflow_run(cfg):
            raise RuntimeError("boom\nsecond line")
    (run,) = all_runs(store)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RuntimeError: boom"


def test_a_signal_during_the_creation_of_a_fresh_store_waits_until_it_is_created(tracking_uri):
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with mlflow_runs.store_lock(tracking_uri):
            mlflow.MlflowClient(tracking_uri).search_experiments()  # creates the tables
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            assert received == []  # held back while the store is being made
        assert received == [signal.SIGTERM]  # delivered once it is
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_resumed_export_keeps_the_one_finished_policy_and_replaces_an_unfinished_one(store):
    mlflow.set_tracking_uri(store)
    client = mlflow.MlflowClient(store)
    with mlflow.start_run() as run:
        experiment_id, run_id = run.info.experiment_id, run.info.run_id
        client.create_logged_model(experiment_id, source_run_id=run_id, name="model")  # killed while uploading
        model_id = mlflow_runs.log_policy(torch.nn.Linear(4, 2), step=512)
        assert mlflow_runs.log_policy(torch.nn.Linear(4, 2), step=512) == model_id  # killed after it was logged
    models = client.search_logged_models([experiment_id])
    assert [(model.model_id, model.status) for model in models] == [(model_id, LoggedModelStatus.READY)]
