"""Build every part from the config, fit the DQNModule, export the policy to MLflow."""

import inspect
import logging
import math
import time
import warnings
from pathlib import Path

import mlflow
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch import nn
from torch.utils.data import DataLoader

from rl_pipeline import tracking
from rl_pipeline.envs import require_discrete_actions, reward_threshold, wrap_for_training
from rl_pipeline.evaluation import Evaluator, record_gif
from rl_pipeline.module import DQNModule, TrainingDiverged
from rl_pipeline.validation import (
    ConfigError,
    boolean,
    expected,
    non_negative_int,
    positive_int,
    positive_number,
    probability,
)

log = logging.getLogger(__name__)

GROUPS = ("env", "transforms", "network", "loss", "buffer", "optimizer", "collector", "trainer", "logger")
TOP_LEVEL_KEYS = {*GROUPS, "seed", "paths"}
TRAINER_KEYS = {
    "max_env_steps", "updates_per_iteration", "target_sync_interval_updates", "target_sync_tau",
    "eval_interval_env_steps", "eval_episodes", "eval_seed", "stop_when_solved", "solved_return",
    "solved_confirm_episodes", "max_grad_norm", "lightning",
}
# pl.Trainer arguments that follow from the env-step budget and the run: not for trainer.lightning.
PIPELINE_TRAINER_ARGS = (
    "logger", "callbacks", "default_root_dir", "max_epochs", "val_check_interval", "num_sanity_val_steps",
)
# Stopping and checkpoint selection use the lower confidence bound of the eval mean, not the mean:
# a policy that scores 475 on 20 episodes by luck must not be the one that gets exported.
STOP_METRIC = "eval/return_lower_bound"


def check_no_unknown_keys(keys, prefix: str, known: set[str]) -> None:
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key; expected one of {', '.join(sorted(known))}")


def check_keys(node: DictConfig, key: str, runtime_kwargs) -> None:
    """Every key of `node` must be an argument of its target that the pipeline does not pass itself."""
    try:
        target = get_object(node._target_)
    except Exception:
        raise expected(f"{key}._target_", "an importable class or function", node.get("_target_")) from None
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for name in node:
        if name in runtime_kwargs:
            raise ConfigError(f"{key}.{name}", "set by the pipeline itself; remove it from the config")
    settable = {name for name in params if name not in runtime_kwargs and name not in ("self", "params")}
    check_no_unknown_keys([name for name in node if not name.startswith("_")], f"{key}.", settable)


def build(node: DictConfig, key: str, **runtime_kwargs):
    """hydra.utils.instantiate, with a config mistake reported against its full key."""
    log.info("Instantiating %s <%s>", key, node.get("_target_"))
    check_keys(node, key, runtime_kwargs)
    try:
        return instantiate(node, **runtime_kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ConfigError):
            raise cause.within(key) from None
        raise ConfigError(key, str(cause or error).splitlines()[0]) from None


def check_settings(cfg: DictConfig) -> None:
    """The settings that no instantiated part checks: top-level keys, trainer, Lightning, logger."""
    check_no_unknown_keys(cfg, "", TOP_LEVEL_KEYS)
    check_no_unknown_keys(cfg.trainer, "trainer.", TRAINER_KEYS)
    check_keys(cfg.trainer.lightning, "trainer.lightning", PIPELINE_TRAINER_ARGS)
    check_keys(cfg.logger, "logger", ("tracking_uri", "run_id"))
    non_negative_int("seed", cfg.seed)
    t = cfg.trainer
    for key in ("max_env_steps", "updates_per_iteration", "target_sync_interval_updates",
                "eval_interval_env_steps", "eval_episodes"):
        positive_int(f"trainer.{key}", t[key])
    non_negative_int("trainer.eval_seed", t.eval_seed)
    non_negative_int("trainer.solved_confirm_episodes", t.solved_confirm_episodes)
    probability("trainer.target_sync_tau", t.target_sync_tau)
    if t.target_sync_tau == 0:
        raise expected("trainer.target_sync_tau", "a number in (0, 1]", 0)
    boolean("trainer.stop_when_solved", t.stop_when_solved)
    if t.max_grad_norm is not None:
        positive_number("trainer.max_grad_norm", t.max_grad_norm)
    if t.solved_return is not None and not isinstance(t.solved_return, (int, float)):
        raise expected("trainer.solved_return", "a number, or null for the env's reward threshold", t.solved_return)


