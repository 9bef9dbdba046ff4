"""Resumable checkpoints: written atomically, every N env steps, on Ctrl-C or SIGTERM and at the end.

Each one holds what continuing exactly needs: Lightning's own state (networks, optimizer, loop
counters, callbacks) plus the DQNModule's training state (replay buffer, envs, RNGs), the MLflow run
id and the config it was trained with, so that `resume=` finds the run and refuses another config.
"""

import logging
import os
import random
import re
import signal
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from mlflow.exceptions import MlflowException
from pytorch_lightning.utilities.exceptions import SIGTERMException

from rl_pipeline.validation import ConfigError, expected

log = logging.getLogger(__name__)

LAST = "last.ckpt"
CHECKPOINT_TAG = "checkpoint"  # on each MLflow run: the path of its last.ckpt
RUN_ID = re.compile(r"[0-9a-f]{32}")
# Where a job writes, not what it trains: these may differ between a run and its resume.
NOT_CONFIG = ("resume", "paths.output_dir")


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a temp file beside the checkpoint, then renames it over: a kill mid-save keeps the old one.

    (Lightning's own save stages the file in the system temp dir, and moving it from another
    filesystem is a copy, which a kill can cut short.)
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as partial:
            try:
                torch.save(checkpoint, partial)
                partial.flush()
                os.fsync(partial.fileno())
            except BaseException:
                os.unlink(partial.name)
                raise
        os.replace(partial.name, path)


class ResumableCheckpoint(pl.Callback):
    """Keeps `dirpath/last.ckpt` current: every `interval_env_steps`, on an interrupt, and when training ends.

    Not on a diverged loss: the checkpoint from before it stays, the last good state.
    Lightning's ModelCheckpoint counts optimizer steps, not env steps, hence this callback.
    """

    def __init__(self, dirpath: Path, interval_env_steps: int, mlflow_run_id: str, config: dict):
        self.path = Path(dirpath) / LAST
        self.interval_env_steps = interval_env_steps
        self.run = {"mlflow_run_id": mlflow_run_id, "config": config}
        self.saved_at_env_steps = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if pl_module.collector.env_steps - self.saved_at_env_steps >= self.interval_env_steps:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            self.save(trainer, pl_module)

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saved_at_env_steps = pl_module.collector.env_steps
        trainer.save_checkpoint(self.path, weights_only=False)
        log.info("Saved %s at %d env steps", self.path, self.saved_at_env_steps)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["run"] = self.run
        checkpoint["training_state"] = pl_module.training_state()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        pl_module.load_training_state(checkpoint["training_state"])

    def state_dict(self) -> dict:
        return {"saved_at_env_steps": self.saved_at_env_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.saved_at_env_steps = state_dict["saved_at_env_steps"]


class StopAtIterationEnd(pl.Callback):
    """Ctrl-C stops training once the current iteration is done, never halfway through an update or a write.

    A second Ctrl-C interrupts at once.
    """

    def __init__(self):
        self.requested = False
        self.previous_handler = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.previous_handler = signal.signal(signal.SIGINT, self.request)

    def request(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.info("Ctrl-C: stopping after this iteration (again to stop now)")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.previous_handler is not None:
            signal.signal(signal.SIGINT, self.previous_handler)


def find_resume_checkpoint(resume, params: dict[str, str], experiment_name: str, uri: str) -> tuple[Path, str]:
    """The checkpoint and MLflow run id that `resume=` names, checked against this job's config."""
    client = mlflow.MlflowClient(uri)
    path = checkpoint_path(str(resume), client, experiment_name)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["run"]
    except Exception:
        raise expected("resume", "a checkpoint written by rl_pipeline", str(path)) from None
    check_same_config(saved["config"], params)
    run_id = saved["mlflow_run_id"]
    try:
        status = client.get_run(run_id).info.status
    except MlflowException:
        raise ConfigError("resume", f"the checkpoint's MLflow run {run_id} is not in the store {uri}") from None
    if status == "FINISHED":
        raise ConfigError("resume", f"MLflow run {run_id} is FINISHED already; nothing to resume")
    return path, run_id


def checkpoint_path(resume: str, client: mlflow.MlflowClient, experiment_name: str) -> Path:
    """`last` (the newest run's), an MLflow run id, a run directory or a checkpoint file -> last.ckpt's path."""
    if resume == "last" or RUN_ID.fullmatch(resume):
        run = latest_run(client, experiment_name) if resume == "last" else run_or_none(client, resume)
        if run is None or CHECKPOINT_TAG not in run.data.tags:
            raise ConfigError("resume", f"found no MLflow run with a checkpoint for {resume!r} in {client.tracking_uri}")
        path = Path(run.data.tags[CHECKPOINT_TAG])
    else:
        path = Path(resume)
        if path.is_dir():
            path = path / "checkpoints" / LAST
    if not path.is_file():
        what = "a run directory (holding checkpoints/last.ckpt), a .ckpt file, an MLflow run id or last"
        raise expected("resume", what, resume)
    return path


def run_or_none(client: mlflow.MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def latest_run(client: mlflow.MlflowClient, experiment_name: str):
    """The experiment's most recently started run that keeps a checkpoint (sweep parents don't)."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    return next((run for run in runs if CHECKPOINT_TAG in run.data.tags), None)


def check_same_config(saved: dict[str, str], current: dict[str, str]) -> None:
    for key in sorted((saved.keys() | current.keys()) - set(NOT_CONFIG)):
        if saved.get(key) != current.get(key):
            raise ConfigError(
                "resume",
                f"the checkpoint was trained with {key}={saved.get(key)}, this job sets {current.get(key)}; "
                "resume with the run's own config",
            )
