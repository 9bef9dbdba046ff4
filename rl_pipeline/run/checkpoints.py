"""Resumable checkpoints: written atomically, every N env steps, on Ctrl-C or SIGTERM and at the end.

Each one holds what continuing exactly needs: Lightning's own state (networks, optimizer, loop
counters, callbacks) plus what the module keeps in its own `on_save_checkpoint` (replay buffer, envs,
RNGs), the MLflow run id and the config it was trained with, so that `resume=` finds the run and
refuses another config.
Every file ends in a SHA-256 of what precedes it, checked before it is loaded.
"""

import hashlib
import logging
import os
import re
import signal
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from mlflow.exceptions import MlflowException
from pytorch_lightning.utilities.exceptions import SIGTERMException

from rl_pipeline.errors import ConfigError, CorruptCheckpoint
from rl_pipeline.tracking import mlflow_runs
from rl_pipeline.validation import expected

log = logging.getLogger(__name__)

LAST = "last.ckpt"
CHECKSUM = b"rl_pipeline sha256:"  # the trailer's prefix; the 32-byte digest follows
TRAILER_BYTES = len(CHECKSUM) + 32
CHECKPOINT_TAG = "checkpoint"  # on each MLflow run: the path of its last.ckpt
RUN_ID = re.compile(r"[0-9a-f]{32}")
LIBRARY_DIRS = tuple({sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")})


class HashingWriter:
    """A file that hashes what is written through it, so the checksum costs no second copy in memory.

    It keeps the OSError of a failed write (a full disk), which torch.save reports as a vaguer RuntimeError.
    """

    def __init__(self, file):
        self.file, self.digest = file, hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data) -> int:
        self.digest.update(data)
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def verify_checksum(path: Path) -> None:
    """Raises CorruptCheckpoint unless the file ends in the SHA-256 of the rest of it."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        remaining = max(size - TRAILER_BYTES, 0)
        while remaining:
            chunk = file.read(min(remaining, 1 << 20))
            digest.update(chunk)
            remaining -= len(chunk)
        trailer = file.read()
    if trailer != CHECKSUM + digest.digest():
        raise CorruptCheckpoint(f"{path} is corrupt: its checksum does not match its contents")


def read_checkpoint(path, weights_only: bool = False) -> dict:
    """A checkpoint's contents, once its checksum holds."""
    verify_checksum(Path(path))
    return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a temp file beside the checkpoint, then renames it over: a kill mid-save keeps the old one.

    (Lightning's own save stages the file in the system temp dir, and moving it from another
    filesystem is a copy, which a kill can cut short.) The file ends in its checksum, which `resume=`
    checks before Lightning loads the file (the run lock keeps other writers out until then).
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
        writer = HashingWriter(partial)
        try:
            with partial:
                torch.save(checkpoint, writer)
                partial.write(CHECKSUM + writer.digest.digest())
                partial.flush()
                os.fsync(partial.fileno())
        except BaseException:
            os.unlink(partial.name)
            if writer.error is not None:
                raise writer.error from None
            raise
        os.replace(partial.name, path)


class ResumableCheckpoint(pl.Callback):
    """Keeps `dirpath/last.ckpt` current: at the start, every `interval_env_steps`, on an interrupt, and at the end.

    Each checkpoint implies the metrics before it are stored: the run's logger, which holds them
    back, writes them first (and at each evaluation, so that the UI's curves keep up).

    Not on a diverged loss: the checkpoint from before it stays, the last good state.
    Nor on a lost tracking server: a resume from the one before replays the iterations it did not log.
    Lightning's ModelCheckpoint counts optimizer steps, not env steps, hence this callback: it works
    with any LightningModule that counts `env_steps` and keeps in its own `on_save_checkpoint` what
    continuing needs. Beside that, each file names its MLflow run and the config it was trained with.
    """

    def __init__(self, dirpath: Path, interval_env_steps: int):
        self.path = Path(dirpath) / LAST
        self.interval_env_steps = interval_env_steps
        self.run_config: dict[str, str] = {}  # the resolved config, which resume= compares with its own
        self.mlflow_run_id: str | None = None  # set once the run exists, before training
        self.training_done = False  # the checkpoint written when training ended: a resume from it only exports
        self.saved_at_env_steps = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        # The first one before the first iteration: a run killed at any moment after it can be resumed.
        due = pl_module.env_steps - self.saved_at_env_steps >= self.interval_env_steps
        if due or not self.path.exists():
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.training_done = True
        self.save(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            self.save(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        store_metrics(trainer)

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        store_metrics(trainer)
        self.saved_at_env_steps = pl_module.env_steps
        trainer.save_checkpoint(self.path, weights_only=False)
        log.info("Saved %s at %d env steps", self.path, self.saved_at_env_steps)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["run"] = {
            "mlflow_run_id": self.mlflow_run_id, "config": self.run_config, "training_done": self.training_done
        }

    def state_dict(self) -> dict:
        return {"saved_at_env_steps": self.saved_at_env_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.saved_at_env_steps = state_dict["saved_at_env_steps"]


def store_metrics(trainer: pl.Trainer) -> None:
    """Writes the metrics that the run's logger holds back (Lightning's other loggers hold none)."""
    if isinstance(trainer.logger, mlflow_runs.MLFlowLogger):
        trainer.logger.flush()


@dataclass
class Resume:
    path: Path  # the run's last.ckpt
    run_id: str  # its MLflow run
    training_done: bool  # only the export is left to do


def in_library(frame) -> bool:
    """Whether the main thread was interrupted in the standard library, an installed package or the import machinery."""
    filename = frame.f_code.co_filename if frame is not None else "<unknown>"
    return filename.startswith(("<", *LIBRARY_DIRS))


class SigtermExits:
    """From entering until leaving, SIGTERM exits (SystemExit 143, so the MLflow run ends KILLED).

    Inside `lightning_fit()` Lightning's own handler takes over: it stops at the next batch boundary,
    after a checkpoint. A SIGTERM that reached fit after its last batch boundary exits once fit returns.
    Elsewhere a SIGTERM that finds the main thread in the standard library or an installed package
    exits at the next line outside them, once that call returns: raised inside one, SystemExit can
    leave an import lock held (MLflow's system-metrics thread then waits on it forever) or an SQLite
    write open (ending the run KILLED then finds the store locked).
    """

    EXIT_CODE = 128 + signal.SIGTERM

    def __init__(self):
        self.fitting, self.received = False, False

    def __enter__(self) -> "SigtermExits":
        self.previous_handler = signal.signal(signal.SIGTERM, self.handle)
        return self

    def __exit__(self, *exc_info) -> None:
        sys.settrace(None)
        signal.signal(signal.SIGTERM, self.previous_handler)

    def handle(self, signum, frame) -> None:
        self.received = True
        if self.fitting:
            return
        if not in_library(frame):
            raise SystemExit(self.EXIT_CODE)
        self.exit_outside_libraries(frame)

    def exit_outside_libraries(self, frame) -> None:
        """Trace the main thread: the first line it runs outside the libraries raises SystemExit."""
        def trace(frame, event, arg):
            if in_library(frame) or frame.f_code is SigtermExits.__exit__.__code__:  # that one restores the handler
                return None
            sys.settrace(None)
            raise SystemExit(self.EXIT_CODE)

        while frame is not None:  # the callers waiting for the library to return
            if not in_library(frame):
                frame.f_trace = trace
            frame = frame.f_back
        sys.settrace(trace)  # frames' own f_trace only runs while a trace function is set

    @contextmanager
    def lightning_fit(self) -> Iterator[None]:
        self.fitting = True
        try:
            yield
        finally:
            self.fitting = False
        if self.received:
            raise SystemExit(self.EXIT_CODE)


def find_resume_checkpoint(resume, params: dict[str, str], experiment_name: str, uri: str) -> Resume:
    """The checkpoint and MLflow run that `resume=` names, checked against this job's config."""
    client = mlflow_runs.client(uri)
    path = checkpoint_path(str(resume), client, experiment_name)
    try:
        checkpoint = read_checkpoint(path)
        saved, weights = checkpoint["run"], checkpoint["state_dict"]
    except CorruptCheckpoint as error:
        raise ConfigError("resume", f"{error}; nothing was resumed") from None
    except Exception:
        raise expected("resume", "a checkpoint written by rl_pipeline", str(path)) from None
    if not all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point()):
        raise ConfigError("resume", f"{path} holds non-finite weights; nothing was resumed")
    check_same_config(saved["config"], params)
    run_id = saved["mlflow_run_id"]
    try:
        status = client.get_run(run_id).info.status
    except MlflowException:
        raise ConfigError("resume", f"the checkpoint's MLflow run {run_id} is not in the store {uri}") from None
    if status == "FINISHED":
        raise ConfigError("resume", f"MLflow run {run_id} is FINISHED already; nothing to resume")
    return Resume(path, run_id, saved.get("training_done", False))


def checkpoint_path(resume: str, client: mlflow.MlflowClient, experiment_name: str) -> Path:
    """`last` (the newest run's), an MLflow run id, a run directory or a checkpoint file -> last.ckpt's path."""
    if resume == "last" or RUN_ID.fullmatch(resume):
        run = latest_run(client, experiment_name) if resume == "last" else mlflow_runs.run_or_none(client, resume)
        if run is None or CHECKPOINT_TAG not in run.data.tags:
            raise ConfigError("resume", f"found no MLflow run with a checkpoint for {resume!r} in {client.tracking_uri}")
        path = Path(run.data.tags[CHECKPOINT_TAG])
        if not path.is_file():
            raise ConfigError("resume", f"the checkpoint of MLflow run {run.info.run_id} is missing: no file at {path} "
                              "(deleted, or the run stopped before writing it); nothing was resumed")
    else:
        path = Path(resume)
        if path.is_dir():
            path = path / "checkpoints" / LAST
    if not path.is_file():
        what = "a run directory (holding checkpoints/last.ckpt), a .ckpt file, an MLflow run id or last"
        raise expected("resume", what, resume)
    return path


def latest_run(client: mlflow.MlflowClient, experiment_name: str):
    """The experiment's most recently started run that has a checkpoint (sweep parents don't)."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    runs = mlflow_runs.search_runs(client, [experiment.experiment_id], order_by=["attributes.start_time DESC"])
    return next((run for run in runs if Path(run.data.tags.get(CHECKPOINT_TAG, "")).is_file()), None)


def check_same_config(saved: dict[str, str], current: dict[str, str]) -> None:
    for key in sorted(key for key in saved.keys() | current.keys() if not key.startswith(mlflow_runs.NOT_SETTINGS)):
        if saved.get(key) != current.get(key):
            raise ConfigError(
                "resume",
                f"the checkpoint was trained with {key}={saved.get(key)}, this job sets {current.get(key)}; "
                "resume with the run's own config",
            )
