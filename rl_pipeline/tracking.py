"""MLflow: where the store is, one run per Hydra job, its params, tags, status and artifacts."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import torch
from hydra.core.hydra_config import HydraConfig
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf
from torch import nn

import rl_pipeline

DEFAULT_STORE = Path("outputs") / "mlflow.db"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set; else an embedded SQLite store in ./outputs (no server needed)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE.resolve()}"


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


def task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run_name(overrides: list[str]) -> str:
    """`+experiment=dqn seed=1` -> `experiment=dqn,seed=1`; the last key part keeps names short."""
    parts = [o.lstrip("+~").split("=", 1) for o in overrides if "=" in o]
    return ",".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in parts) or "defaults"


def _experiment_id(name: str, uri: str) -> str:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


@contextmanager
def mlflow_run(cfg: DictConfig) -> Iterator[mlflow.ActiveRun]:
    """An active MLflow run holding the resolved config; FINISHED, FAILED or KILLED when left."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    overrides = task_overrides()
    run = mlflow.start_run(
        experiment_id=_experiment_id(cfg.logger.experiment_name, uri),
        run_name=cfg.logger.run_name or run_name(overrides),
        tags={"overrides": " ".join(overrides)},
    )
    status = RunStatus.FAILED
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        mlflow.log_params({key: str(value) for key, value in flatten(resolved).items()})
        mlflow.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        yield run
        status = RunStatus.FINISHED
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into exit(1)
        status = RunStatus.KILLED
        raise
    finally:
        mlflow.end_run(RunStatus.to_string(status))


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
