"""MLflow: where the store is, one run per Hydra job, its params, tags, status and artifacts."""

import fcntl
import json
import os
import secrets
import shlex
import signal
import sys
import threading
import time
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
from mlflow.entities import LoggedModelStatus, Metric, Run, RunStatus
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

import rl_pipeline
from rl_pipeline.errors import TrackingLost
from rl_pipeline.tracking.plots import Curve, plot_curves
from rl_pipeline.tracking.store import sqlite_path, tracking_uri

SWEEP_ENV = "RL_PIPELINE_SWEEP"  # set by the sweep callback for the jobs it launches
TRIAL_ENV = "RL_PIPELINE_TRIAL"  # set by the Optuna sweeper for each trial's job: {"study", "trial_id", "number"}
ERROR_TAG = "error"  # on a FAILED run: the one line that said why
# What the experiment's view draws one curve (and band) for: a sweep's name for its runs, a run's own name otherwise.
GROUP_TAG = "group"
SYSTEM_METRICS_INTERVAL_S = 5
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch
# How a run is watched, checkpointed and where it writes, not what it trains: no params (config.yaml
# has them), and free to differ between a run and its resume.
NOT_SETTINGS = (
    "paths.", "logger.", "callbacks.", "resume", "trainer.lightning.enable_progress_bar", "trainer.lightning.enable_model_summary",
)


# What MLflow's HTTP client says once its retries are spent on a server that is gone or silent.
LOST_SERVER_SIGNS = ("Max retries exceeded", "Connection refused", "Read timed out", "Failed to establish")


def server_lost(error: BaseException) -> bool:
    return isinstance(error, TrackingLost) or (
        isinstance(error, MlflowException) and any(sign in str(error) for sign in LOST_SERVER_SIGNS)
    )


def bound_server_wait(seconds: float) -> None:
    """A lost tracking server fails a request within about `seconds` (MLflow's own retries take minutes).

    Four tries of at most seconds/8 each, 0, 2f and 4f seconds apart (f = seconds/12, MLflow takes
    whole seconds); an MLFLOW_HTTP_REQUEST_* variable the user set wins.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(seconds / 8))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(max(1, round(seconds / 12))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")


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


def resolved_config(cfg: DictConfig) -> dict[str, str]:
    """The whole resolved config under dotted keys, as strings: what a checkpoint was trained with."""
    return {key: str(value) for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items()}


def params(cfg: DictConfig) -> dict[str, str]:
    """The run's params: the settings a user sets or sweeps, under the keys one types as overrides.

    The config groups' options (`env=cartpole`, `experiment=dqn`) and every value set in the config,
    but no `_target_`/`_partial_`, no copy of another key (`collector.seed: ${seed}`), and nothing of
    how the run is watched or where it writes (`config.yaml` holds the whole resolved config).
    """
    written = flatten(OmegaConf.to_container(cfg, resolve=False))
    resolved = resolved_config(cfg)
    settings = {key: resolved[key] for key, value in written.items() if is_setting(key, value)}
    return {**group_options(), **settings}


def is_setting(key: str, value) -> bool:
    copied = isinstance(value, str) and "${" in value
    empty = value == {}  # an empty group, e.g. transforms=none: its option says it
    return not (copied or empty or key.rsplit(".", 1)[-1].startswith("_") or key.startswith(NOT_SETTINGS))


def group_options() -> dict[str, str]:
    """The option chosen in each of the project's config groups, e.g. {"network": "mlp"}; Hydra's own left out."""
    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {
        group: str(option)
        for group, option in choices.items()
        if "/" not in group and option is not None and not f"{group}.".startswith(NOT_SETTINGS)
    }


def task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def resume_command(overrides: list[str], run_id: str) -> str:
    """The command that goes on with a run (or a sweep), given the overrides it was started with."""
    kept = [shlex.quote(override) for override in overrides if override_key(override) != "resume"]
    return " ".join(["python -m rl_pipeline", *kept, f"resume={run_id}"])


def quoted_override(key: str, value: str) -> str:
    """`key='value'`, quoted for Hydra's override parser whatever the value holds."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"{key}='{escaped}'"


