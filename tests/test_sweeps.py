"""Hydra multiruns end to end: one MLflow parent run per sweep, a child per job, the comparison on the parent."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest

from conftest import TINY_RUN, all_runs

SWEEP = ("+experiment=dqn", "seed=0,1", "optimizer.lr=0.001,0.0003", *TINY_RUN)
COMPARISON = {"comparison/comparison.csv", "comparison/comparison.md", "comparison/comparison.png"}


def run_sweep(*args: str, cwd: Path, tracking_uri: str | None = None, returncode: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    result = subprocess.run(
        [sys.executable, "-m", "rl_pipeline", "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == returncode, result.stderr[-3000:]
    return result


def parent_and_children(runs):
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    assert len(parents) == 1
    (parent,) = parents
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def rest(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_sweep_against_a_tracking_server_nests_four_children_under_one_parent(tmp_path, mlflow_server):
    run_sweep(*SWEEP, cwd=tmp_path, tracking_uri=mlflow_server)

    (experiment,) = [e for e in rest(mlflow_server, "/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
                     if e["name"] == "rl_pipeline"]
    runs = rest(mlflow_server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    (parent,) = [run for run, tag in zip(runs, tags) if tag.get("sweep_role") == "parent"]
    parent_id = parent["info"]["run_id"]
    children = [run for run, tag in zip(runs, tags) if tag.get("mlflow.parentRunId") == parent_id]
    assert len(runs) == 5 and len(children) == 4
    assert all(run["info"]["status"] == "FINISHED" for run in runs)

    settings = set()
    for child in children:
        params = {p["key"]: p["value"] for p in child["data"]["params"]}
        settings.add((params["seed"], params["optimizer.lr"]))
        assert child["info"]["run_name"] == f"seed={params['seed']},lr={params['optimizer.lr']}"
        assert {"eval/return_mean", "train/loss", "test/return_mean"} <= {m["key"] for m in child["data"]["metrics"]}
    assert settings == {("0", "0.001"), ("0", "0.0003"), ("1", "0.001"), ("1", "0.0003")}

    listed = rest(mlflow_server, f"/api/2.0/mlflow/artifacts/list?run_id={parent_id}&path=comparison")
    assert {f["path"] for f in listed["files"]} == COMPARISON
    with urllib.request.urlopen(mlflow_server + "/", timeout=30) as page:
        assert page.status == 200 and b"<html" in page.read().lower()


def test_joblib_sweep_with_two_parallel_jobs_loses_nothing_in_the_embedded_store(tmp_path):
    run_sweep("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "+experiment=dqn", "seed=0,1", *TINY_RUN, cwd=tmp_path)

    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    parent, children = parent_and_children(all_runs(uri))
    assert len(children) == 2 and parent.info.status == "FINISHED"
    client = mlflow.MlflowClient(uri)
    for child in children:
        assert child.info.status == "FINISHED"
        assert len(client.get_metric_history(child.info.run_id, "train/epsilon")) == 4  # every iteration
        assert len(client.get_metric_history(child.info.run_id, "eval/return_mean")) == 2  # every evaluation
    assert COMPARISON <= {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}


def test_optuna_search_runs_its_trials_as_children_and_tags_the_best(tmp_path, tracking_uri):
    run_sweep("+experiment=dqn", "+hparams_search=dqn_optuna", "hydra.sweeper.n_trials=3", *TINY_RUN,
              cwd=tmp_path, tracking_uri=tracking_uri)

    parent, children = parent_and_children(all_runs(tracking_uri))
    assert len(children) == 3 and all(run.info.status == "FINISHED" for run in children)
    best = max(children, key=lambda run: run.data.metrics["test/return_mean"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    for key in ("optimizer.lr", "buffer.batch_size", "trainer.target_sync_interval_updates",
                "collector.epsilon_fraction", "network.hidden_sizes"):
        assert parent.data.tags[f"best.{key}"] == best.data.params[key]


def test_compare_cli_rebuilds_the_report_for_a_sweep_and_for_an_experiment(tmp_path, tracking_uri):
    run_sweep("+experiment=dqn", "seed=0,1", *TINY_RUN, cwd=tmp_path, tracking_uri=tracking_uri)
    parent, children = parent_and_children(all_runs(tracking_uri))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    for target, out in ((parent.info.run_id, tmp_path / "by-sweep"), ("rl_pipeline", tmp_path / "by-experiment")):
        result = subprocess.run([sys.executable, "-m", "rl_pipeline.compare", target, "--out", str(out)],
                                env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert {p.name for p in out.iterdir()} == {"comparison.csv", "comparison.md", "comparison.png"}
        table = (out / "comparison.md").read_text().splitlines()
        assert len(table) == 2 + len(children)  # header, rule, one row per child run (parents left out)
        assert all(child.info.run_name in "\n".join(table) for child in children)


def test_failing_jobs_are_failed_children_with_their_reason_and_the_others_run_and_are_compared(tmp_path, tracking_uri):
    # Job order: config error, divergence, config error, then the one job that can finish.
    result = run_sweep("+experiment=dqn", "loss.loss=mse", "optimizer.lr=1e30,0.001", "env.id=NoSuchEnv-v0,CartPole-v1",
                       *TINY_RUN, cwd=tmp_path, tracking_uri=tracking_uri, returncode=1)
    assert "Traceback" not in result.stderr
    assert result.stderr.count("Config error: env.id: expected a registered gymnasium env id") == 2 + 2  # said, summed up
    parent, children = parent_and_children(all_runs(tracking_uri))
    by_name = {child.info.run_name: child for child in children}
    assert sorted(by_name) == ["lr=0.001,id=CartPole-v1", "lr=0.001,id=NoSuchEnv-v0", "lr=1e+30,id=CartPole-v1",
                               "lr=1e+30,id=NoSuchEnv-v0"]
    assert by_name["lr=0.001,id=CartPole-v1"].info.status == "FINISHED"
    diverged = by_name["lr=1e+30,id=CartPole-v1"]
    assert diverged.info.status == "FAILED" and diverged.data.tags["error"].startswith("TrainingDiverged: loss is")
    for name in ("lr=0.001,id=NoSuchEnv-v0", "lr=1e+30,id=NoSuchEnv-v0"):
        assert by_name[name].info.status == "FAILED" and "env.id: expected a registered" in by_name[name].data.tags["error"]
    assert parent.info.status == "FAILED"  # not every job finished
    client = mlflow.MlflowClient(tracking_uri)
    assert COMPARISON <= {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    table = client.download_artifacts(parent.info.run_id, "comparison/comparison.md", str(tmp_path))
    assert "lr=0.001,id=CartPole-v1" in Path(table).read_text() and "NoSuchEnv" not in Path(table).read_text()
    assert parent.data.tags["best_run_id"] == by_name["lr=0.001,id=CartPole-v1"].info.run_id
    assert result.stderr.strip().splitlines()[-4].startswith(f"Sweep {parent.info.run_id}: 3 of 4 jobs failed:")


def test_a_diverging_job_under_joblib_leaves_its_sibling_training_to_the_end(tmp_path, tracking_uri):
    result = run_sweep("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "+experiment=dqn", "loss.loss=mse",
                       "optimizer.lr=1e30,0.001", *TINY_RUN, "trainer.max_env_steps=2048",
                       cwd=tmp_path, tracking_uri=tracking_uri, returncode=1)
    assert "Traceback" not in result.stderr
    parent, children = parent_and_children(all_runs(tracking_uri))
    statuses = {child.info.run_name: child.info.status for child in children}
    assert statuses == {"lr=1e+30": "FAILED", "lr=0.001": "FINISHED"}
    (sibling,) = [child for child in children if child.info.status == "FINISHED"]
    steps = [m.step for m in mlflow.MlflowClient(tracking_uri).get_metric_history(sibling.info.run_id, "train/epsilon")]
    assert steps == list(range(256, 2049, 256))
    assert parent.data.tags["best_run_id"] == sibling.info.run_id


def test_optuna_goes_on_past_a_diverging_trial_and_picks_the_best_finished_one(tmp_path, tracking_uri):
    result = run_sweep("+experiment=dqn", "+hparams_search=dqn_optuna", "hydra.sweeper.n_trials=3", "loss.loss=mse",
                       "optimizer.lr=choice(1e30,0.001)", *TINY_RUN, cwd=tmp_path, tracking_uri=tracking_uri, returncode=1)
    assert "Traceback" not in result.stderr
    parent, children = parent_and_children(all_runs(tracking_uri))
    assert len(children) == 3  # the search went on after the failed trial
    failed = [run for run in children if run.info.status == "FAILED"]
    finished = [run for run in children if run.info.status == "FINISHED"]
    assert failed and finished and len(failed) + len(finished) == 3
    assert all(run.data.tags["error"].startswith("TrainingDiverged: loss is") for run in failed)
    assert parent.data.tags["best_run_id"] in {run.info.run_id for run in finished}
