"""Hydra multiruns end to end: one MLflow parent run per sweep, a child per job, the comparison on the parent."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from conftest import TINY_RUN, all_runs

SWEEP = ("+experiment=dqn", "seed=0,1", "optimizer.lr=0.001,0.0003", *TINY_RUN)
COMPARISON = {"comparison/comparison.csv", "comparison/comparison.md", "comparison/comparison.png"}


def run_sweep(*args: str, cwd: Path, tracking_uri: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    result = subprocess.run(
        [sys.executable, "-m", "rl_pipeline", "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def parent_and_children(runs):
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    assert len(parents) == 1
    (parent,) = parents
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with a temp SQLite store and artifact folder."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


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
        assert {"eval/return_mean", "train/loss", "final/eval_return"} <= {m["key"] for m in child["data"]["metrics"]}
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
    best = max(children, key=lambda run: run.data.metrics["final/eval_return"])
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


def test_a_failing_job_leaves_no_run_running(tmp_path, tracking_uri):
    # The second job's env cannot be built: Hydra stops the sweep and skips its end-of-sweep callback.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    result = subprocess.run(
        [sys.executable, "-m", "rl_pipeline", "-m", "+experiment=dqn", "env.id=CartPole-v1,NoSuchEnv-v0", *TINY_RUN],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode != 0 and "env.id" in result.stderr
    runs = all_runs(tracking_uri)
    assert {run.info.status for run in runs} == {"FINISHED", "FAILED"}
    parent, children = parent_and_children(runs)
    assert parent.info.status == "FAILED" and [c.info.status for c in children] == ["FINISHED"]
