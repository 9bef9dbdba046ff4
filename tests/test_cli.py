"""`python -m rl_pipeline` end to end, in subprocesses, against a real MLflow SQLite store."""

import math
import re
import signal
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import TINY_RUN, all_runs, compose_config, greedy_episode_return, run_cli, run_module, start_cli
from PIL import Image, ImageSequence

from rl_pipeline import evaluate
from rl_pipeline.agents.evaluation import Score
from rl_pipeline.envs.transforms import ObservationNormalizer
from rl_pipeline.errors import ConfigError
from rl_pipeline.run.train import train

METRICS = {
    "train/episode_return", "train/episode_length", "train/loss", "train/q_mean", "train/grad_norm", "train/lr",
    "train/epsilon", "eval/return_mean", "eval/return_std", "eval/return_lower_bound", "perf/env_steps_per_sec",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One short CLI run, shared by the tests that read what it logged."""
    tmp_path = tmp_path_factory.mktemp("tiny")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli("+experiment=dqn", "seed=3", *TINY_RUN, cwd=tmp_path, tracking_uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = all_runs(uri)
    return result, run, mlflow.MlflowClient(uri), uri


def test_writes_one_finished_run_and_a_summary_line(tiny_run):
    result, run, _, uri = tiny_run
    assert run.info.status == "FINISHED"
    summary = [line for line in result.stdout.splitlines() if line.startswith("MLflow run ")]
    assert summary == [summary[0]] and run.info.run_id in summary[0]
    assert "1024 env steps" in summary[0] and "test return" in summary[0] and uri in summary[0]
    page = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    assert summary[0].endswith(f"open {page} (once `python -m rl_pipeline.ui` serves it)")


def test_the_result_is_the_logged_policys_score_on_held_out_seeds(tiny_run):
    result, run, _, uri = tiny_run
    mlflow.set_tracking_uri(uri)
    policy = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    # trainer.test_seed and test_episodes by default: 100 episodes from seed 2,000,000, which evaluation never plays.
    returns = np.array([greedy_episode_return(policy, seed) for seed in range(2_000_000, 2_000_100)])
    assert {key: value for key, value in run.data.metrics.items() if key.startswith("test/")} == Score.of(returns).metrics("test")
    assert f"test return {Score.of(returns)} on held-out seeds" in result.stdout


def test_evaluate_rescores_a_logged_policy_by_default_on_its_test_episodes(tiny_run, tmp_path):
    _, run, _, uri = tiny_run
    result = run_module("rl_pipeline.evaluate", run.info.run_id, tracking_uri=uri, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = run.data.metrics
    assert f"return {metrics['test/return_mean']:.1f} ± {metrics['test/return_std']:.1f}" in result.stdout
    assert "seeds 2000000 .. 2000099" in result.stdout
    assert "Downloading" not in result.stderr


@pytest.fixture
def evaluate_in_process(tiny_run, monkeypatch):
    """`python -m rl_pipeline.evaluate ARGS` as a call, against the tiny run's store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_run[3])
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return evaluate.main


def test_evaluate_plays_the_episodes_and_seeds_asked_for_and_writes_a_video(tiny_run, evaluate_in_process, tmp_path, capsys):
    _, run, _, uri = tiny_run
    evaluate_in_process([run.info.run_id, "--episodes", "7", "--seed", "55", "--video", str(tmp_path / "episode.gif")])
    mlflow.set_tracking_uri(uri)
    policy = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    returns = np.array([greedy_episode_return(policy, seed) for seed in range(55, 62)])
    assert f"return {Score.of(returns)}, seeds 55 .. 61" in capsys.readouterr().out
    with Image.open(tmp_path / "episode.gif") as gif:  # the whole first episode: every second step and the end, 80 ms each
        duration = sum(frame.info["duration"] for frame in ImageSequence.Iterator(gif))
    assert duration == 80 * (math.ceil(returns[0] / 2) + 1)


@pytest.mark.parametrize(
    "args",
    [("0123456789abcdef",), ("RUN", "--episodes", "0"), ("RUN", "--episodes", "1", "--video", "/proc/nope/x.gif")],
    ids=["unknown run", "no episodes", "unwritable video"],
)
def test_evaluate_says_what_is_wrong_in_one_line(tiny_run, evaluate_in_process, args):
    _, run, _, _ = tiny_run
    with pytest.raises(SystemExit) as exited:  # sys.exit(message): the message on stderr, exit status 1
        evaluate_in_process([run.info.run_id if arg == "RUN" else arg for arg in args])
    assert isinstance(exited.value.code, str) and exited.value.code.startswith("evaluate: ")
    assert "\n" not in exited.value.code


def test_params_are_the_settings_under_dotted_keys_and_the_groups_options(tiny_run):
    _, run, _, _ = tiny_run
    params = run.data.params
    assert params["seed"] == "3" and params["experiment"] == "dqn" and params["env"] == "cartpole"
    assert params["env.id"] == "CartPole-v1" and params["optimizer.lr"] == "0.0023"
    assert params["trainer.max_env_steps"] == "1024" and "collector.max_env_steps" not in params  # a copy of it
    assert params["network.hidden_sizes"] == "[256, 256]"
    assert not [key for key in params if key.startswith(("paths.", "logger.")) or key.endswith("_target_")]
    assert run.data.tags["overrides"].startswith("+experiment=dqn seed=3")


def test_metrics_are_stepped_by_env_steps_and_results_are_one_value_each(tiny_run):
    _, run, client, _ = tiny_run
    assert METRICS <= set(run.data.metrics)
    assert run.data.metrics["final/env_steps"] == 1024 and "test/return_mean" in run.data.metrics
    epsilon_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/epsilon")]
    assert epsilon_steps == list(range(256, 1025, 256))  # one point per iteration of 256 frames
    eval_steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/return_mean")]
    assert eval_steps == [512, 1024]
    for key in [key for key in run.data.metrics if key.startswith(("test/", "final/"))]:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0], f"{key}: one value, at step 0"


