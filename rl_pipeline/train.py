"""Build every part from the config, fit the DQNModule, export the policy to MLflow."""

import inspect
import logging
import math
import os
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch import nn
from torch.utils.data import DataLoader

from rl_pipeline import tracking, ui
from rl_pipeline.checkpoints import (
    CHECKPOINT_TAG,
    LAST,
    AtomicCheckpointIO,
    ResumableCheckpoint,
    RunLock,
    SigtermExits,
    StopAtIterationEnd,
    find_resume_checkpoint,
    read_checkpoint,
)
from rl_pipeline.envs import (
    require_array_observations,
    require_discrete_actions,
    reward_threshold,
    sub_env_wrappers,
    wrap_for_training,
)
from rl_pipeline.evaluation import Evaluator, Score, record_gif, score_policy
from rl_pipeline.module import DQNModule, TrainingDiverged
from rl_pipeline.schedule import Schedule
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
TOP_LEVEL_KEYS = {*GROUPS, "seed", "paths", "resume"}
TRAINER_KEYS = {
    "max_env_steps", "updates_per_iteration", "target_sync_interval_updates", "target_sync_tau",
    "eval_interval_env_steps", "eval_episodes", "eval_seed", "stop_when_solved", "solved_return",
    "solved_confirm_episodes", "test_episodes", "test_seed", "max_grad_norm", "checkpoint_interval_env_steps",
    "checkpoint_buffer_max_mb", "lightning",
}
# pl.Trainer arguments that follow from the env-step budget, the eval interval and the run: not for
# trainer.lightning. The pipeline passes each of them, most at Lightning's own default, so that
# build() refuses them in trainer.lightning.
FIXED_TRAINER_ARGS = {
    "max_epochs": 1, "num_sanity_val_steps": 0, "max_steps": -1, "max_time": None, "min_epochs": None,
    "min_steps": None, "limit_train_batches": None, "limit_val_batches": None, "check_val_every_n_epoch": 1,
    "fast_dev_run": False, "overfit_batches": 0.0, "num_nodes": 1, "strategy": "auto",
}
MAX_SEED = 2**32 - 1  # numpy's limit
MAX_EXPERIMENT_NAME = 500  # MLflow's limit
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
    """The settings that no instantiated part checks: top-level keys, trainer, devices, logger, seed."""
    check_no_unknown_keys(cfg, "", TOP_LEVEL_KEYS)
    check_no_unknown_keys(cfg.trainer, "trainer.", TRAINER_KEYS)
    check_keys(cfg.logger, "logger", ("tracking_uri", "run_id"))
    check_logger(cfg.logger)
    if non_negative_int("seed", cfg.seed) > MAX_SEED:
        raise expected("seed", f"an integer in [0, {MAX_SEED}]", cfg.seed)
    check_devices(cfg.trainer.lightning)
    t = cfg.trainer
    for key in ("max_env_steps", "updates_per_iteration", "target_sync_interval_updates",
                "eval_interval_env_steps", "eval_episodes", "test_episodes", "checkpoint_interval_env_steps"):
        positive_int(f"trainer.{key}", t[key])
    if not (isinstance(t.checkpoint_buffer_max_mb, (int, float)) and t.checkpoint_buffer_max_mb >= 0):
        raise expected("trainer.checkpoint_buffer_max_mb", "a number >= 0", t.checkpoint_buffer_max_mb)
    non_negative_int("trainer.eval_seed", t.eval_seed)
    non_negative_int("trainer.solved_confirm_episodes", t.solved_confirm_episodes)
    check_test_seeds(t)
    probability("trainer.target_sync_tau", t.target_sync_tau)
    if t.target_sync_tau == 0:
        raise expected("trainer.target_sync_tau", "a number in (0, 1]", 0)
    boolean("trainer.stop_when_solved", t.stop_when_solved)
    if t.max_grad_norm is not None:
        positive_number("trainer.max_grad_norm", t.max_grad_norm)
    if t.solved_return is not None and not isinstance(t.solved_return, (int, float)):
        raise expected("trainer.solved_return", "a number, or null for the env's reward threshold", t.solved_return)
    learning_starts = cfg.collector.get("learning_starts", 0)
    if isinstance(learning_starts, int) and t.max_env_steps < learning_starts:
        raise expected(
            "trainer.max_env_steps", f"at least collector.learning_starts ({learning_starts}), or no update ever happens",
            t.max_env_steps,
        )


