"""What a run leaves in MLflow once trained: checkpoints, the best policy and its test score, plots, a summary."""

import logging
import time
from pathlib import Path

import mlflow
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from rl_pipeline.agents.base import OffPolicyAgent
from rl_pipeline.agents.evaluation import Score, record_gif, score_policy
from rl_pipeline.run.build import build_env, build_transforms, eval_env_maker
from rl_pipeline.run.checkpoints import read_checkpoint
from rl_pipeline.tracking import mlflow_runs, views

log = logging.getLogger(__name__)


def restore_trained(agent: OffPolicyAgent, best: ModelCheckpoint, path: Path) -> None:
    """The state in which training ended, from its last checkpoint: what an interrupted export needs."""
    checkpoint = read_checkpoint(path)
    agent.load_state_dict(checkpoint["state_dict"])
    agent.on_load_checkpoint(checkpoint)
    best.load_state_dict(checkpoint["callbacks"][best.state_key])


def export_best(agent: OffPolicyAgent, checkpoint_path: str) -> tuple[nn.Module, str, int]:
    """Log the best checkpoint's policy as the MLflow model, stepped by the env steps it was taken at.

    Returns the policy, its MLflow model id and those env steps. When the run stops solved, the best
    checkpoint is the evaluation that stopped it. Every run evaluates at least once (at its end).
    """
    checkpoint = read_checkpoint(checkpoint_path, weights_only=True)
    agent.load_state_dict(checkpoint["state_dict"])
    mlflow.log_artifact(checkpoint_path, "checkpoints")
    policy = agent.policy.cpu().eval()
    return policy, mlflow_runs.log_policy(policy, step=checkpoint["env_steps"]), checkpoint["env_steps"]


def export(cfg: DictConfig, agent: OffPolicyAgent, best: ModelCheckpoint, last: Path, started: float) -> Score:
    """Everything a run promises once trained: checkpoints, the best policy, its test score, plots."""
    log.info("Exporting to MLflow run %s: checkpoints, policy, test score, plots", mlflow.active_run().info.run_id)
    mlflow.log_artifact(str(last), "checkpoints")
    policy, model_id, policy_env_steps = export_best(agent, best.best_model_path)
    t = cfg.trainer
    log.info("Testing the exported policy on %d episodes, seeds from %d", t.test_episodes, t.test_seed)
    score = score_policy(
        policy, eval_env_maker(cfg, build_transforms(cfg)), t.test_episodes, t.test_seed, t.eval_max_episode_steps
    )
    # The policy's own metrics go with its model too, so that the Models tab ranks policies.
    log_new_metrics({**score.metrics("test"), "final/policy_env_steps": policy_env_steps}, model_id=model_id)
    log_new_metrics(run_metrics(agent, started))
    log_plots(cfg, policy)
    return score


def export_pruned(cfg: DictConfig, agent: OffPolicyAgent, last: Path, started: float) -> None:
    """What a pruned trial keeps: its last checkpoint and its curves; no policy, and no test episodes spent on it."""
    log.info("Pruned: keeping the last checkpoint and the curves of MLflow run %s", mlflow.active_run().info.run_id)
    mlflow.log_artifact(str(last), "checkpoints")
    log_new_metrics(run_metrics(agent, started))
    mlflow_runs.log_learning_curve(mlflow.active_run().info.run_id, Path(cfg.paths.output_dir))


def run_metrics(agent: OffPolicyAgent, started: float) -> dict[str, float]:
    """How long the run trained, in env steps and seconds, and when it was solved (if it was)."""
    metrics = {"final/env_steps": agent.env_steps, "final/wall_seconds": time.perf_counter() - started}
    if agent.solved_env_steps is not None:
        metrics["final/solved_env_steps"] = agent.solved_env_steps
    return metrics


def log_new_metrics(metrics: dict[str, float], model_id: str | None = None) -> None:
    """One value each, at step 0 (MLflow's UI charts such metrics as bars, not as one-dot lines).

    A resumed export logs only those that the run does not hold yet.
    """
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.metrics
    mlflow.log_metrics({key: value for key, value in metrics.items() if key not in logged}, step=0, model_id=model_id)


def log_plots(cfg: DictConfig, policy: nn.Module) -> None:
    """The learning curve and a GIF of one whole greedy episode."""
    output_dir = Path(cfg.paths.output_dir)
    mlflow_runs.log_learning_curve(mlflow.active_run().info.run_id, output_dir)
    render_env = build_env(
        cfg, build_transforms(cfg), num_envs=1, vectorization_mode="sync", render_mode="rgb_array"
    )
    try:
        gif = record_gif(policy, render_env, output_dir / "episode.gif", seed=cfg.trainer.eval_seed)
    finally:
        render_env.close()
    if gif is not None:
        mlflow.log_artifact(str(gif))


def summary(run: mlflow.ActiveRun, score: Score | None, env_steps: int, started: float, uri: str) -> str:
    """The run's last line: its result (None: pruned, untested), and where to see it."""
    page = views.run_link(views.ui_address(uri), run.info.experiment_id, run.info.run_id)
    result = f"test return {score} on held-out seeds" if score is not None else "pruned by Optuna, not tested"
    return (
        f"MLflow run {run.info.run_id}: {result}, {env_steps} env steps, "
        f"{time.perf_counter() - started:.1f} s wall, store {uri}, open {views.where_to_look(uri, page)}"
    )
