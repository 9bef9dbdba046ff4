"""Compose one run: its parts from the config, Lightning's Trainer and callbacks, the MLflow run around them."""

import inspect
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import mlflow
import pytorch_lightning as pl
from mlflow.entities import Run
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader

from rl_pipeline.agents.base import OffPolicyAgent
from rl_pipeline.errors import TrainingDiverged
from rl_pipeline.run.build import build_agent, solved_return
from rl_pipeline.run.callbacks import StopWhenSolved
from rl_pipeline.run.checkpoints import (
    CHECKPOINT_TAG,
    AtomicCheckpointIO,
    ResumableCheckpoint,
    SigtermExits,
    find_resume_checkpoint,
)
from rl_pipeline.run.config import build, check_plain_types, check_settings, target_of
from rl_pipeline.run.export import export, export_pruned, restore_trained, summary
from rl_pipeline.run.jobs import in_multirun
from rl_pipeline.run.locks import RunLock
from rl_pipeline.run.trial import tag_outcome, trial_pruning
from rl_pipeline.tracking import comparison, mlflow_runs, store
from rl_pipeline.validation import expected

log = logging.getLogger(__name__)

# pl.Trainer arguments that follow from the env-step budget, the eval interval and the run: not for
# trainer.lightning. The pipeline passes each of them, most at Lightning's own default, so that
# build() refuses them in trainer.lightning.
FIXED_TRAINER_ARGS = {
    "max_epochs": 1, "num_sanity_val_steps": 0, "max_steps": -1, "max_time": None, "min_epochs": None,
    "min_steps": None, "limit_train_batches": None, "limit_val_batches": None, "check_val_every_n_epoch": 1,
    "fast_dev_run": False, "overfit_batches": 0.0, "num_nodes": 1, "strategy": "auto",
}


def build_callbacks(cfg: DictConfig, checkpoint_dir: Path) -> dict[str, pl.Callback]:
    """cfg.callbacks by name, in order, each given what follows from this run (lightning-hydra-template's shape)."""
    from_the_run = {
        ModelCheckpoint: {"dirpath": checkpoint_dir},
        ResumableCheckpoint: {"dirpath": checkpoint_dir},
        StopWhenSolved: {"solved_return": solved_return(cfg) if cfg.trainer.stop_when_solved else None},
    }
    callbacks = {}
    for name, node in cfg.callbacks.items():
        if node is None:  # switched off: callbacks.NAME=null
            continue
        key = f"callbacks.{name}"
        target = target_of(node, key)
        if not inspect.isclass(target):
            raise expected(f"{key}._target_", "a Lightning callback class", node._target_)
        if issubclass(target, ProgressBar) and not cfg.trainer.lightning.get("enable_progress_bar", True):
            continue  # Lightning refuses a progress bar callback with the bar switched off
        kwargs = next((kwargs for kind, kwargs in from_the_run.items() if issubclass(target, kind)), {})
        callbacks[name] = build(node, key, **kwargs)
    return callbacks


def relied_on(callbacks: dict[str, pl.Callback], name: str, kind: type) -> pl.Callback:
    """The callback that the run relies on as `name`: it must be there, and be a `kind`."""
    callback = callbacks.get(name)
    if not isinstance(callback, kind):
        got = type(callback).__name__ if callback is not None else None
        raise expected(f"callbacks.{name}", f"a {kind.__name__}, which the run relies on", got)
    return callback


def build_trainer(cfg: DictConfig, agent: OffPolicyAgent, callbacks: list[pl.Callback]) -> pl.Trainer:
    """Lightning's Trainer, built before the MLflow run exists so that a bad argument opens no run."""
    schedule = agent.schedule
    check_plain_types(cfg.trainer.lightning, "trainer.lightning")
    return build(
        cfg.trainer.lightning,
        "trainer.lightning",
        logger=False,  # the MLflow logger joins once its run exists
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=cfg.paths.output_dir,
        val_check_interval=min(schedule.iterations, schedule.iterations_per_eval),
        **FIXED_TRAINER_ARGS,
    )


