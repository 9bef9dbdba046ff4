"""MLflow: where the store is, one run per Hydra job, its params, tags, status and artifacts."""

import json
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import mlflow
import numpy as np
import pytorch_lightning.loggers
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

import rl_pipeline
from rl_pipeline.plots import Curve, plot_curves
from rl_pipeline.validation import ConfigError

DEFAULT_STORE = Path("outputs") / "mlflow.db"
SWEEP_ENV = "RL_PIPELINE_SWEEP"  # set by the sweep callback for the jobs it launches


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set; else an embedded SQLite store in ./outputs (no server needed)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE.resolve()}"


def check_reachable(uri: str, timeout_s: float = 3.0) -> None:
    """Fail fast on a tracking server that does not answer (MLflow's own retries take minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s)
    except OSError as error:
        raise ConfigError("MLFLOW_TRACKING_URI", f"expected a reachable MLflow server, got {uri} ({error})") from None


def artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go in a folder beside the database file; servers decide their own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{"optimizer": {"lr": 1e-3}} -> {"optimizer.lr": 1e-3}: the keys a user types as overrides."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def params(cfg: DictConfig) -> dict[str, str]:
    """The run's params: the resolved config under dotted keys, as MLflow stores them (strings)."""
    return {key: str(value) for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items()}


def task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def run_name(overrides: list[str]) -> str:
    """`+experiment=dqn seed=1` -> `experiment=dqn,seed=1`; the last key part keeps names short."""
    parts = [(override_key(o), o.split("=", 1)[1]) for o in overrides if "=" in o]
    return ",".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in parts) or "defaults"


def current_sweep() -> dict | None:
    """{"parent_run_id", "swept_keys"} when this job is one of a Hydra multirun (see sweeps.py)."""
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return None
    sweep = os.environ.get(SWEEP_ENV)
    return json.loads(sweep) if sweep else None


def experiment_id(name: str, uri: str) -> str:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


def start_run(cfg: DictConfig, uri: str) -> mlflow.ActiveRun:
    """A new run in the configured experiment, holding the resolved config as params and config.yaml."""
    overrides = task_overrides()
    tags = {"overrides": " ".join(overrides)}
    sweep = current_sweep()
    if sweep:  # a child of the sweep's parent run, named by what the sweep varies
        tags |= {"mlflow.parentRunId": sweep["parent_run_id"], "sweep_id": sweep["parent_run_id"]}
        overrides = [o for o in overrides if override_key(o) in sweep["swept_keys"]]
    run = mlflow.start_run(
        experiment_id=experiment_id(cfg.logger.experiment_name, uri),
        run_name=cfg.logger.run_name or run_name(overrides),
        tags=tags,
    )
    try:
        mlflow.log_params(params(cfg))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    return run


@contextmanager
def mlflow_run(cfg: DictConfig, resume_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An active MLflow run, new or resumed (RUNNING again, its params untouched); FINISHED, FAILED or KILLED when left."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    run = mlflow.start_run(run_id=resume_run_id) if resume_run_id else start_run(cfg, uri)
    status = RunStatus.FAILED
    try:
        yield run
        status = RunStatus.FINISHED
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into exit(1)
        status = RunStatus.KILLED
        raise
    finally:
        mlflow.end_run(RunStatus.to_string(status))


class MLFlowLogger(pytorch_lightning.loggers.MLFlowLogger):
    """Lightning's MLflow logger, never logging a metric at a step its run already holds.

    A resumed run replays the iterations between its last checkpoint and the kill: the run logged
    those already, and the replay must not log them twice.
    """

    @cached_property
    def logged_until(self) -> dict[str, float]:
        """Each metric's last logged step, when the run was opened."""
        client, run_id = self.experiment, self.run_id
        metrics = client.get_run(run_id).data.metrics
        return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in metrics}

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if step is not None:
            metrics = {key: value for key, value in metrics.items() if step > self.logged_until.get(key, -1)}
        if metrics:
            super().log_metrics(metrics, step)


def log_policy(policy: nn.Module) -> None:
    """The greedy policy's Q-function, loadable by `mlflow.pytorch.load_model("runs:/<id>/model")`.

    Pickled rather than MLflow 3's default 'pt2' export, which fixes the batch size to the example's.
    The package's code travels with the model, and its requirements are stated rather than inferred
    (inference runs a subprocess that costs seconds).
    """
    mlflow.pytorch.log_model(
        policy,
        name="model",
        serialization_format="pickle",
        code_paths=[str(Path(rl_pipeline.__file__).parent)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )


def metric_curve(client: mlflow.MlflowClient, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(env steps, values) of one metric of one run."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return np.array([m.step for m in history]), np.array([m.value for m in history])


def log_learning_curve(run_id: str, directory: Path) -> None:
    """learning_curve.png: training episode returns, and the greedy evaluations with their ±1 std band."""
    client = mlflow.MlflowClient()
    train_steps, train_returns = metric_curve(client, run_id, "train/episode_return")
    eval_steps, eval_mean = metric_curve(client, run_id, "eval/return_mean")
    _, eval_std = metric_curve(client, run_id, "eval/return_std")
    curves = [
        Curve("training episodes (ε-greedy)", train_steps, train_returns),
        Curve("greedy evaluation, mean ± std", eval_steps, eval_mean, eval_mean - eval_std, eval_mean + eval_std),
    ]
    title = client.get_run(run_id).info.run_name
    mlflow.log_artifact(str(plot_curves(curves, directory / "learning_curve.png", title, ylabel="return")))