def build_optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    if "lr" in cfg.optimizer:
        positive_number("optimizer.lr", cfg.optimizer.lr)
    make_optimizer = build(cfg.optimizer, "optimizer")
    try:
        return make_optimizer(params)
    except (TypeError, ValueError) as error:  # torch's own argument checks
        raise ConfigError("optimizer", str(error)) from None


def solved_return(cfg: DictConfig, env) -> float | None:
    """The stop threshold: trainer.solved_return, else the env's; None when not stopping early."""
    if not cfg.trainer.stop_when_solved:
        return None
    return cfg.trainer.solved_return if cfg.trainer.solved_return is not None else reward_threshold(env)


def build_evaluator(cfg: DictConfig, env) -> Evaluator:
    def make_env(num_envs: int):
        return build(cfg.env, "env", num_envs=num_envs, vectorization_mode="sync")

    return Evaluator(
        make_env,
        episodes=cfg.trainer.eval_episodes,
        seed=cfg.trainer.eval_seed,
        solved_return=solved_return(cfg, env),
        confirm_episodes=cfg.trainer.solved_confirm_episodes,
    )


def build_module(cfg: DictConfig) -> DQNModule:
    """Every part, in data-flow order; all config mistakes surface here, before MLflow or training."""
    env = build(cfg.env, "env")
    try:
        num_actions = require_discrete_actions(env)
    except ConfigError as error:
        raise error.within("env") from None
    transforms = [build(node, f"transforms.{name}") for name, node in cfg.transforms.items()]
    train_env = wrap_for_training(env, transforms)
    q_network = build(
        cfg.network, "network", observation_shape=env.single_observation_space.shape, num_actions=num_actions
    )
    buffer = build(cfg.buffer, "buffer")
    return DQNModule(
        q_network=q_network,
        loss_fn=build(cfg.loss, "loss"),
        buffer=buffer,
        collector=build(cfg.collector, "collector", env=train_env, buffer=buffer),
        optimizer=build_optimizer(cfg, q_network.parameters()),
        transforms=transforms,
        evaluator=build_evaluator(cfg, env),
        updates_per_iteration=cfg.trainer.updates_per_iteration,
        target_sync_interval_updates=cfg.trainer.target_sync_interval_updates,
        target_sync_tau=cfg.trainer.target_sync_tau,
        max_grad_norm=cfg.trainer.max_grad_norm,
    )


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar, with whole env steps and steps/s, and without the logger's run id."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        for key in ("env_steps", "steps/s"):
            if key in metrics:
                metrics[key] = int(metrics[key])
        return metrics


class CheckpointOnInterrupt(pl.Callback):
    """On Ctrl-C or SIGTERM, saves where training stopped, before the run ends KILLED."""

    def __init__(self, path: Path):
        self.path = path

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            trainer.save_checkpoint(self.path, weights_only=False)
            log.info("Saved %s", self.path)


def build_callbacks(cfg: DictConfig, module: DQNModule, checkpoint: ModelCheckpoint) -> list[pl.Callback]:
    callbacks = [checkpoint, CheckpointOnInterrupt(Path(checkpoint.dirpath) / "interrupted.ckpt")]
    solved = module.evaluator.solved_return
    if solved is not None:
        log.info("Stopping once %s >= %s", STOP_METRIC, solved)
        callbacks.append(
            EarlyStopping(
                monitor=STOP_METRIC,
                mode="max",
                stopping_threshold=solved,
                patience=math.inf,  # stop when solved or out of budget, never for a plateau
                check_on_train_epoch_end=False,
            )
        )
    if cfg.trainer.lightning.get("enable_progress_bar", True):
        callbacks.append(ProgressBar())
    return callbacks


