"""Sweeps beyond one process: Hydra's Ray and submitit launchers, every job logging to one MLflow server
on a real PostgreSQL database. Each launcher runs in the environment of its own extra:

    pip install -e '.[test,ray,postgres]'    && python -m pytest -m ray
    pip install -e '.[test,slurm,postgres]'  && python -m pytest -m submitit

Elsewhere these tests are skipped, naming the extra they need.
"""

import itertools

import mlflow
import optuna
import pytest
import torch
from conftest import PRUNABLE, TINY_RUN, all_runs, run_module

from benchmarks import services

SWEEP = ("+experiment=dqn", "seed=0,1", "optimizer.lr=0.001,0.0003", *TINY_RUN, "trainer.test_episodes=5")
COMPARISON = {f"comparison/{name}" for name in ("comparison.md", "configurations.csv", "runs.csv", "comparison.png")}


def needs(plugin: str, extra: str) -> None:
    pytest.importorskip(f"hydra_plugins.{plugin}", reason=f"needs pip install -e '.[{extra}]'")


@pytest.fixture(scope="module")
def lab_database():
    """A real PostgreSQL server: its first database's SQLAlchemy URI."""
    pytest.importorskip("psycopg", reason="needs pip install -e '.[postgres]'")
    with services.postgres() as database:
        yield database


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory, lab_database):
    """A real `mlflow server` (2 workers) on the PostgreSQL database, with an artifact root: a lab's server."""
    artifacts = tmp_path_factory.mktemp("lab") / "artifacts"
    with services.mlflow_server(lab_database, artifacts, workers=2) as url:
        yield url


@pytest.fixture
def study_storage(lab_database, request):
    """A database of its own on the lab's PostgreSQL server, for one test's Optuna studies."""
    return services.create_database(lab_database, f"optuna_{request.node.callspec.id}")


@pytest.fixture
def ray_cluster():
    needs("hydra_ray_launcher", "ray")
    with services.ray_head(num_cpus=2) as address:
        yield address


@pytest.fixture
def submitit():
    needs("hydra_submitit_launcher", "slurm")