def check_test_seeds(t: DictConfig) -> None:
    """The test episodes' seeds must be ones that evaluation (screening or confirmation) never plays."""
    if non_negative_int("trainer.test_seed", t.test_seed) + t.test_episodes > MAX_SEED + 1:
        raise expected("trainer.test_seed", f"seeds up to {MAX_SEED} for trainer.test_episodes episodes", t.test_seed)
    evaluation = range(t.eval_seed, t.eval_seed + t.eval_episodes + t.solved_confirm_episodes)
    test = range(t.test_seed, t.test_seed + t.test_episodes)
    if max(evaluation.start, test.start) < min(evaluation.stop, test.stop):
        raise expected(
            "trainer.test_seed",
            f"test seeds apart from evaluation's ({evaluation.start} .. {evaluation.stop - 1}, from trainer.eval_seed, "
            f"eval_episodes and solved_confirm_episodes); {t.test_seed} .. {test.stop - 1} overlap them",
            t.test_seed,
        )


def check_logger(logger: DictConfig) -> None:
    name = logger.experiment_name
    if not (isinstance(name, str) and name.strip() and len(name) <= MAX_EXPERIMENT_NAME):
        raise expected("logger.experiment_name", f"a name of 1 to {MAX_EXPERIMENT_NAME} characters", name)
    if logger.run_name is not None and not isinstance(logger.run_name, str):
        raise expected("logger.run_name", "a string, or null to name the run by its overrides", logger.run_name)
    positive_number("logger.server_timeout_s", logger.server_timeout_s)


def check_devices(lightning: DictConfig) -> None:
    """One process trains a run: several devices would each open a run and split the budget."""
    devices = lightning.get("devices", 1)
    one = devices in (1, "1") or (OmegaConf.is_list(devices) and len(devices) == 1)
    if not one:
        raise expected("trainer.lightning.devices", "1 or a list of one device index (sweep to use more)", devices)


def build_optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    if "lr" in cfg.optimizer:
        positive_number("optimizer.lr", cfg.optimizer.lr)
    make_optimizer = build(cfg.optimizer, "optimizer")
    try:
        return make_optimizer(params)
    except Exception as error:  # torch's own argument checks: ValueError, TypeError, IndexError (betas=[0.9])
        raise ConfigError("optimizer", f"{type(error).__name__}: {str(error).splitlines()[0]}") from None


def check_network_fits(q_network: nn.Module, space, num_actions: int) -> None:
    """The network must map a batch of the env's observations to one value per action."""
    example = torch.as_tensor(np.zeros((1, *space.shape), dtype=space.dtype))
    try:
        with torch.no_grad():
            shape = tuple(q_network(example).shape)
    except Exception as error:
        raise ConfigError(
            "network", f"cannot take the env's observations of shape {space.shape} ({space.dtype}): "
            f"{str(error).splitlines()[0]}"
        ) from None
    if shape != (1, num_actions):
        raise ConfigError("network", f"expected Q-values of shape (1, {num_actions}) for one observation, got {shape}")


def check_buffer_holds_episode_ends(cfg: DictConfig, buffer, num_envs: int) -> None:
    """An episode's end releases up to n_step transitions per sub-env in one add."""
    needed = cfg.collector.get("n_step", 1) * num_envs
    if buffer.capacity < needed:
        raise expected(
            "buffer.capacity", f"at least collector.n_step x env.num_envs ({needed}), the transitions one step can add",
            buffer.capacity,
        )


def check_buffer_fits(buffer, space) -> None:
    """A buffer that cannot be allocated is refused now, not at its first add, mid-run."""
    needed = buffer.planned_nbytes(space.shape, space.dtype)
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise ConfigError(
            "buffer.capacity", f"expected a buffer that fits in memory: {buffer.capacity} transitions of "
            f"{space.shape} {space.dtype} take {needed / 2**30:,.1f} GiB, this machine has {available / 2**30:,.1f} GiB",
        )


