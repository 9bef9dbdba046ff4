"""One 8-job CartPole sweep through each launcher, all logging to an MLflow server on PostgreSQL, and
what that server sustains with 8 writers at once.

    pip install -e '.[ray,slurm,postgres]'
    python -m benchmarks.scale_out [--jobs 8] [--env-steps 10000] [--out outputs/benchmarks]

Starts PostgreSQL, an `mlflow server` on it (2 workers) and a Ray head node (2 CPUs) on 127.0.0.1.
Runs `+experiment=dqn seed=range(JOBS)` at a fixed budget (no stop when solved, so every job does
the same work) serially, with joblib (n_jobs=2), with Ray (1 CPU a job) and with submitit_local
(1 CPU a job), one sweep at a time. For each: the sweep's wall seconds and its jobs' own run
durations (MLflow's start to end). Then 8 processes log metric batches as fast as the server
takes them. Writes scale_out.md and scale_out.json to --out.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import psycopg
from mlflow.entities import Metric

from benchmarks import services

LAUNCHERS = {  # name -> (launcher overrides, jobs running at once on 2 cores)
    "serial": ((), 1),
    "joblib-2-jobs": (("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"), 2),
    "ray-1-cpu": (("hydra/launcher=ray", "hydra.launcher.ray.init.address={ray}"), 2),  # a 2-CPU cluster
    "submitit_local-1-cpu": (("hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1"), None),  # all
}
STRESS_SECONDS, STRESS_BATCH = 20, 16  # a pipeline iteration logs about 16 metrics in one batch


def database_bytes(database: str) -> int:
    with psycopg.connect(database.replace("+psycopg", "")) as connection:
        return connection.execute("select pg_database_size(current_database())").fetchone()[0]


def run_sweep(name: str, overrides: tuple, jobs: int, env_steps: int, server: str, database: str, ray: str,
              out: Path) -> dict:
    args = [sys.executable, "-m", "rl_pipeline", "-m", *(o.format(ray=ray) for o in overrides), "+experiment=dqn",
            f"seed=range({jobs})", f"trainer.max_env_steps={env_steps}", "trainer.stop_when_solved=false",
            "trainer.lightning.enable_progress_bar=false", f"logger.experiment_name={name}",
            f"hydra.sweep.dir={out / 'sweeps' / name}"]
    size_before = database_bytes(database)
    started = time.perf_counter()
    result = subprocess.run(args, env={**os.environ, "MLFLOW_TRACKING_URI": server}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"{name}: exit {result.returncode}\n{result.stderr[-3000:]}")
    client = mlflow.MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    children = [run for run in runs if run.data.tags.get("sweep_role") != "parent"]
    durations = [(run.info.end_time - run.info.start_time) / 1000 for run in children]
    assert len(children) == jobs and all(run.info.status == "FINISHED" for run in runs), name
    return {"launcher": name, "wall_s": wall, "job_s_median": statistics.median(durations), "job_s_sum": sum(durations),
            "threads": sorted({run.data.tags["torch_threads"] for run in children}),
            "metric_values": sum(len(client.get_metric_history(run.info.run_id, key))
                                 for run in children for key in run.data.metrics),
            "db_bytes_per_run": (database_bytes(database) - size_before) / jobs}


def write_batches(server: str, experiment_id: str, seconds: float, counts) -> None:
    """One writer: a run, then metric batches as fast as the server answers, for `seconds`."""
    client = mlflow.MlflowClient(server)
    run_id = client.create_run(experiment_id).info.run_id
    batches, step, deadline = 0, 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"m{i}", float(step), now, step) for i in range(STRESS_BATCH)])
        batches, step = batches + 1, step + 1
    client.set_terminated(run_id)
    counts.put(batches)


def stress(server: str, database: str, writers: int) -> dict:
    experiment_id = mlflow.MlflowClient(server).create_experiment(f"stress {time.time()}")
    size_before = database_bytes(database)
    counts = multiprocessing.Queue()
    processes = [multiprocessing.Process(target=write_batches, args=(server, experiment_id, STRESS_SECONDS, counts))
                 for _ in range(writers)]
    for process in processes:
        process.start()
    batches = sum(counts.get() for _ in processes)
    for process in processes:
        process.join()
    return {"writers": writers, "seconds": STRESS_SECONDS, "requests_per_s": batches / STRESS_SECONDS,
            "metric_values_per_s": batches * STRESS_BATCH / STRESS_SECONDS,
            "db_bytes_per_metric_value": (database_bytes(database) - size_before) / (batches * STRESS_BATCH)}


def report(sweeps: list[dict], writes: dict, jobs: int, env_steps: int) -> str:
    serial = sweeps[0]["wall_s"]
    lines = [f"{jobs}-job sweep, experiment=dqn, {env_steps:,} env steps a job, MLflow server on PostgreSQL:", "",
             "| launcher | sweep wall s | x serial | job run s (median) | per-job overhead s | torch threads | "
             "metric values logged | database kB a run |", "|---|---|---|---|---|---|---|---|"]
    for sweep in sweeps:
        at_once = LAUNCHERS[sweep["launcher"]][1] or jobs
        overhead = sweep["wall_s"] * at_once / jobs - sweep["job_s_median"]  # a job's wall share, less its run
        lines.append(f"| {sweep['launcher']} | {sweep['wall_s']:.1f} | {sweep['wall_s'] / serial:.2f} | "
                     f"{sweep['job_s_median']:.1f} | {overhead:.1f} | {', '.join(sweep['threads'])} | "
                     f"{sweep['metric_values']:,} | {sweep['db_bytes_per_run'] / 1024:,.0f} |")
    lines += ["", f"{writes['writers']} writers logging batches of {STRESS_BATCH} metrics for {writes['seconds']} s: "
              f"{writes['requests_per_s']:,.0f} requests/s, {writes['metric_values_per_s']:,.0f} metric values/s; "
              f"the database grew {writes['db_bytes_per_metric_value']:.0f} bytes a metric value."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--env-steps", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks"))
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    artifacts = Path(tempfile.mkdtemp(prefix="rl-pipeline-artifacts-"))
    with services.postgres() as database, services.mlflow_server(database, artifacts, workers=2) as server, \
            services.ray_head(num_cpus=2) as ray:
        sweeps = []
        for name, (overrides, _) in LAUNCHERS.items():
            sweeps.append(run_sweep(name, overrides, args.jobs, args.env_steps, server, database, ray, out))
            print(f"{name}: {sweeps[-1]['wall_s']:.1f} s", flush=True)
        writes = stress(server, database, writers=8)
    text = report(sweeps, writes, args.jobs, args.env_steps)
    print(text)
    (out / "scale_out.md").write_text(text + "\n")
    (out / "scale_out.json").write_text(json.dumps({"sweeps": sweeps, "writes": writes}, indent=1))


if __name__ == "__main__":
    main()
