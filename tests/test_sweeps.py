"""Hydra multiruns end to end: one MLflow parent run per sweep, a child per job, the comparison on the parent."""

import csv
import json
import os
import re
import signal
import subprocess
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import (
    TINY_RUN,
    all_runs,
    parent_and_children,
    read_until,
    run_module,
    start_module,
)

from rl_pipeline import compare

pytestmark = pytest.mark.slow  # each runs a sweep of CLI jobs

SWEEP = ("+experiment=dqn", "seed=0,1", "optimizer.lr=0.001,0.0003", *TINY_RUN)
COMPARISON = {f"comparison/{name}" for name in ("comparison.md", "configurations.csv", "runs.csv", "comparison.png")}


def run_sweep(*args: str, cwd: Path, tracking_uri: str | None = None, returncode: int = 0) -> subprocess.CompletedProcess:
    result = run_module("rl_pipeline", "-m", *args, cwd=cwd, tracking_uri=tracking_uri)
    assert result.returncode == returncode, result.stderr[-3000:]
    return result


def stem(run) -> str:
    """A run's name without its random last part."""
    return run.info.run_name.rsplit(" ", 1)[0]


def rest(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_sweep_against_a_tracking_server_nests_four_children_under_one_parent(tmp_path, mlflow_server):
    result = run_sweep(*SWEEP, cwd=tmp_path, tracking_uri=mlflow_server)

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
        assert re.fullmatch(rf"CartPole-v1 optimizer\.lr={params['optimizer.lr']} seed={params['seed']} [0-9a-f]{{6}}",
                            child["info"]["run_name"])
        assert {"eval/return_mean", "train/loss", "test/return_mean"} <= {m["key"] for m in child["data"]["metrics"]}
        assert params["experiment"] == "dqn" and not [key for key in params if key.endswith(("_target_", "_partial_"))]
    assert settings == {("0", "0.001"), ("0", "0.0003"), ("1", "0.001"), ("1", "0.0003")}
    sweep_page = f"{mlflow_server}/#/experiments/{experiment['experiment_id']}/runs?workflowType=machine_learning"
    assert result.stdout.strip().splitlines()[-1] == (
        f"MLflow sweep {parent_id}: 4 of 4 runs finished; "
        f"compare at {sweep_page}&compareRunsMode=CHART&viewStateShareKey=sweep-{parent_id}"
    )
    check_parent_reads_on_its_own(mlflow.MlflowClient(mlflow_server), parent_id, children)

    listed = rest(mlflow_server, f"/api/2.0/mlflow/artifacts/list?run_id={parent_id}&path=comparison")
    assert {f["path"] for f in listed["files"]} == COMPARISON
    with urllib.request.urlopen(mlflow_server + "/", timeout=30) as page:
        assert page.status == 200 and b"<html" in page.read().lower()


def check_parent_reads_on_its_own(client: mlflow.MlflowClient, parent_id: str, children: list[dict]) -> None:
    """The shared settings as params; the sweep's and its best configuration's scores as metrics."""
    parent = client.get_run(parent_id)
    params = parent.data.params
    assert params["env.id"] == "CartPole-v1" and params["experiment"] == "dqn" and params["trainer.max_env_steps"] == "1024"
    assert "seed" not in params and "optimizer.lr" not in params, "what the sweep varies is no shared setting"
    by_lr: dict[str, list[float]] = {}
    for child in children:
        run = client.get_run(child["info"]["run_id"])
        by_lr.setdefault(run.data.params["optimizer.lr"], []).append(run.data.metrics["test/return_mean"])
    returns = sorted(r for values in by_lr.values() for r in values)
    best_lr = max(by_lr, key=lambda lr: np.mean(by_lr[lr]))  # with 2 seeds the IQM is the mean
    best = by_lr[best_lr]
    metrics = parent.data.metrics
    assert {key: metrics[key] for key in metrics if not key.endswith(("_low", "_high"))} == pytest.approx({
        "sweep/test_return_iqm": np.mean(returns[1:3]), "sweep/test_return_mean": np.mean(returns),
        "sweep/test_return_median": np.median(returns),
        "sweep/solved_fraction": 0.0, "sweep/runs": 4.0,  # a budget of 1,024 env steps solves nothing
        "best/test_return_iqm": np.mean(best), "best/test_return_mean": np.mean(best),
        "best/test_return_median": np.median(best), "best/solved_fraction": 0.0, "best/runs": 2.0,
        "best/probability_of_improvement": np.mean([[(b > o) + 0.5 * (b == o) for o in by_lr[lr]]
                                                    for lr in by_lr if lr != best_lr for b in best]),
    })
    for scope, scored in (("sweep", returns), ("best", best)):
        for name in ("iqm", "mean", "median"):
            low, high = metrics.get(f"{scope}/test_return_{name}_low"), metrics.get(f"{scope}/test_return_{name}_high")
            if min(scored) < max(scored):  # equal returns make a point, logged as such
                assert min(scored) <= low <= metrics[f"{scope}/test_return_{name}"] <= high <= max(scored)
    assert "distinguishable" in parent.data.tags["best_verdict"] or "beats" in parent.data.tags["best_verdict"]
    assert parent.data.tags["best_configuration"] == f"optimizer.lr={best_lr}"


def test_joblib_sweep_with_two_parallel_jobs_loses_nothing_in_the_embedded_store(tmp_path):
    run_sweep("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "+experiment=dqn", "seed=0,1", *TINY_RUN, cwd=tmp_path)

    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    parent, children = parent_and_children(all_runs(uri))
    assert len(children) == 2 and parent.info.status == "FINISHED"
    client = mlflow.MlflowClient(uri)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["torch_threads"] == str(max(1, os.cpu_count() // 2))  # its share of the cores
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
    for key in ("optimizer.lr", "buffer.batch_size", "agent.target_sync_interval_updates",
                "exploration.epsilon_fraction", "network.hidden_sizes"):
        assert parent.data.tags[f"best.{key}"] == best.data.params[key]


def test_compare_cli_rebuilds_the_report_for_a_sweep_and_for_an_experiment(tmp_path, tracking_uri, monkeypatch):
    run_sweep("+experiment=dqn", "seed=0,1", *TINY_RUN, cwd=tmp_path, tracking_uri=tracking_uri)
    parent, children = parent_and_children(all_runs(tracking_uri))
    result = run_module("rl_pipeline.compare", parent.info.run_id, "--out", str(tmp_path / "by-sweep"),
                        tracking_uri=tracking_uri, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    compare.main(["rl_pipeline", "--out", str(tmp_path / "by-experiment")])  # the same, as a call
    for out in (tmp_path / "by-sweep", tmp_path / "by-experiment"):
        assert {p.name for p in out.iterdir()} == {"comparison.md", "configurations.csv", "runs.csv", "comparison.png"}
        (configuration,) = read_csv(out / "configurations.csv")  # the seeds of one configuration together
        assert configuration["configuration"] == "all runs" and configuration["runs"] == "2"
        assert sorted(configuration["run ids"].split()) == sorted(child.info.run_id for child in children)
        rows = read_csv(out / "runs.csv")  # one per child run; the parent left out
        assert sorted(row["run id"] for row in rows) == sorted(child.info.run_id for child in children)
        assert all(child.info.run_name in (out / "comparison.md").read_text() for child in children)


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_failing_jobs_are_failed_children_with_their_reason_and_the_others_run_and_are_compared(tmp_path, tracking_uri):
    # Job order: config error, divergence, config error, then the one job that can finish.
    result = run_sweep("+experiment=dqn", "loss.loss=mse", "optimizer.lr=1e30,0.001", "env.id=NoSuchEnv-v0,CartPole-v1",
                       *TINY_RUN, cwd=tmp_path, tracking_uri=tracking_uri, returncode=1)
    assert "Traceback" not in result.stderr
    assert result.stderr.count("Config error: env.id: expected a registered gymnasium env id") == 2 + 2  # said, summed up
    parent, children = parent_and_children(all_runs(tracking_uri))
    by_name = {stem(child): child for child in children}
    assert sorted(by_name) == ["CartPole-v1 optimizer.lr=0.001 seed=0", "CartPole-v1 optimizer.lr=1e+30 seed=0",
                               "NoSuchEnv-v0 optimizer.lr=0.001 seed=0", "NoSuchEnv-v0 optimizer.lr=1e+30 seed=0"]
    finished = by_name["CartPole-v1 optimizer.lr=0.001 seed=0"]
    assert finished.info.status == "FINISHED"
    diverged = by_name["CartPole-v1 optimizer.lr=1e+30 seed=0"]
    assert diverged.info.status == "FAILED" and diverged.data.tags["error"].startswith("TrainingDiverged: loss is")
    for name in ("NoSuchEnv-v0 optimizer.lr=0.001 seed=0", "NoSuchEnv-v0 optimizer.lr=1e+30 seed=0"):
        assert by_name[name].info.status == "FAILED" and "env.id: expected a registered" in by_name[name].data.tags["error"]
    assert parent.info.status == "FAILED"  # not every job finished
    client = mlflow.MlflowClient(tracking_uri)
    assert COMPARISON <= {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    (configuration,) = read_csv(Path(client.download_artifacts(parent.info.run_id, "comparison/configurations.csv", str(tmp_path))))
    assert configuration["configuration"] == "optimizer.lr=0.001,env.id=CartPole-v1"
    assert configuration["run ids"] == finished.info.run_id
    runs = read_csv(Path(client.download_artifacts(parent.info.run_id, "comparison/runs.csv", str(tmp_path))))
    assert sorted(row["status"] for row in runs) == ["FAILED", "FAILED", "FAILED", "FINISHED"]  # failed runs listed too
    assert parent.data.tags["best_run_id"] == finished.info.run_id
    assert result.stderr.strip().splitlines()[-4].startswith(f"Sweep {parent.info.run_id}: 3 of 4 jobs failed:")


def test_a_diverging_job_under_joblib_leaves_its_sibling_training_to_the_end(tmp_path, tracking_uri):
    result = run_sweep("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "+experiment=dqn", "loss.loss=mse",
                       "optimizer.lr=1e30,0.001", *TINY_RUN, "trainer.max_env_steps=2048",
                       cwd=tmp_path, tracking_uri=tracking_uri, returncode=1)
    assert "Traceback" not in result.stderr
    parent, children = parent_and_children(all_runs(tracking_uri))
    statuses = {stem(child): child.info.status for child in children}
    assert statuses == {"CartPole-v1 optimizer.lr=1e+30 seed=0": "FAILED", "CartPole-v1 optimizer.lr=0.001 seed=0": "FINISHED"}
    (sibling,) = [child for child in children if child.info.status == "FINISHED"]
    steps = [m.step for m in mlflow.MlflowClient(tracking_uri).get_metric_history(sibling.info.run_id, "train/epsilon")]
    assert steps == list(range(256, 2049, 256))
    assert parent.data.tags["best_run_id"] == sibling.info.run_id


def test_optuna_goes_on_past_diverging_trials_as_fail_trials(tmp_path, tracking_uri):
    result = run_sweep("+experiment=dqn", "+hparams_search=dqn_optuna", "hydra.sweeper.n_trials=3", "loss.loss=mse",
                       "optimizer.lr=choice(1e30,0.001)", *TINY_RUN, cwd=tmp_path, tracking_uri=tracking_uri, returncode=1)
    assert "Traceback" not in result.stderr
    parent, children = parent_and_children(all_runs(tracking_uri))
    failed = [run for run in children if run.info.status == "FAILED"]
    finished = [run for run in children if run.info.status == "FINISHED"]
    assert failed and finished and len(children) == len(finished) + len(failed)
    # It asks until n_trials trials complete, or as many fail.
    assert len(finished) == 3 or len(failed) == 3
    number = {run.info.run_id: int(run.data.tags["optuna.trial_number"]) for run in children}
    assert max(number[run.info.run_id] for run in finished) > min(number[run.info.run_id] for run in failed)  # went on
    assert all(run.data.tags["error"].startswith("TrainingDiverged: loss is") for run in failed)
    assert all(run.data.tags["optuna.trial_state"] == "FAIL" and run.data.params["optimizer.lr"] == "1e+30" for run in failed)
    assert parent.data.tags["best_run_id"] in {run.info.run_id for run in finished}
    assert parent.data.metrics["optuna/trials_failed"] == len(failed)


@pytest.mark.parametrize("launcher", [("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"), ()], ids=["joblib", "basic"])
def test_ctrl_c_on_a_sweep_ends_its_running_jobs_killed_and_says_how_to_resume_in_one_line(tmp_path, tracking_uri, launcher):
    budget = [o for o in TINY_RUN if not o.startswith("trainer.max_env_steps=")] + [
        "trainer.max_env_steps=4096", "trainer.stop_when_solved=false", "trainer.checkpoint_interval_env_steps=1024"]
    sweep = start_module("rl_pipeline", "-m", *launcher, "+experiment=dqn", "seed=0,1,2,3", *budget,
                         f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, tracking_uri=tracking_uri,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        read_until(sweep, "last.ckpt at 1024 env steps")  # a job is training
        os.killpg(sweep.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to the whole process group
        assert sweep.wait(timeout=120) == 1
        said = sweep.stderr.read()
    finally:
        sweep.kill()
    assert "Traceback" not in said
    line = said.strip().splitlines()[-1]
    parent, children = parent_and_children(all_runs(tracking_uri))
    killed = [run for run in children if run.info.status == "KILLED"]
    assert parent.info.status == "KILLED" and killed and len(children) < 4  # the last jobs never started
    assert all(run.info.status in ("KILLED", "FINISHED") for run in children)
    assert line.startswith(f"Sweep {parent.info.run_id} interrupted: ") and line.count("resume=") == len(killed)

    # The line's first command goes on with its run, to FINISHED.
    command = re.search(r"go on with: (python -m rl_pipeline [^;]+)", line).group(1).split()
    resumed = run_module(*command[2:], f"hydra.run.dir={tmp_path / 'resumed'}", cwd=tmp_path, tracking_uri=tracking_uri)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert mlflow.MlflowClient(tracking_uri).get_run(command[-1].removeprefix("resume=")).info.status == "FINISHED"


def test_a_grid_sweep_killed_mid_job_resumes_under_its_parent_without_rerunning_finished_jobs(tmp_path, tracking_uri):
    budget = [o for o in TINY_RUN if not o.startswith("trainer.max_env_steps=")] + [
        "trainer.max_env_steps=4096", "trainer.stop_when_solved=false", "trainer.checkpoint_interval_env_steps=1024"]
    grid = ("+experiment=dqn", "seed=0,1,2", *budget)
    sweep = start_module("rl_pipeline", "-m", *grid, f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
                         tracking_uri=tracking_uri, start_new_session=True)
    try:
        said = "".join(read_until(sweep, f"{tmp_path / 'sweep' / '1'}/checkpoints/last.ckpt at 1024 env steps"))
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait(timeout=60)
    finally:
        sweep.kill()
    sweep_id = re.search(r"MLflow sweep (\w+):", said).group(1)
    _, before = parent_and_children(all_runs(tracking_uri))
    before = {run.data.params["seed"]: run for run in before}
    assert before["0"].info.status == "FINISHED" and before["1"].info.status == "RUNNING" and "2" not in before

    run_sweep(*grid, f"resume={sweep_id}", cwd=tmp_path, tracking_uri=tracking_uri)
    parent, after = parent_and_children(all_runs(tracking_uri))
    after = {run.data.params["seed"]: run for run in after}
    assert parent.info.run_id == sweep_id and parent.info.status == "FINISHED" and sorted(after) == ["0", "1", "2"]
    assert after["0"].info.run_id == before["0"].info.run_id and after["0"].info.end_time == before["0"].info.end_time
    assert after["1"].info.run_id == before["1"].info.run_id  # resumed from its checkpoint, not started anew
    client = mlflow.MlflowClient(tracking_uri)
    for run in after.values():
        assert run.info.status == "FINISHED" and run.data.metrics["final/env_steps"] == 4096
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/epsilon")]
        assert steps == list(range(256, 4097, 256))  # every iteration once, the resumed run's too


def test_a_sweep_is_not_resumed_while_its_process_still_runs_it(tmp_path, tracking_uri):
    grid = ("+experiment=dqn", "seed=0,1", *TINY_RUN)
    sweep = start_module("rl_pipeline", "-m", *grid, f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
                         tracking_uri=tracking_uri, start_new_session=True)
    try:
        said = "".join(read_until(sweep, "MLflow sweep "))
        os.killpg(sweep.pid, signal.SIGSTOP)  # alive, and holding the sweep, while a second process tries it
        sweep_id = re.search(r"MLflow sweep (\w+):", said).group(1)
        refused = run_module("rl_pipeline", "-m", *grid, f"resume={sweep_id}", cwd=tmp_path, tracking_uri=tracking_uri)
        parent, children = parent_and_children(all_runs(tracking_uri))
        os.killpg(sweep.pid, signal.SIGCONT)
        sweep.communicate(timeout=300)
    finally:
        sweep.kill()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"Config error: resume: sweep {sweep_id} is being run by another process on this machine (pid {sweep.pid}); "
        "resume it once that process has stopped")
    assert parent.info.status == "RUNNING" and len(children) <= 1  # as the first process left it: no job started twice

    assert sweep.returncode == 0
    parent, children = parent_and_children(all_runs(tracking_uri))
    assert parent.info.status == "FINISHED" and sorted(run.data.params["seed"] for run in children) == ["0", "1"]