def solved_return(cfg: DictConfig, env) -> float | None:
    """The stop threshold: trainer.solved_return, else the env's; None when not stopping early."""
    if not cfg.trainer.stop_when_solved:
        return None
    return cfg.trainer.solved_return if cfg.trainer.solved_return is not None else reward_threshold(env)


def build_transforms(cfg: DictConfig) -> list:
    return [build(node, f"transforms.{name}") for name, node in cfg.transforms.items()]


def build_env(cfg: DictConfig, transforms: list, **kwargs):
    """The env of cfg.env with the sub-env transforms, which the policy's input includes."""
    return build(cfg.env, "env", wrappers=sub_env_wrappers(transforms), **kwargs)


def eval_env_maker(cfg: DictConfig, transforms: list):
    """num_envs -> the env of cfg.env, stepped in this process so that sub-env i resets with seed + i."""
    def make_env(num_envs: int):
        return build_env(cfg, transforms, num_envs=num_envs, vectorization_mode="sync")

    return make_env


def build_evaluator(cfg: DictConfig, env, transforms: list) -> Evaluator:
    return Evaluator(
        eval_env_maker(cfg, transforms),
        episodes=cfg.trainer.eval_episodes,
        seed=cfg.trainer.eval_seed,
        solved_return=solved_return(cfg, env),
        confirm_episodes=cfg.trainer.solved_confirm_episodes,
    )


def build_schedule(cfg: DictConfig, num_envs: int) -> Schedule:
    """Evaluations and the budget's end fall on whole vector steps, or the run could not keep to them."""
    for key in ("eval_interval_env_steps", "max_env_steps"):
        if cfg.trainer[key] % num_envs:
            raise expected(
                f"trainer.{key}", f"a multiple of env.num_envs ({num_envs}), the env steps of one vector step",
                cfg.trainer[key],
            )
    return Schedule(cfg.collector.frames_per_iteration, cfg.trainer.eval_interval_env_steps, cfg.trainer.max_env_steps)