def fit(trainer: pl.Trainer, agent: OffPolicyAgent, resume_path: Path | None, last: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*", PossibleUserWarning)
        # The dataloader only counts iterations; the checkpoint holds the data (buffer, envs).
        warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*", PossibleUserWarning)
        warnings.filterwarnings("ignore", ".*exists and is not empty.*")  # it holds the run's lock
        try:
            trainer.fit(
                agent,
                train_dataloaders=DataLoader(range(agent.schedule.iterations), batch_size=None),
                val_dataloaders=DataLoader(range(1), batch_size=None),
                ckpt_path=resume_path,
                weights_only=False,  # our own checkpoints: they hold the buffer and the envs' state
            )
        except TrainingDiverged as error:
            kept = last if last.exists() else "none (diverged before the first)"
            raise TrainingDiverged(f"{error}; last good checkpoint: {kept}") from None


def train(cfg: DictConfig) -> float:
    """Train one agent, or resume one; return its test score's mean return (NaN for a pruned trial).

    Every check comes before the MLflow run exists; inside it, SIGTERM ends the run KILLED and
    resumable, and the run is FINISHED only once its policy, checkpoints and plots are stored.
    """
    started = time.perf_counter()
    check_settings(cfg)
    uri = store.tracking_uri()
    store.check_store(uri)
    mlflow_runs.bound_server_wait(cfg.logger.server_timeout_s)
    target, finished = resume_target(cfg, uri)
    if finished is not None:  # a resumed sweep's job that finished before the sweep stopped: not run again
        print(f"MLflow run {finished.info.run_id} finished this job before the sweep stopped; not run again")
        return finished.data.metrics.get("test/return_mean", math.nan)
    resume = None
    if target is not None:
        resume = find_resume_checkpoint(target, mlflow_runs.resolved_config(cfg), cfg.logger.experiment_name, uri)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    agent = build_agent(cfg)
    # A resumed run keeps writing where it started, so Lightning restores its callbacks' state.
    checkpoint_dir = resume.path.parent if resume else Path(cfg.paths.output_dir) / "checkpoints"
    callbacks = build_callbacks(cfg, checkpoint_dir)
    best = relied_on(callbacks, "best_checkpoint", ModelCheckpoint)  # its best is the policy exported
    last = relied_on(callbacks, "last_checkpoint", ResumableCheckpoint)  # what resume= continues from
    last.run_config = mlflow_runs.resolved_config(cfg)
    pruning = trial_pruning()  # None unless this job is a trial of an Optuna search
    if pruning is not None:
        callbacks["prune_trial"] = pruning
    trainer = build_trainer(cfg, agent, list(callbacks.values()))

    # One process per run (a second resume is refused); from the run's creation on, SIGTERM ends it KILLED.
    lock = RunLock(checkpoint_dir, key="resume" if resume else "hydra.run.dir")
    run = None
    try:
        with lock, SigtermExits() as sigterm, mlflow_runs.mlflow_run(cfg, resume and resume.run_id) as run:
            if resume:
                log.info("Resuming MLflow run %s from %s", run.info.run_id, resume.path)
            else:
                mlflow.set_tag(CHECKPOINT_TAG, str(last.path.resolve()))
            last.mlflow_run_id = run.info.run_id
            trainer.logger = build(cfg.logger, "logger", tracking_uri=uri, run_id=run.info.run_id)
            with mlflow_runs.resumable_on_server_loss(uri, last.path, run.info.run_id):
                if resume and resume.training_done:
                    restore_trained(agent, best, resume.path)
                else:
                    with sigterm.lightning_fit():
                        fit(trainer, agent, resume and resume.path, last.path)
                if pruning is not None and pruning.pruned_at is not None:
                    export_pruned(cfg, agent, last.path, started)
                    score = None
                else:
                    score = export(cfg, agent, best, last.path, started)
                if pruning is not None:
                    tag_outcome(pruning)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C or SIGTERM: the run is KILLED, its checkpoint kept
        if run is not None and not in_multirun():  # a sweep says it once for all its jobs
            print(interrupted(run.info.run_id, last), file=sys.stderr)
        raise

    print(summary(run, score, agent.env_steps, started, uri))
    return score.mean if score is not None else math.nan


def resume_target(cfg: DictConfig, uri: str) -> tuple[str | None, Run | None]:
    """What `resume` names for this job, and the run that already did it.

    In a sweep resumed with resume=<sweep id>, a job goes on with its own earlier run: none there, a
    new run; FINISHED, nothing to do; KILLED or left RUNNING, resumed from its checkpoint; FAILED, run anew.
    """
    sweep = mlflow_runs.current_sweep()
    if cfg.resume is None or not sweep or str(cfg.resume) != sweep["parent_run_id"]:
        return cfg.resume, None
    overrides = " ".join(o for o in mlflow_runs.task_overrides() if mlflow_runs.override_key(o) != "resume")
    client = mlflow_runs.client(uri)
    earlier = [run for run in comparison.sweep_children(client, client.get_run(sweep["parent_run_id"]))
               if run.data.tags.get("overrides") == overrides]
    done = next((run for run in earlier if run.info.status == "FINISHED"), None)
    stopped = next((run for run in earlier if run.info.status in ("KILLED", "RUNNING") and CHECKPOINT_TAG in run.data.tags), None)
    return (stopped.info.run_id if stopped and not done else None), done


def interrupted(run_id: str, last: ResumableCheckpoint) -> str:
    """The last line of an interrupted run: what is kept, and the command that goes on with it."""
    command = mlflow_runs.resume_command(mlflow_runs.task_overrides(), run_id)
    return (f"Interrupted: MLflow run {run_id} is KILLED, {last.path} holds it at {last.saved_at_env_steps} env steps; "
            f"go on with: {command}")
