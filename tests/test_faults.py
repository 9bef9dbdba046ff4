"""Faults, one case per class: what the store holds afterwards, and that a resume or a re-run completes.

A kill in the export window, concurrent writers on a fresh store, a second process on a run, corrupt
checkpoints, a lost tracking server, an unwritable output folder and a full disk. (Sweeps with a
failing job are in test_sweeps.py, in-process config mistakes in test_config_errors.py.)
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import (
    TINY_RUN,
    all_runs,
    free_port,
    mlflow_server_process,
    module_env,
    read_until,
    run_cli,
    start_cli,
    start_module,
)

from rl_pipeline.run.checkpoints import LAST, AtomicCheckpointIO, read_checkpoint
from rl_pipeline.run.locks import RunLock

pytestmark = pytest.mark.slow  # each runs the CLI into a fault: a kill, a lost server, a full disk, a damaged store

# Checkpoints every 512 env steps, so that a kill after the first leaves something to resume.
KILLABLE = ("+experiment=dqn", "seed=0", *TINY_RUN, "trainer.max_env_steps=2048", "trainer.stop_when_solved=false",
            "trainer.checkpoint_interval_env_steps=512")


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def assert_each_step_once(uri: str, run_id: str, key: str = "train/epsilon", last_step: int = 2048) -> None:
    steps = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key)]
    assert sorted(steps) == list(range(256, last_step + 1, 256))


def assert_model_loads(uri: str, run_id: str) -> None:
    mlflow.set_tracking_uri(uri)
    assert mlflow.pytorch.load_model(f"runs:/{run_id}/model")(torch.zeros(3, 4)).shape == (3, 2)


@pytest.fixture
def killed_run(tmp_path, tracking_uri):
    """A run SIGKILLed just after its first checkpoint: RUNNING in the store, with last.ckpt at 512 env steps."""
    process = start_cli(*KILLABLE, cwd=tmp_path, tracking_uri=tracking_uri, run_dir=tmp_path / "run")
    try:
        read_until(process, "last.ckpt at 512 env steps")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "RUNNING"
    steps = sorted(m.step for m in mlflow.MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train/epsilon"))
    assert steps[:2] == [256, 512], "a checkpoint implies the metrics before it are stored"
    return run.info.run_id, tmp_path / "run" / "checkpoints" / LAST


def test_a_run_killed_just_after_it_started_resumes_with_every_step_logged_once(tmp_path, tracking_uri):
    process = start_cli(*KILLABLE, cwd=tmp_path, tracking_uri=tracking_uri, run_dir=tmp_path / "run")
    try:
        read_until(process, "last.ckpt at 0 env steps")  # written before the first iteration
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
    # Watched otherwise (with the progress bar) but the same experiment: not a reason to refuse the resume.
    watched = [override.replace("enable_progress_bar=false", "enable_progress_bar=true") for override in KILLABLE]
    resumed = run_cli(*watched, "resume=last", cwd=tmp_path, tracking_uri=tracking_uri, run_dir=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED"
    assert_each_step_once(tracking_uri, run.info.run_id)
    assert_model_loads(tracking_uri, run.info.run_id)


@pytest.mark.parametrize("when", ["Exporting to MLflow run", "Testing the exported policy"])
def test_sigterm_while_exporting_ends_killed_and_resume_finishes_the_export(tmp_path, tracking_uri, when):
    process = start_cli("+experiment=dqn", *TINY_RUN, cwd=tmp_path, tracking_uri=tracking_uri, run_dir=tmp_path / "run")
    try:
        read_until(process, when)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        process.kill()
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "KILLED" and "test/return_mean" not in run.data.metrics

    resumed = run_cli("+experiment=dqn", *TINY_RUN, "resume=last", cwd=tmp_path, tracking_uri=tracking_uri)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED" and run.data.metrics["final/env_steps"] == 1024
    assert_each_step_once(tracking_uri, run.info.run_id, last_step=1024)  # training was not replayed
    assert_model_loads(tracking_uri, run.info.run_id)
    (model,) = mlflow.MlflowClient(tracking_uri).search_logged_models([run.info.experiment_id])  # one policy
    assert model.source_run_id == run.info.run_id and "test/return_mean" in {m.key for m in model.metrics}
    assert {"config.yaml", "learning_curve.png", "episode.gif"} <= {
        a.path for a in mlflow.MlflowClient(tracking_uri).list_artifacts(run.info.run_id)
    }


def test_runs_and_a_sweep_started_together_on_a_fresh_store_all_finish(tmp_path, tracking_uri):
    processes = [
        start_cli("+experiment=dqn", f"seed={seed}", *TINY_RUN, cwd=tmp_path, tracking_uri=tracking_uri,
                  run_dir=tmp_path / f"run{seed}")
        for seed in range(2)
    ]
    processes.append(start_module("rl_pipeline", "-m", "+experiment=dqn", "seed=5,6", *TINY_RUN,
                                  f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, tracking_uri=tracking_uri))
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], outputs
    runs = all_runs(tracking_uri)
    assert len(runs) == 5 and {run.info.status for run in runs} == {"FINISHED"}  # 2 runs, a parent, 2 children
    for run in runs:
        if run.data.tags.get("sweep_role") != "parent":
            assert_each_step_once(tracking_uri, run.info.run_id, last_step=1024)


def test_a_run_in_training_cannot_be_resumed_by_a_second_process(tmp_path, tracking_uri, killed_run):
    run_id, checkpoint = killed_run
    lock = RunLock(checkpoint.parent).acquire()  # as the process that trains the run holds it
    try:
        refused = run_cli(*KILLABLE, f"resume={run_id}", cwd=tmp_path, tracking_uri=tracking_uri, run_dir=tmp_path / "r1")
    finally:
        lock.release()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert last_line(refused).startswith("Config error: resume: the run in") and f"(pid {os.getpid()})" in last_line(refused)
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "RUNNING"  # untouched

    resumed = run_cli(*KILLABLE, f"resume={run_id}", cwd=tmp_path, tracking_uri=tracking_uri, run_dir=tmp_path / "r2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED"
    assert_each_step_once(tracking_uri, run_id)


def overwrite_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes((b + 1) % 256 for b in data[middle:middle + 64])  # other bytes, same length
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def nan_weights(path: Path) -> None:
    """NaN weights in a checkpoint whose checksum is right: one written by something else than a good run."""
    checkpoint = read_checkpoint(path)
    checkpoint["state_dict"] = {key: torch.full_like(value, float("nan")) if value.is_floating_point() else value
                                for key, value in checkpoint["state_dict"].items()}
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)


@pytest.mark.parametrize(
    ("corrupt", "said"),
    [(overwrite_middle, "checksum does not match"), (truncate, "checksum does not match"), (nan_weights, "non-finite weights")],
    ids=["garbage-inside", "truncated", "nan-weights"],
)
def test_a_corrupt_checkpoint_is_refused_in_one_line_and_left_as_it_is(tmp_path, tracking_uri, killed_run, corrupt, said):
    run_id, checkpoint = killed_run
    corrupt(checkpoint)
    corrupted = checkpoint.read_bytes()
    result = run_cli(*KILLABLE, "resume=last", cwd=tmp_path, tracking_uri=tracking_uri, run_dir=tmp_path / "resumed")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_line(result).startswith("Config error: resume: ") and said in last_line(result)
    assert checkpoint.read_bytes() == corrupted
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "RUNNING" and run.info.run_id == run_id


def test_a_lost_server_stops_the_run_within_its_timeout_and_resume_goes_on_once_it_is_back(tmp_path):
    store, port = tmp_path / "server.db", free_port()
    budget = (*KILLABLE, "trainer.max_env_steps=8192", "logger.server_timeout_s=4")
    with mlflow_server_process(store, port) as uri:
        process = start_cli(*budget, cwd=tmp_path, tracking_uri=uri, run_dir=tmp_path / "run")
        read_until(process, "last.ckpt at 512 env steps")
    lost_at = time.monotonic()
    try:
        output = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    assert process.returncode == 4 and time.monotonic() - lost_at < 60
    assert "Traceback" not in output
    line = output.strip().splitlines()[-1]
    assert line.startswith(f"Tracking server lost: {uri} stopped answering; checkpoint ") and "resume=" in line
    run_id = line.rsplit("resume=", 1)[1]
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / LAST)["run"]["mlflow_run_id"] == run_id

    with mlflow_server_process(store, port) as uri:
        resumed = run_cli(*budget, f"resume={run_id}", cwd=tmp_path, tracking_uri=uri, run_dir=tmp_path / "resumed")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        (run,) = all_runs(uri)
        assert run.info.status == "FINISHED" and run.info.run_id == run_id
        assert_each_step_once(uri, run_id, last_step=8192)


def test_an_unwritable_run_dir_is_one_line_before_any_run(tmp_path, tracking_uri):
    (tmp_path / "a-file").write_text("")
    result = run_cli("+experiment=dqn", cwd=tmp_path, tracking_uri=tracking_uri, run_dir=tmp_path / "a-file" / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_line(result).startswith("Config error: hydra.run.dir: expected a writable folder")
    assert not all_runs(tracking_uri)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare to mount a small tmpfs")
def test_a_full_disk_is_said_in_one_line_and_the_run_ends_failed(tmp_path, tracking_uri):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    command = [sys.executable, "-m", "rl_pipeline", *KILLABLE, f"hydra.run.dir={disk / 'run'}"]
    # A 300 KB filesystem of its own holds Hydra's files but not the first checkpoint (its replay buffer).
    script = f'mount -t tmpfs -o size=300k tmpfs {disk} && exec "$@"'
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *command],
                            cwd=tmp_path, env=module_env(tracking_uri), capture_output=True, text=True, timeout=300)
    if "mount" in result.stderr and result.returncode != 5:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()[:200]}")
    assert result.returncode == 5, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert last_line(result).startswith("Disk full: ") and "No space left on device" in last_line(result)
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["error"]


def test_a_damaged_sqlite_store_is_one_line_and_left_as_it_is(tmp_path, tracking_uri):
    mlflow.MlflowClient(tracking_uri).create_experiment("rl_pipeline")  # a real store, tables and all
    store = tmp_path / "mlflow.db"
    data = bytearray(store.read_bytes())
    for page in range(4096, len(data), 8192):  # every other page after the first, zeroed
        data[page:page + 4096] = bytes(4096)
    store.write_bytes(bytes(data))
    result = run_cli("+experiment=dqn", *TINY_RUN, cwd=tmp_path, tracking_uri=tracking_uri)
    assert result.returncode == 7 and "Traceback" not in result.stderr
    assert last_line(result).startswith(f"Store damaged: {tracking_uri} cannot be read")
    assert store.read_bytes() == bytes(data)