def run_sweep(*args: str, experiment: str, server: str, cwd) -> None:
    result = run_module("rl_pipeline", "-m", *args, f"logger.experiment_name={experiment}", cwd=cwd,
                        tracking_uri=server, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


def sweep_in_store(server: str, experiment: str, jobs: int):
    """The experiment's one parent run and its children, all FINISHED."""
    client = mlflow.MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [run for run in runs if run.data.tags.get("sweep_role") == "parent"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == jobs + 1 and len(children) == jobs
    assert [run.info.status for run in runs] == ["FINISHED"] * len(runs)
    return client, parent, children


def check_four_job_sweep(server: str, experiment: str) -> None:
    """4 FINISHED children under one parent, each with its metrics, model and one torch thread; the
    parent holds the comparison and the best configuration."""
    client, parent, children = sweep_in_store(server, experiment, jobs=4)
    settings = {(run.data.params["seed"], run.data.params["optimizer.lr"]) for run in children}
    assert settings == set(itertools.product(("0", "1"), ("0.001", "0.0003")))
    for run in children:
        assert {"train/loss", "eval/return_mean", "test/return_mean"} <= set(run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "train/epsilon")) == 4  # every iteration
        assert run.data.tags["torch_threads"] == "1"  # the 1 CPU each job was given, on a 2-core machine
    mlflow.set_tracking_uri(server)  # where runs:/ URIs resolve
    policy = mlflow.pytorch.load_model(f"runs:/{children[0].info.run_id}/model")
    assert policy(torch.zeros(3, 4)).shape == (3, 2)
    assert COMPARISON <= {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    best = parent.data.tags["best_run_id"]
    assert best in {run.info.run_id for run in children}
    assert parent.data.tags["best.optimizer.lr"] == client.get_run(best).data.params["optimizer.lr"]
    assert parent.data.metrics["sweep/runs"] == 4.0


@pytest.mark.ray
def test_ray_sweep_runs_four_jobs_on_the_cluster_logging_to_the_postgres_backed_server(
    tmp_path, lab_server, ray_cluster
):
    run_sweep("hydra/launcher=ray", f"hydra.launcher.ray.init.address={ray_cluster}", *SWEEP,
              experiment="ray", server=lab_server, cwd=tmp_path)
    check_four_job_sweep(lab_server, "ray")


@pytest.mark.submitit
def test_submitit_local_sweep_runs_the_same_four_jobs(tmp_path, lab_server, submitit):
    run_sweep("hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1", *SWEEP,
              experiment="submitit", server=lab_server, cwd=tmp_path)
    check_four_job_sweep(lab_server, "submitit")


@pytest.mark.submitit
def test_eight_jobs_logging_at_once_to_the_postgres_backed_server_lose_nothing(tmp_path, lab_server, submitit):
    run_sweep("hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1", "+experiment=dqn",
              "seed=range(8)", *TINY_RUN, "trainer.max_env_steps=2048",  # long enough for 8 process starts to overlap
              "trainer.test_episodes=5", experiment="eight", server=lab_server, cwd=tmp_path)

    client, parent, children = sweep_in_store(lab_server, "eight", jobs=8)
    assert max(run.info.start_time for run in children) < min(run.info.end_time for run in children), \
        "the 8 jobs ran at once"
    for run in children:
        for key, logged in (("train/epsilon", 8), ("eval/return_mean", 4), ("test/return_mean", 1)):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == logged and len(set(steps)) == logged, (key, steps)
    assert sorted(run.data.params["seed"] for run in children) == [str(seed) for seed in range(8)]


@pytest.mark.parametrize("launcher", [
    pytest.param(("ray", "hydra_ray_launcher", "ray"), marks=pytest.mark.ray, id="ray"),
    pytest.param(("submitit_local", "hydra_submitit_launcher", "slurm"), marks=pytest.mark.submitit, id="submitit"),
])
def test_an_optuna_search_prunes_across_the_launchers_jobs_with_its_study_in_postgres(
    tmp_path, lab_server, study_storage, launcher, request
):
    name, plugin, extra = launcher
    needs(plugin, extra)
    where = [f"hydra.launcher.ray.init.address={request.getfixturevalue('ray_cluster')}"] if name == "ray" else [
        "hydra.launcher.cpus_per_task=1"]
    run_sweep(f"hydra/launcher={name}", *where, *PRUNABLE, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
              f"hydra.sweeper.storage={study_storage}", experiment=f"search-{name}", server=lab_server, cwd=tmp_path)

    client, parent, children = sweep_in_store(lab_server, f"search-{name}", jobs=4)
    assert parent.data.tags["optuna.storage"] == study_storage
    study = optuna.load_study(study_name=parent.data.tags["optuna.study_name"], storage=study_storage)
    states = {trial.number: trial.state.name for trial in study.trials}
    assert states == {int(run.data.tags["optuna.trial_number"]): run.data.tags["optuna.trial_state"] for run in children}
    assert "PRUNED" in states.values() and "COMPLETE" in states.values()
    assert all(run.data.tags["torch_threads"] == "1" for run in children)
    for run in children:  # each job reported its evaluations to its trial from where the launcher ran it
        trial = study.trials[int(run.data.tags["optuna.trial_number"])]
        assert sorted(trial.intermediate_values) == [m.step for m in client.get_metric_history(
            run.info.run_id, "eval/return_lower_bound")]


def test_a_launcher_whose_plugin_is_missing_is_one_line_naming_its_extra(tmp_path, tracking_uri):
    try:
        import hydra_plugins.hydra_ray_launcher  # noqa: F401
        pytest.skip("hydra-ray-launcher is installed here")
    except ImportError:
        pass
    result = run_module("rl_pipeline", "-m", "hydra/launcher=ray", "seed=0,1", cwd=tmp_path, tracking_uri=tracking_uri)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "Config error: hydra/launcher: expected an installed launcher, got "
        "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher "
        "(No module named 'hydra_plugins.hydra_ray_launcher'); pip install -e '.[ray]'"
    ]
    assert not all_runs(tracking_uri)


@pytest.mark.parametrize("launcher", [
    pytest.param(("ray", "hydra_ray_launcher", "ray", "RayLauncher"), marks=pytest.mark.ray, id="ray"),
    pytest.param(("submitit_slurm", "hydra_submitit_launcher", "slurm", "SlurmLauncher"), marks=pytest.mark.submitit,
                 id="submitit_slurm"),
])
def test_a_launcher_that_runs_jobs_on_other_machines_refuses_the_embedded_store(tmp_path, tracking_uri, launcher):
    name, plugin, extra, launcher_class = launcher
    needs(plugin, extra)
    result = run_module("rl_pipeline", "-m", f"hydra/launcher={name}", "seed=0,1", cwd=tmp_path, tracking_uri=tracking_uri)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "Config error: MLFLOW_TRACKING_URI: expected an MLflow server (http://HOST:PORT) that every job can reach, "
        f"got the SQLite file {tracking_uri}, which {launcher_class}'s jobs on other machines cannot"
    ]
    assert not all_runs(tracking_uri)