def build_module(cfg: DictConfig) -> DQNModule:
    """Every part, in data-flow order; all config mistakes surface here, before MLflow or training."""
    transforms = build_transforms(cfg)
    env = build_env(cfg, transforms)
    try:
        num_actions = require_discrete_actions(env)
        space = require_array_observations(env)
    except ConfigError as error:
        raise error.within("env") from None
    train_env = wrap_for_training(env, transforms)
    q_network = build(cfg.network, "network", observation_shape=space.shape, num_actions=num_actions)
    check_network_fits(q_network, space, num_actions)
    buffer = build(cfg.buffer, "buffer")
    check_buffer_holds_episode_ends(cfg, buffer, env.num_envs)
    check_buffer_fits(buffer, space)
    return DQNModule(
        q_network=q_network,
        loss_fn=build(cfg.loss, "loss"),
        buffer=buffer,
        collector=build(cfg.collector, "collector", env=train_env, buffer=buffer),
        optimizer=build_optimizer(cfg, q_network.parameters()),
        transforms=transforms,
        evaluator=build_evaluator(cfg, env, transforms),
        schedule=build_schedule(cfg, env.num_envs),
        updates_per_iteration=cfg.trainer.updates_per_iteration,
        target_sync_interval_updates=cfg.trainer.target_sync_interval_updates,
        target_sync_tau=cfg.trainer.target_sync_tau,
        max_grad_norm=cfg.trainer.max_grad_norm,
        checkpoint_buffer_max_bytes=cfg.trainer.checkpoint_buffer_max_mb * 2**20,
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


def build_callbacks(cfg: DictConfig, module: DQNModule, checkpoints: list[pl.Callback]) -> list[pl.Callback]:
    callbacks = [*checkpoints, StopAtIterationEnd()]
    solved = module.evaluator.solved_return
    if solved is not None:
        log.info("Stopping once %s >= %s", STOP_METRIC, solved)
        callbacks.append(
            EarlyStopping(
                monitor=STOP_METRIC,
                mode="max",
                # EarlyStopping stops when strictly above its threshold; the metric is float64, so
                # "above the next float64 down" is ">= solved", as confirmation and the solved flag read it.
                stopping_threshold=math.nextafter(solved, -math.inf),
                patience=math.inf,  # stop when solved or out of budget, never for a plateau
                check_on_train_epoch_end=False,
            )
        )
    if cfg.trainer.lightning.get("enable_progress_bar", True):
        callbacks.append(ProgressBar())
    return callbacks


def build_trainer(cfg: DictConfig, module: DQNModule, checkpoints: list[pl.Callback]) -> pl.Trainer:
    """Lightning's Trainer, built before the MLflow run exists so that a bad argument opens no run."""
    schedule = module.schedule
    return build(
        cfg.trainer.lightning,
        "trainer.lightning",
        logger=False,  # the MLflow logger joins once its run exists
        callbacks=build_callbacks(cfg, module, checkpoints),
        plugins=[AtomicCheckpointIO()],
        default_root_dir=cfg.paths.output_dir,
        val_check_interval=min(schedule.iterations, schedule.iterations_per_eval),
        **FIXED_TRAINER_ARGS,
    )


def fit(trainer: pl.Trainer, module: DQNModule, resume_path: Path | None, last: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*", PossibleUserWarning)
        # The dataloader only counts iterations; the checkpoint holds the data (buffer, envs).
        warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*", PossibleUserWarning)
        warnings.filterwarnings("ignore", ".*exists and is not empty.*")  # it holds the run's lock
        try:
            trainer.fit(
                module,
                train_dataloaders=DataLoader(range(module.schedule.iterations), batch_size=None),
                val_dataloaders=DataLoader(range(1), batch_size=None),
                ckpt_path=resume_path,
                weights_only=False,  # our own checkpoints: they hold the buffer and the envs' state
            )
        except TrainingDiverged as error:
            kept = last if last.exists() else "none (diverged before the first)"
            raise TrainingDiverged(f"{error}; last good checkpoint: {kept}") from None


def restore_trained(module: DQNModule, best: ModelCheckpoint, path: Path) -> None:
    """The state in which training ended, from its last checkpoint: what an interrupted export needs."""
    checkpoint = read_checkpoint(path)
    module.load_state_dict(checkpoint["state_dict"])
    module.load_training_state(checkpoint["training_state"])
    best.load_state_dict(checkpoint["callbacks"][best.state_key])


def export_best(module: DQNModule, checkpoint_path: str) -> tuple[nn.Module, str, int]:
    """Log the best checkpoint's policy as the MLflow model, stepped by the env steps it was taken at.

    Returns the policy, its MLflow model id and those env steps. When the run stops solved, the best
    checkpoint is the evaluation that stopped it. Every run evaluates at least once (at its end).
    """
    checkpoint = read_checkpoint(checkpoint_path, weights_only=True)
    module.load_state_dict(checkpoint["state_dict"])
    mlflow.log_artifact(checkpoint_path, "checkpoints")
    policy = module.policy.cpu().eval()
    model = tracking.log_policy(policy, step=checkpoint["env_steps"])
    return policy, model.model_id, checkpoint["env_steps"]


def export(cfg: DictConfig, module: DQNModule, best: ModelCheckpoint, last: Path, started: float) -> Score:
    """Everything a run promises once trained: checkpoints, the best policy, its test score, plots."""
    log.info("Exporting to MLflow run %s: checkpoints, policy, test score, plots", mlflow.active_run().info.run_id)
    mlflow.log_artifact(str(last), "checkpoints")
    policy, model_id, policy_env_steps = export_best(module, best.best_model_path)
    log.info("Testing the exported policy on %d episodes, seeds from %d", cfg.trainer.test_episodes, cfg.trainer.test_seed)
    score = score_policy(policy, eval_env_maker(cfg, module.transforms), cfg.trainer.test_episodes, cfg.trainer.test_seed)
    env_steps = module.collector.env_steps
    # The policy's own metrics go with its model too, so that the Models tab ranks policies.
    log_new_metrics({**score.metrics("test"), "final/policy_env_steps": policy_env_steps}, model_id=model_id)
    run_metrics = {"final/env_steps": env_steps, "final/wall_seconds": time.perf_counter() - started}
    if module.evaluator.solved(float(best.best_model_score)):
        run_metrics["final/solved_env_steps"] = env_steps
    log_new_metrics(run_metrics)
    log_plots(cfg, module, policy)
    return score


def log_new_metrics(metrics: dict[str, float], model_id: str | None = None) -> None:
    """One value each, at step 0 (MLflow's UI charts such metrics as bars, not as one-dot lines).

    A resumed export logs only those that the run does not hold yet.
    """
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.metrics
    mlflow.log_metrics({key: value for key, value in metrics.items() if key not in logged}, step=0, model_id=model_id)


def log_plots(cfg: DictConfig, module: DQNModule, policy: nn.Module) -> None:
    """The learning curve and a GIF of one whole greedy episode."""
    output_dir = Path(cfg.paths.output_dir)
    tracking.log_learning_curve(mlflow.active_run().info.run_id, output_dir)
    render_env = build_env(cfg, module.transforms, num_envs=1, vectorization_mode="sync", render_mode="rgb_array")
    try:
        gif = record_gif(policy, render_env, output_dir / "episode.gif", seed=cfg.trainer.eval_seed)
    finally:
        render_env.close()
    if gif is not None:
        mlflow.log_artifact(str(gif))


def train(cfg: DictConfig) -> float:
    """Train one agent, or resume one; return its test score's mean return (the objective for sweepers).

    Every check comes before the MLflow run exists; inside it, SIGTERM ends the run KILLED and
    resumable, and the run is FINISHED only once its policy, checkpoints and plots are stored.
    """
    started = time.perf_counter()
    check_settings(cfg)
    uri = tracking.tracking_uri()
    tracking.check_store(uri)
    tracking.bound_server_wait(cfg.logger.server_timeout_s)
    resume = None
    if cfg.resume is not None:
        resume = find_resume_checkpoint(cfg.resume, tracking.resolved_config(cfg), cfg.logger.experiment_name, uri)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg)
    # A resumed run keeps writing where it started, so Lightning restores its callbacks' state.
    checkpoint_dir = resume.path.parent if resume else Path(cfg.paths.output_dir) / "checkpoints"
    best = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="best-{step}", monitor=STOP_METRIC, mode="max", save_weights_only=True
    )
    last = ResumableCheckpoint(checkpoint_dir, cfg.trainer.checkpoint_interval_env_steps, tracking.resolved_config(cfg))
    trainer = build_trainer(cfg, module, [best, last])

    # One process per run (a second resume is refused); from the run's creation on, SIGTERM ends it KILLED.
    lock = RunLock(checkpoint_dir, key="resume" if resume else "hydra.run.dir")
    with lock, SigtermExits() as sigterm, tracking.mlflow_run(cfg, resume and resume.run_id) as run:
        run_id = run.info.run_id
        if resume:
            log.info("Resuming MLflow run %s from %s", run_id, resume.path)
        else:
            mlflow.set_tag(CHECKPOINT_TAG, str(last.path.resolve()))
        last.mlflow_run_id = run_id
        trainer.logger = instantiate(cfg.logger, tracking_uri=uri, run_id=run_id)
        with tracking.resumable_on_server_loss(uri, last.path, run_id):
            if resume and resume.training_done:
                restore_trained(module, best, resume.path)
            else:
                with sigterm.lightning_fit():
                    fit(trainer, module, resume and resume.path, last.path)
            score = export(cfg, module, best, last.path, started)

    page = ui.run_link(ui.ui_address(uri), run.info.experiment_id, run_id)
    print(
        f"MLflow run {run_id}: test return {score} on held-out seeds, "
        f"{module.collector.env_steps} env steps, {time.perf_counter() - started:.1f} s wall, "
        f"store {uri}, open {ui.where_to_look(uri, page)}"
    )
    return score.mean
