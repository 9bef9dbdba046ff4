"""The benchmarks compare like with like: the plain loop runs experiment=dqn's settings, the ratios are the figures',
and the env benchmark's table holds its runs' own results."""

import dataclasses
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import TINY_RUN, compose_config, run_module
from omegaconf import OmegaConf

from benchmarks import plain_dqn, speed
from rl_pipeline.tracking.comparison import sweep_children
from rl_pipeline.run.build import solved_return

# plain_dqn.Args field -> the key of the composed config that it mirrors
CONFIG_KEYS = {
    "env_id": "env.id", "num_envs": "env.num_envs", "max_env_steps": "trainer.max_env_steps",
    "env_steps_per_iteration": "collector.env_steps_per_iteration",
    "updates_per_iteration": "agent.updates_per_iteration",
    "target_sync_interval_updates": "agent.target_sync_interval_updates",
    "learning_starts": "collector.learning_starts", "epsilon_start": "exploration.epsilon_start",
    "epsilon_end": "exploration.epsilon_end", "epsilon_fraction": "exploration.epsilon_fraction",
    "buffer_capacity": "buffer.capacity", "batch_size": "buffer.batch_size", "lr": "optimizer.lr",
    "gamma": "loss.gamma", "hidden_sizes": "network.hidden_sizes",
    "eval_interval_env_steps": "trainer.eval_interval_env_steps", "eval_episodes": "trainer.eval_episodes",
    "eval_seed": "trainer.eval_seed", "solved_confirm_episodes": "trainer.solved_confirm_episodes",
    "test_episodes": "trainer.test_episodes", "test_seed": "trainer.test_seed",
}


def test_the_plain_loop_runs_experiment_dqn_settings():
    cfg = compose_config("+experiment=dqn")
    assert set(CONFIG_KEYS) | {"solved_return"} == {field.name for field in dataclasses.fields(plain_dqn.Args)}
    for field, key in CONFIG_KEYS.items():
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        assert getattr(plain_dqn.ARGS, field) == (tuple(value) if field == "hidden_sizes" else value), key
    assert plain_dqn.ARGS.solved_return == solved_return(cfg) == 475
    # What the loop hard-codes: a hard target sync, the Huber loss, single-step returns, uniform replay, fused Adam.
    assert cfg.agent.target_sync_tau == 1.0 and cfg.loss.loss == "huber" and not cfg.loss.double_dqn
    assert cfg.agent.n_step == 1 and cfg.buffer._target_.endswith("UniformReplayBuffer")
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.fused and cfg.network.activation == "relu"
    assert cfg.env.vectorization_mode == "sync" and cfg.agent.max_grad_norm is None and not cfg.network.dueling
    assert not cfg.network.noisy and cfg.exploration._target_.endswith(".EpsilonGreedy")


def row(system: str, seed: int, wall_s: float) -> dict:
    return {"system": system, "seed": seed, "wall_s": wall_s, "env_steps_per_s": 1000.0, "startup_s": 1.0,
            "winddown_s": 1.0, "peak_rss_mb": 500.0, "solved_env_steps": 10_000, "test_return_mean": 500.0}


def test_ratios_are_per_seed_and_of_the_medians():
    walls = {"A dqn": [10, 30, 20], "A rainbow_lite": [8, 8, 8], "B sb3": [40, 30, 80], "C plain": [8, 20, 10]}
    rows = [row(system, seed, wall) for system, seeds in walls.items() for seed, wall in enumerate(seeds)]
    text, figures = speed.summary(rows)
    ratios = figures["ratios"]
    assert ratios["A dqn / B sb3"]["per_seed"] == {0: 0.25, 1: 1.0, 2: 0.25}
    assert ratios["A dqn / B sb3"]["median"] == 0.25
    assert ratios["A dqn / B sb3"]["of_medians"] == pytest.approx(20 / 40)
    assert ratios["A dqn / C plain"]["per_seed"] == {0: 1.25, 1: 1.5, 2: 2.0}
    assert figures["medians"]["B sb3"]["wall_s"] == 40
    assert "| A dqn / C plain | 0: 1.25, 1: 1.50, 2: 2.00 | 1.50 | 2.00 |" in text


@pytest.mark.slow
def test_the_env_benchmark_tables_each_preset_on_each_env_over_seeds_and_files_it_on_the_sweep(tmp_path, tracking_uri):
    out = tmp_path / "bench"
    result = run_module("benchmarks.envs", "--presets", "dqn", "rainbow_lite", "--envs", "cartpole", "--seeds", "0", "1",
                        "--out", str(out), *TINY_RUN, "trainer.test_episodes=5", tracking_uri=tracking_uri,
                        cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((out / "results.json").read_text())
    client = mlflow.MlflowClient(tracking_uri)
    children = sweep_children(client, client.get_run(figures["sweep_id"]))
    assert len(children) == 4 and {run.info.status for run in children} == {"FINISHED"}
    rows = figures["rows"]
    assert [(row["env"], row["preset"], row["seeds"]) for row in rows] == [
        ("CartPole-v1", "dqn", [0, 1]), ("CartPole-v1", "rainbow_lite", [0, 1])]
    for row in rows:
        returns = sorted(run.data.metrics["test/return_mean"] for run in children
                         if run.data.params["experiment"] == row["preset"])
        assert sorted(row["test_returns"]) == returns
        assert row["iqm"]["value"] == pytest.approx(np.mean(returns))  # two seeds: nothing trimmed
        assert row["iqm"]["low"] >= returns[0] and row["iqm"]["high"] <= returns[1]
        assert row["env_steps"] == 1024 and row["met"] is False and row["zoo_dqn"] == 500.0
        assert f"| CartPole-v1 | {row['preset']} | 2 | 1,024 |" in result.stdout
    filed = {artifact.path for artifact in client.list_artifacts(figures["sweep_id"], "benchmark")}
    assert filed == {"benchmark/results.md", "benchmark/results.json", "benchmark/CartPole-v1.png"}