def run_name(cfg: DictConfig, overrides: list[str]) -> str:
    """`CartPole-v1 experiment=dqn seed=1 3f9a0c`: the env, the overrides (seed last) and 6 random hex digits.

    Repeats of one command differ in their last part; a sweep's jobs in what the sweep varies.
    """
    settings = [override.lstrip("+~") for override in overrides if override_key(override) not in ("seed", "env.id")]
    return " ".join([str(cfg.env.id), *settings, f"seed={cfg.seed}", secrets.token_hex(3)])


def current_sweep() -> dict | None:
    """{"parent_run_id", "swept_keys", "group"} when this job is one of a Hydra multirun (see sweeps.py)."""
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return None
    sweep = os.environ.get(SWEEP_ENV)
    return json.loads(sweep) if sweep else None


def current_trial() -> dict | None:
    """{"study", "trial_id", "number"} when this job is a trial of an Optuna sweep (see run/search.py)."""
    trial = os.environ.get(TRIAL_ENV) if current_sweep() else None
    return json.loads(trial) if trial else None


@contextmanager
def signals_held(signals=(signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """SIGTERM and Ctrl-C that arrive inside the block take effect when it ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in received:
            signal.raise_signal(signum)


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """For an SQLite store, an exclusive lock on a file beside it, with SIGTERM and Ctrl-C held back.

    Processes that open one fresh SQLite store at once race in MLflow's schema migration and in
    creating the experiment; under this lock they take turns, and a signal cannot leave the store
    half migrated. A no-op for other stores.
    """
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    with signals_held(), open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def client(uri: str) -> mlflow.MlflowClient:
    """A client of the store; making one creates a fresh store's tables, so that happens under its lock."""
    with store_lock(uri):
        return mlflow.MlflowClient(uri)


def search_runs(client: mlflow.MlflowClient, experiment_ids: list[str], filter_string: str = "",
                order_by: list[str] | None = None) -> Iterator[Run]:
    """Every run the query matches, page after page: MLflow answers at most 1,000 runs a page."""
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, order_by=order_by, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def run_or_none(client: mlflow.MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def experiment_id(name: str, uri: str) -> str:
    """The experiment's id, creating it under the store's lock (two creators would race)."""
    with store_lock(uri):
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return client.create_experiment(name, artifact_location=artifact_location(uri))


def new_run_name_and_tags(cfg: DictConfig) -> tuple[str, dict[str, str]]:
    """A job's run name and tags; in a sweep, a child of the sweep's parent, named by what the sweep varies."""
    overrides = [override for override in task_overrides() if override_key(override) != "resume"]
    tags = {"overrides": " ".join(overrides), "torch_threads": str(torch.get_num_threads())}
    sweep = current_sweep()
    if sweep:
        tags |= {"mlflow.parentRunId": sweep["parent_run_id"], "sweep_id": sweep["parent_run_id"]}
        overrides = [o for o in overrides if override_key(o) in sweep["swept_keys"]]
    if trial := current_trial():
        tags |= {"optuna.trial_number": str(trial["number"]), "optuna.trial_state": "RUNNING"}
    name = cfg.logger.run_name or run_name(cfg, overrides)
    return name, {**tags, GROUP_TAG: sweep["group"] if sweep else name}


def record_failed_job(cfg: DictConfig, error: str) -> None:
    """A sweep's job that failed before its run existed, recorded as a FAILED run holding the reason."""
    uri = tracking_uri()
    try:
        name, tags = new_run_name_and_tags(cfg)
        store = client(uri)
        run = store.create_run(experiment_id(cfg.logger.experiment_name, uri), run_name=name, tags=tags)
        store.set_tag(run.info.run_id, ERROR_TAG, error[:5000])
        store.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
    except Exception as store_error:  # the store itself may be what the job got wrong
        print(f"(not recorded in the MLflow store {uri}: {str(store_error).splitlines()[0]})", file=sys.stderr)


@contextmanager
def mlflow_run(cfg: DictConfig, resume_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An active MLflow run, new or resumed (RUNNING again, its params untouched).

    The one owner of the run's status: FINISHED when the block completes, that is once everything
    the run promises is stored; KILLED on Ctrl-C, SIGTERM, exit or a lost server (if it answers
    again in time; else the run stays RUNNING); FAILED on an error, with its line as the tag `error`.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    # CPU, memory, disk and network as system/* metrics, unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false.
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", str(SYSTEM_METRICS_INTERVAL_S))
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id)
    else:
        name, tags = new_run_name_and_tags(cfg)
        run = mlflow.start_run(experiment_id=experiment_id(cfg.logger.experiment_name, uri), run_name=name, tags=tags)
    try:
        if not resume_run_id:
            mlflow.log_params(params(cfg))
            mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        yield run
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into exit(1); SIGTERM exits
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except Exception as error:
        if server_lost(error):
            try:  # one more bounded try: the server may be back
                mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            except MlflowException:
                pass
            raise
        try:
            mlflow.set_tag(ERROR_TAG, f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"[:5000])
        finally:
            mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


@contextmanager
def resumable_on_server_loss(uri: str, checkpoint: Path, run_id: str) -> Iterator[None]:
    """A server lost inside the block is a TrackingLost that says how to go on once it is back."""
    try:
        yield
    except Exception as error:
        if not server_lost(error):
            raise
        raise TrackingLost(
            f"{uri} stopped answering; checkpoint {checkpoint} kept: once it answers, go on with resume={run_id}"
        ) from None


class MLFlowLogger(pytorch_lightning.loggers.MLFlowLogger):
    """Lightning's MLflow logger, writing metrics in batches and never at a step its run already holds.

    Metrics wait in memory until `flush()`, which the last-checkpoint callback calls at each
    evaluation and before each checkpoint (a checkpoint implies its metrics are stored), and
    Lightning's end of training (`finalize`): one synchronous write per iteration cost about 8 ms
    on SQLite and 50-70 ms through a server. A kill loses only the steps after the last
    checkpoint, which a resume replays: the run may hold some of them already (up to the last
    evaluation), and the replay must not log them twice. It leaves the run's status to
    `mlflow_run` (Lightning's would mark it FINISHED before the policy is exported). A tracking
    server that stays silent for `server_timeout_s` fails its call (see `bound_server_wait`).
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        experiment_name: str = "rl_pipeline",
        run_name: str | None = None,
        server_timeout_s: float = 20.0,
    ):
        bound_server_wait(server_timeout_s)
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri, run_id=run_id)
        self.pending: list[Metric] = []

    @cached_property
    def logged_until(self) -> dict[str, float]:
        """Each metric's last logged step, when the run was opened."""
        client, run_id = self.experiment, self.run_id
        metrics = client.get_run(run_id).data.metrics
        return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in metrics}

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        step = step or 0
        now_ms = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), now_ms, step) for key, value in metrics.items()
                         if step > self.logged_until.get(key, -1)]

    @rank_zero_only
    def flush(self) -> None:
        """Writes the metrics held back, in batches of MLflow's most per request."""
        while self.pending:
            self.experiment.log_batch(self.run_id, metrics=self.pending[:MAX_METRICS_PER_BATCH])
            del self.pending[:MAX_METRICS_PER_BATCH]

    def finalize(self, status: str = "success") -> None:
        """What is held back is written; the status is `mlflow_run`'s to set, once the export is done."""
        self.flush()


