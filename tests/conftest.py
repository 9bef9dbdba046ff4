import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import gymnasium as gym
import mlflow
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from benchmarks import services
from rl_pipeline.run.config import CONF_DIR
from rl_pipeline.tracking.mlflow_runs import search_runs
from rl_pipeline.ui import free_port

# A budget small enough for seconds, large enough to update and evaluate.
TINY_RUN = (
    "trainer.max_env_steps=1024",
    "trainer.eval_interval_env_steps=512",
    "trainer.eval_episodes=2",
    "collector.learning_starts=256",
    "agent.updates_per_iteration=4",
    "trainer.lightning.enable_progress_bar=false",
)

SEARCH = ("+experiment=dqn", "+hparams_search=dqn_optuna")
# A search where pruning must happen: one learning rate learns CartPole's first steps, the other cannot move;
# seed 7 asks for it twice, then twice for the one that cannot (so in the second batch of two).
LEARNS, CANNOT = 2.3e-3, 1e-7
PRUNABLE = (*SEARCH, f"optimizer.lr=choice({CANNOT},{LEARNS})", "buffer.batch_size=64",
            "agent.target_sync_interval_updates=32", "exploration.epsilon_fraction=0.1", "network.hidden_sizes=[64,64]",
            "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=7", "hydra.sweeper.pruner.n_startup_trials=1",
            "trainer.max_env_steps=3072", "trainer.eval_interval_env_steps=1024", "trainer.eval_episodes=5",
            "trainer.test_episodes=5", "collector.learning_starts=256", "trainer.lightning.enable_progress_bar=false")


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def train_here(tmp_path, monkeypatch):
    """train(cfg) in this process, as `python -m rl_pipeline OVERRIDES` runs it but for Hydra's job
    bookkeeping (run name and group options), and without a second interpreter's start-up."""
    from rl_pipeline.run.train import train

    def run(*overrides: str, tracking_uri: str, output_dir: Path | None = None) -> float:
        output_dir = output_dir or tmp_path / "run"
        output_dir.mkdir(parents=True, exist_ok=True)  # as Hydra makes its run dir
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        return train(compose_config(*overrides, f"paths.output_dir={output_dir}"))

    return run


def module_env(tracking_uri: str | None) -> dict[str, str]:
    """This environment, unbuffered, with MLFLOW_TRACKING_URI at `tracking_uri` (unset for None: the default store)."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONUNBUFFERED": "1", **({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {})}


def run_module(module: str, *args: str, tracking_uri: str | None, cwd: Path | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a subprocess, to its end, its MLflow store at `tracking_uri`."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=module_env(tracking_uri),
                          capture_output=True, text=True, timeout=timeout)


def start_module(module: str, *args: str, tracking_uri: str | None, cwd: Path | None = None, **popen) -> subprocess.Popen:
    """`python -m MODULE ARGS` started in the background; its stdout and stderr merged (unless `popen` says), line by line."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=module_env(tracking_uri),
                            text=True, **{"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, **popen})


def run_cli(
    *args: str, cwd: Path, tracking_uri: str, timeout: float = 600, run_dir: Path | None = None
) -> subprocess.CompletedProcess:
    """`python -m rl_pipeline ARGS`, writing into `run_dir` (`cwd/run` by default)."""
    return run_module("rl_pipeline", *args, f"hydra.run.dir={run_dir or cwd / 'run'}", cwd=cwd,
                      tracking_uri=tracking_uri, timeout=timeout)


def start_cli(*args: str, cwd: Path, tracking_uri: str, run_dir: Path) -> subprocess.Popen:
    """`python -m rl_pipeline ARGS` started in the background, writing into `run_dir`."""
    return start_module("rl_pipeline", *args, f"hydra.run.dir={run_dir}", cwd=cwd, tracking_uri=tracking_uri)


def read_until(process: subprocess.Popen, text: str) -> list[str]:
    """The lines `process` printed up to the first that holds `text`; fails if it ended first."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never printed:\n{''.join(lines[-30:])}")


@contextmanager
def mlflow_server_process(store: Path, port: int):
    """A real `mlflow server` on 127.0.0.1:port over an SQLite store and an artifact folder beside it."""
    with services.mlflow_server(f"sqlite:///{store}", store.parent / "server-artifacts", port) as base:
        yield base


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with a temp SQLite store and artifact folder."""
    with mlflow_server_process(tmp_path / "server.db", free_port()) as base:
        yield base


def parent_and_children(runs):
    """The one sweep parent among `runs`, and its children."""
    parents = [run for run in runs if run.data.tags.get("sweep_role") == "parent"]
    assert len(parents) == 1
    (parent,) = parents
    return parent, [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def all_runs(tracking_uri: str) -> list:
    """Every run of every experiment in the store; none where the SQLite file was never created (asking creates none)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        return []
    client = mlflow.MlflowClient(tracking_uri)
    experiments = client.search_experiments()
    if not experiments:
        return []
    return list(search_runs(client, [e.experiment_id for e in experiments]))


@torch.no_grad()
def greedy_episode_return(policy: nn.Module, seed: int, max_episode_steps: int | None = None) -> float:
    """The reference: one plain gymnasium episode, reset with `seed`, acting argmax Q at every step."""
    env = gym.make("CartPole-v1", max_episode_steps=max_episode_steps)
    observation, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        action = int(policy(torch.as_tensor(observation).unsqueeze(0)).argmax())
        observation, reward, terminated, truncated, _ = env.step(action)
        total, done = total + reward, terminated or truncated
    env.close()
    return total