def export_best(module: DQNModule, checkpoint_path: str) -> nn.Module:
    """Log the best checkpoint's policy as the MLflow model, and return it.

    When the run stops solved, the best checkpoint is the evaluation that stopped it.
    """
    module.load_state_dict(torch.load(checkpoint_path, map_location=module.device, weights_only=True)["state_dict"])
    mlflow.log_artifact(checkpoint_path, "checkpoints")
    policy = module.policy.cpu().eval()
    tracking.log_policy(policy)
    return policy


def log_results(cfg: DictConfig, module: DQNModule, policy: nn.Module, solved: bool, started: float) -> float:
    """The run's summary metrics, learning curve and episode GIF; returns the exported policy's eval return."""
    run_id = mlflow.active_run().info.run_id
    output_dir = Path(cfg.paths.output_dir)
    eval_return = float(module.evaluator(policy).mean())
    env_steps = module.collector.env_steps
    summary = {"final/eval_return": eval_return, "final/env_steps": env_steps}
    if solved:
        summary["final/solved_env_steps"] = env_steps
    summary["final/wall_seconds"] = time.perf_counter() - started
    mlflow.log_metrics(summary, step=env_steps)
    tracking.log_learning_curve(run_id, output_dir)
    gif = record_gif(policy, cfg.env.id, output_dir / "episode.gif", seed=cfg.trainer.eval_seed)
    if gif is not None:
        mlflow.log_artifact(str(gif))
    return eval_return


def train(cfg: DictConfig) -> float:
    """Train one agent; return the exported policy's eval return (the objective for sweepers)."""
    started = time.perf_counter()
    check_settings(cfg)
    tracking.check_reachable(tracking.tracking_uri())
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg)
    frames = module.collector.frames_per_iteration
    iterations = math.ceil(cfg.trainer.max_env_steps / frames)
    output_dir = Path(cfg.paths.output_dir)
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints", filename="best-{step}", monitor=STOP_METRIC, mode="max", save_last=True
    )

    with tracking.mlflow_run(cfg) as run:
        logger = instantiate(cfg.logger, tracking_uri=tracking.tracking_uri(), run_id=run.info.run_id)
        trainer: pl.Trainer = instantiate(
            cfg.trainer.lightning,
            logger=logger,
            callbacks=build_callbacks(cfg, module, checkpoint),
            default_root_dir=output_dir,
            max_epochs=1,
            val_check_interval=min(iterations, max(1, cfg.trainer.eval_interval_env_steps // frames)),
            num_sanity_val_steps=0,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*", PossibleUserWarning)
            try:
                trainer.fit(
                    module,
                    train_dataloaders=DataLoader(range(iterations), batch_size=None),
                    val_dataloaders=DataLoader(range(1), batch_size=None),
                )
            except TrainingDiverged as error:
                kept = checkpoint.last_model_path or "none (no evaluation yet)"
                raise TrainingDiverged(f"{error}; last good checkpoint: {kept}") from None
        final_checkpoint = Path(checkpoint.dirpath) / "final.ckpt"
        trainer.save_checkpoint(final_checkpoint, weights_only=False)
        mlflow.log_artifact(str(final_checkpoint), "checkpoints")

        policy = export_best(module, checkpoint.best_model_path)
        threshold = module.evaluator.solved_return
        solved = threshold is not None and checkpoint.best_model_score >= threshold
        score = log_results(cfg, module, policy, solved, started)

    print(
        f"MLflow run {run.info.run_id}: eval return {score:.1f}, "
        f"{module.collector.env_steps} env steps, {time.perf_counter() - started:.1f} s wall, "
        f"store {tracking.tracking_uri()}"
    )
    return score