def log_policy(policy: nn.Module, step: int) -> str:
    """The greedy policy's Q-function, loadable by `mlflow.pytorch.load_model("runs:/<id>/model")`; its model id.

    A run holds one policy: a resumed export keeps the model that the interrupted one finished
    logging (the same best checkpoint's) and replaces one it left unfinished.
    Pickled rather than MLflow 3's default 'pt2' export, which fixes the batch size to the example's.
    The package's code travels with the model, and its requirements are stated rather than inferred
    (inference runs a subprocess that costs seconds).
    """
    run = mlflow.active_run().info
    client = mlflow.MlflowClient()
    logged = client.search_logged_models([run.experiment_id], filter_string=f"source_run_id = '{run.run_id}'")
    finished = next((model for model in logged if model.status == LoggedModelStatus.READY), None)
    for model in logged:
        if model is not finished:
            client.delete_logged_model(model.model_id)
    if finished is not None:
        return finished.model_id
    return mlflow.pytorch.log_model(
        policy,
        name="model",
        step=step,
        serialization_format="pickle",
        code_paths=[str(Path(rl_pipeline.__file__).parent)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    ).model_id


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
        Curve("training episodes (exploring)", train_steps, train_returns),
        Curve("greedy evaluation, mean ± std", eval_steps, eval_mean, eval_mean - eval_std, eval_mean + eval_std),
    ]
    title = client.get_run(run_id).info.run_name
    mlflow.log_artifact(str(plot_curves(curves, directory / "learning_curve.png", title, ylabel="return")))
