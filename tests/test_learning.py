"""DQN learns: `+experiment=dqn`, `rainbow_lite` and `rainbow` (C51 and noisy nets) solve CartPole-v1 with seed 0, and the
policies they log hold up; `+experiment=dqn env=acrobot` solves Acrobot-v1 with its own settings."""

import mlflow
import pytest
from conftest import all_runs, run_cli

from rl_pipeline.agents.evaluation import evaluate
from rl_pipeline.envs.make import make_vector_env

FRESH_SEED = 987_654  # no run ever resets an env with these seeds


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["dqn", "rainbow_lite", "rainbow"])
def test_solves_cartpole_and_its_logged_policy_holds_on_fresh_episodes(tmp_path, tracking_uri, experiment):
    result = run_cli(f"+experiment={experiment}", "seed=0", "trainer.lightning.enable_progress_bar=false",
                     cwd=tmp_path, tracking_uri=tracking_uri)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED"

    client = mlflow.MlflowClient(tracking_uri)
    last_eval = client.get_metric_history(run.info.run_id, "eval/return_lower_bound")[-1]
    assert last_eval.value >= 475, "the budget ran out before the run was solved"
    assert run.data.metrics["final/solved_env_steps"] == run.data.metrics["final/env_steps"]
    assert run.data.params["trainer.test_episodes"] == "100" and run.data.metrics["test/return_lower_bound"] >= 475

    mlflow.set_tracking_uri(tracking_uri)
    policy = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    returns = evaluate(policy, make_vector_env("CartPole-v1", num_envs=100), seed=FRESH_SEED)
    assert returns.mean() >= 475, f"fresh episodes: mean {returns.mean():.1f}, min {returns.min():.0f}"


@pytest.mark.slow
def test_dqn_solves_acrobot_with_its_tuned_settings(tmp_path, tracking_uri):
    # env=acrobot brings conf/tuned/dqn/acrobot.yaml; the stop rule here is gymnasium's threshold, -100.
    result = run_cli("+experiment=dqn", "env=acrobot", "seed=0", "trainer.stop_when_solved=true",
                     "trainer.lightning.enable_progress_bar=false", cwd=tmp_path, tracking_uri=tracking_uri)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = all_runs(tracking_uri)
    assert run.data.params["optimizer.lr"] == "0.00063" and run.data.params["agent.updates_per_iteration"] == "256"
    assert run.data.metrics["final/solved_env_steps"] == run.data.metrics["final/env_steps"] < 100_000
    assert run.data.metrics["test/return_mean"] >= -100  # on 100 held-out episodes
