"""How a Hydra job ends when it cannot finish: one line and an exit code, or in a sweep a FAILED child.

A single run exits non-zero. A sweep's job must not exit (Hydra's basic launcher would stop the
whole sweep there, and joblib would kill the jobs beside it): it records its failure as a FAILED
child run and returns the worst objective there is (a sweeper such as Optuna goes on, steering
away from it), the other jobs go on, and the sweep ends non-zero once they have.
A sweep's job stopped by Ctrl-C (its run KILLED, with its checkpoint) marks the sweep interrupted
instead, and the jobs that come after it do not start.
"""

import errno
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException

from rl_pipeline.errors import ConfigError, CorruptCheckpoint, TrainingDiverged
from rl_pipeline.tracking import mlflow_runs, store

# (error class, the line's prefix, exit code)
FAILURES = (
    (ConfigError, "Config error", 2),
    (TrainingDiverged, "Training diverged", 3),
    (CorruptCheckpoint, "Corrupt checkpoint", 6),
)
SERVER_LOST_EXIT, DISK_FULL_EXIT, STORE_DAMAGED_EXIT = 4, 5, 7
INTERRUPTED = ".interrupted"  # in a sweep's folder, once Ctrl-C stopped it
# What SQLite says of a store file whose pages are damaged.
DAMAGED_STORE_SIGNS = ("database disk image is malformed", "file is not a database")
PROBE_BYTES = 64 * 1024


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(error, MlflowException) and "database or disk is full" in str(error)


def store_damage(error: BaseException) -> str | None:
    """What SQLite said, where the error is a store whose pages are damaged."""
    return next((sign for sign in DAMAGED_STORE_SIGNS if sign in str(error)), None)


def report(error: Exception) -> tuple[str, int] | None:
    """The one line and exit code for an expected failure; None for a bug, which keeps its traceback."""
    for kind, prefix, code in FAILURES:
        if isinstance(error, kind):
            return f"{prefix}: {error}", code
    if mlflow_runs.server_lost(error):
        return f"Tracking server lost: {str(error).splitlines()[0]}", SERVER_LOST_EXIT
    if is_disk_full(error):
        return f"Disk full: {error}; free space and resume the run with resume=", DISK_FULL_EXIT
    if damage := store_damage(error):
        return (f"Store damaged: {store.tracking_uri()} cannot be read (SQLite: {damage}); "
                "restore it from a backup or point MLFLOW_TRACKING_URI at another store"), STORE_DAMAGED_EXIT
    return None


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_interrupted(sweep_dir) -> bool:
    return (Path(sweep_dir) / INTERRUPTED).exists()


def mark_sweep_interrupted(sweep_dir) -> None:
    (Path(sweep_dir) / INTERRUPTED).touch()


def run(task: Callable[[DictConfig], float], cfg: DictConfig) -> float:
    """`task(cfg)`, with each way it can fail answered as the module docstring says."""
    if cpus := cpus_given():
        torch.set_num_threads(cpus)
    if in_multirun() and sweep_interrupted(HydraConfig.get().sweep.dir):
        return worst_objective()  # Ctrl-C stopped the sweep before this job started
    try:
        return task(cfg)
    except SIGTERMException:  # Lightning stops at the next batch; the MLflow run is already KILLED
        sys.exit(128 + signal.SIGTERM)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C (Lightning exits 1) or SIGTERM: the run is KILLED
        if not in_multirun():
            raise
        mark_sweep_interrupted(HydraConfig.get().sweep.dir)
        return worst_objective()
    except Exception as error:
        reported = report(error)
        if reported is None and not in_multirun():
            raise
        line, code = reported or (traceback.format_exc() + f"Job failed: {error}", 1)
        print(line, file=sys.stderr)
        if not in_multirun():
            sys.exit(code)
        if isinstance(error, ConfigError):  # stopped before its run existed
            mlflow_runs.record_failed_job(cfg, line)
        return worst_objective()


def cpus_given() -> int | None:
    """The CPUs this sweep's launcher gives each job, for its torch threads: jobs that share a machine
    would each take all its cores. Ray's num_cpus, submitit's cpus_per_task (SLURM's, or the local
    executor's, which sets none itself), or this machine's share of joblib's n_jobs; None otherwise.
    """
    if not in_multirun():
        return None
    launcher = HydraConfig.get().launcher
    cpus = OmegaConf.select(launcher, "ray.remote.num_cpus") or OmegaConf.select(launcher, "cpus_per_task")
    if cpus:
        return max(1, int(cpus))
    n_jobs = OmegaConf.select(launcher, "n_jobs")
    if not n_jobs:
        return None
    workers = n_jobs if n_jobs > 0 else os.cpu_count() + 1 + n_jobs  # joblib's -1: as many as there are CPUs
    return max(1, os.cpu_count() // max(1, workers))


def worst_objective() -> float:
    """-inf for a sweeper that maximizes (ours do: the return), +inf for one that minimizes."""
    direction = str(OmegaConf.select(HydraConfig.get(), "sweeper.direction", default="maximize"))
    return math.inf if "minimize" in direction else -math.inf


class CheckOutputDir(Callback):
    """Hydra's run or sweep folder must be writable: said in one line before Hydra tries to write there."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        check_writable("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        check_writable("hydra.sweep.dir", config.hydra.sweep.dir)


def check_writable(key: str, directory: str) -> None:
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        try:
            probe.write_bytes(bytes(PROBE_BYTES))  # more than Hydra's own files: a full disk shows here
        finally:
            probe.unlink(missing_ok=True)
    except OSError as error:
        exit_on(ConfigError(key, f"expected a writable folder, got {directory} ({error.strerror})"))


def exit_on(error: ConfigError) -> NoReturn:
    """A mistake found in the launching process, before any run exists: its one line and exit code."""
    line, code = report(error)
    print(line, file=sys.stderr)
    sys.exit(code)
