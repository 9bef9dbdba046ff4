import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# A budget small enough for seconds, large enough to update and evaluate.
TINY_RUN = (
    "trainer.max_env_steps=1024",
    "trainer.eval_interval_env_steps=512",
    "trainer.eval_episodes=2",
    "collector.learning_starts=256",
    "trainer.updates_per_iteration=4",
    "trainer.lightning.enable_progress_bar=false",
)


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def run_cli(*args: str, cwd: Path, tracking_uri: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m rl_pipeline ARGS` in a subprocess, its MLflow store at `tracking_uri`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rl_pipeline", *args, f"hydra.run.dir={cwd / 'run'}"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def all_runs(tracking_uri: str) -> list:
    client = mlflow.MlflowClient(tracking_uri)
    experiments = client.search_experiments()
    if not experiments:
        return []
    return client.search_runs([e.experiment_id for e in experiments])