def test_the_logged_model_carries_its_test_score_and_the_env_step_it_was_taken_at(tiny_run):
    _, run, client, _ = tiny_run
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert model.source_run_id == run.info.run_id and model.name == "model"
    metrics = {m.key: m.value for m in model.metrics}
    for key in ("test/return_mean", "test/return_std", "test/return_lower_bound", "final/policy_env_steps"):
        assert metrics[key] == run.data.metrics[key]
    best = [m for m in client.get_metric_history(run.info.run_id, "eval/return_lower_bound")]
    taken_at = max(best, key=lambda m: m.value).step  # the best checkpoint's evaluation (the first, on a tie)
    assert metrics["final/policy_env_steps"] == taken_at


def test_artifacts_hold_config_plots_and_checkpoints(tiny_run):
    _, run, client, _ = tiny_run
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "learning_curve.png", "episode.gif"} <= top
    checkpoints = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/last.ckpt" in checkpoints
    assert any(path.startswith("checkpoints/best") for path in checkpoints)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_logged_model_maps_raw_observations_to_q_values_at_any_batch_size(tiny_run, batch_size):
    _, run, _, uri = tiny_run
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert model(torch.zeros(batch_size, 4)).shape == (batch_size, 2)


@pytest.mark.slow
def test_logged_model_carries_the_frozen_observation_normalization(train_here, tracking_uri):
    train_here("+experiment=dqn", "transforms=normalize_obs", *TINY_RUN, tracking_uri=tracking_uri)
    (run,) = all_runs(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    normalizer, q_network, q_values = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    (frozen,) = normalizer
    assert isinstance(q_values, torch.nn.Identity)  # DQN's network outputs the Q-values
    assert isinstance(frozen, ObservationNormalizer)
    assert frozen.mean.abs().sum() > 0 and not torch.allclose(frozen.var, torch.ones(4))  # learned, not initial
    observations = torch.randn(5, 4)
    expected = q_network((observations - frozen.mean) / torch.sqrt(frozen.var + frozen.epsilon))
    assert torch.allclose(mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")(observations), expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "exit_code", "resume_by", "keep_buffer"),
    [(signal.SIGINT, 1, "run id", True), (signal.SIGTERM, 128 + signal.SIGTERM, "run dir", False)],
)
def test_interrupted_run_saves_a_checkpoint_ends_killed_and_resumes_to_finished(
    tmp_path, tracking_uri, train_here, signum, exit_code, resume_by, keep_buffer
):
    budget = ("trainer.max_env_steps=10240", "trainer.stop_when_solved=false", "trainer.checkpoint_interval_env_steps=2560",
              "trainer.eval_interval_env_steps=2560")  # iterations of 256 env steps, all whole
    if not keep_buffer:
        budget += ("trainer.checkpoint_buffer_max_mb=0",)
    process = start_cli("+experiment=dqn", *budget, "trainer.lightning.enable_progress_bar=false",
                        cwd=tmp_path, tracking_uri=tracking_uri, run_dir=tmp_path / "run")
    try:
        assert any("last.ckpt at 2560 env steps" in line for line in process.stdout), "no periodic checkpoint"
        process.send_signal(signum)
        assert process.wait(timeout=60) == exit_code
        last_line = process.stdout.read().strip().splitlines()[-1]
    finally:
        process.kill()
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "KILLED"
    assert last_line.startswith(f"Interrupted: MLflow run {run.info.run_id} is KILLED, ")
    assert last_line.endswith(f"go on with: python -m rl_pipeline +experiment=dqn {' '.join(budget)} "
                              f"trainer.lightning.enable_progress_bar=false resume={run.info.run_id}")
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    stopped_at = checkpoint["training_state"]["collector"]["env_steps"]
    assert 2560 <= stopped_at < 10240 and "network.trunk.1.weight" in checkpoint["state_dict"]
    assert (checkpoint["training_state"]["buffer"] is not None) == keep_buffer
    assert checkpoint["run"]["mlflow_run_id"] == run.info.run_id

    where = run.info.run_id if resume_by == "run id" else str(tmp_path / "run")
    train_here("+experiment=dqn", *budget, "trainer.lightning.enable_progress_bar=false", f"resume={where}",
               tracking_uri=tracking_uri, output_dir=tmp_path / "resumed")
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED" and run.data.metrics["final/env_steps"] == 10240
    epsilon_steps = [m.step for m in mlflow.MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train/epsilon")]
    assert sorted(epsilon_steps) == list(range(256, 10241, 256))  # every iteration once: no gap, no repeat


def test_a_diverging_loss_stops_the_run_failed_naming_the_step(tmp_path, tracking_uri):
    result = run_cli("+experiment=dqn", "loss.loss=mse", "optimizer.lr=1e30", *TINY_RUN, cwd=tmp_path, tracking_uri=tracking_uri)
    assert result.returncode == 3
    # The first update with lr=1e30 sends the Q-values to inf; the loss on them is inf or nan.
    assert re.search(r"Training diverged: loss is (inf|nan) at env step 256 \(update 2\)", result.stderr)
    assert "Traceback" not in result.stderr
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FAILED"


# One per way a mistake reaches the user (test_config_errors.py has one per kind, in-process):
# our own check of a key, Hydra's composition, and a resume of a checkpoint of another config.
BAD_INPUTS = [
    ("+buffer.capcity=3", "Config error: buffer.capcity: unknown key"),
    ("network=transformer", "network/transformer"),
    ("resume={tiny_run_dir}", "Config error: resume: the checkpoint was trained with"),
]


@pytest.mark.parametrize(("override", "named"), BAD_INPUTS, ids=[o for o, _ in BAD_INPUTS])
def test_bad_input_exits_nonzero_in_one_line_before_training(tiny_run, tmp_path, tracking_uri, override, named):
    tiny_run_dir = Path(tiny_run[1].data.tags["checkpoint"]).parents[1]  # <run dir>/checkpoints/last.ckpt
    result = run_cli("+experiment=dqn", override.format(tiny_run_dir=tiny_run_dir), cwd=tmp_path, tracking_uri=tracking_uri)
    assert result.returncode != 0
    assert named in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not all_runs(tracking_uri)  # stopped before any MLflow run could be opened
    assert not list(tmp_path.rglob("*.ckpt*"))  # and before any checkpoint


def test_resuming_a_finished_run_is_refused(tiny_run, tmp_path, monkeypatch):
    _, run, _, uri = tiny_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = compose_config("+experiment=dqn", "seed=3", *TINY_RUN, f"resume={run.info.run_id}",
                         f"paths.output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=f"^resume: MLflow run {run.info.run_id} is FINISHED already; nothing to resume$"):
        train(cfg)


@pytest.mark.slow
def test_unreachable_tracking_server_fails_fast_naming_the_variable(tmp_path):
    started = time.monotonic()
    result = run_cli("+experiment=dqn", cwd=tmp_path, tracking_uri="http://127.0.0.1:9")  # nothing listens on 9
    assert result.returncode == 2 and time.monotonic() - started < 60
    assert result.stderr.strip().splitlines()[-1].startswith("Config error: MLFLOW_TRACKING_URI: expected a reachable")


@pytest.mark.slow
def test_another_env_option_trains_through_the_same_pipeline(train_here, tracking_uri):
    train_here("+experiment=dqn", "env=acrobot", *TINY_RUN, tracking_uri=tracking_uri)
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED" and run.data.params["env.id"] == "Acrobot-v1"


@pytest.mark.slow
def test_dqn_atari_trains_pong_on_pixels_and_logs_a_model_that_takes_stacked_frames(train_here, tracking_uri):
    train_here(
        "+experiment=dqn_atari", "trainer.max_env_steps=3072", "collector.learning_starts=2048",
        "agent.updates_per_iteration=8", "trainer.eval_interval_env_steps=3072", "trainer.eval_episodes=1",
        "buffer.capacity=5000", "trainer.lightning.enable_progress_bar=false", tracking_uri=tracking_uri,
    )
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED" and run.data.params["env.id"] == "ale_py:ALE/Pong-v5"
    assert run.data.metrics["final/env_steps"] == 3072 and "train/loss" in run.data.metrics
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert model(torch.zeros(2, 4, 84, 84, dtype=torch.uint8)).shape == (2, 6)  # Pong's 6 actions


@pytest.mark.slow
def test_same_config_and_seed_give_identical_metrics_at_every_step(tmp_path):
    def metric_histories(name: str, *overrides: str) -> dict:
        uri = f"sqlite:///{tmp_path / name}.db"
        result = run_cli("+experiment=dqn", "seed=5", *TINY_RUN, *overrides, cwd=tmp_path, tracking_uri=uri,
                         run_dir=tmp_path / name)
        assert result.returncode == 0, result.stderr[-2000:]
        (run,) = all_runs(uri)
        client = mlflow.MlflowClient(uri)
        keys = ("train/loss", "train/q_mean", "train/episode_return", "eval/return_mean")
        return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in keys}

    first, second = metric_histories("first"), metric_histories("second")
    assert first == second
    assert len(first["train/loss"]) == 4  # one point per iteration once learning_starts frames are in
    # The control: gradient clipping changes the updates, and the histories show it.
    assert metric_histories("clipped", "agent.max_grad_norm=0.001")["train/loss"] != first["train/loss"]
