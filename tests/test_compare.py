import csv
import json

import mlflow
import numpy as np
import pytest
from mlflow.entities import Metric, Param

from rl_pipeline.compare import main as compare_main
from rl_pipeline.run.sweeps import swept_keys
from rl_pipeline.tracking.comparison import (
    RESULT_METRIC,
    SUMMARY_METRICS,
    SWEPT_KEYS_TAG,
    RunRow,
    best_against_runner_up,
    configuration_rows,
    find_runs,
    on_grid,
    write_report,
)


def test_a_stopped_run_holds_its_last_value_on_the_shared_grid():
    curve = on_grid(np.array([10, 20]), np.array([1.0, 2.0]), np.array([5, 10, 15, 20, 30]))
    np.testing.assert_array_equal(curve, [np.nan, 1.0, 1.0, 2.0, 2.0])


def test_swept_keys_are_the_sweep_overrides_and_the_sweepers_params():
    overrides = ["+experiment=dqn", "seed=0,1,2", "optimizer.lr=1e-3,3e-4", "trainer.max_env_steps=5000"]
    assert swept_keys(overrides, None) == ["seed", "optimizer.lr"]
    assert swept_keys(["+experiment=dqn"], {"buffer.batch_size": "choice(64, 128)"}) == ["buffer.batch_size"]


def run_row(run_id: str, configuration: str, test_return: float, solved_env_steps=None, status="FINISHED") -> RunRow:
    return RunRow(run_id, run_id, configuration, "0", test_return, solved_env_steps, 10.0, status)


def test_a_configuration_row_holds_its_seeds_iqm_mean_median_intervals_solved_fraction_and_median_steps():
    rows = [
        run_row("a", "lr=1", 500.0, 20_000), run_row("b", "lr=1", 470.0, 30_000), run_row("c", "lr=1", 440.0),
        run_row("d", "lr=1", 499.0, 40_000), run_row("e", "lr=2", 200.0), run_row("f", "lr=2", None, status="FAILED"),
    ]
    best, other = configuration_rows(rows)
    assert (best.configuration, best.runs, best.run_ids) == ("lr=1", 4, "a b c d")
    assert best.iqm.value == pytest.approx(np.mean([470, 499]))  # 4 seeds: the lowest and highest trimmed
    assert best.mean.value == pytest.approx(np.mean([500, 470, 440, 499]))
    assert best.median.value == pytest.approx(484.5)
    for estimate in (best.iqm, best.mean, best.median):
        assert 440 <= estimate.low <= estimate.value <= estimate.high <= 500  # never beyond the seeds' returns
    assert best.solved_fraction == 0.75 and best.median_solved_env_steps == 30_000  # over the three that solved
    # One finished run: no interval, no median; the failed run is in no configuration row.
    assert (other.configuration, other.runs, other.median_solved_env_steps) == ("lr=2", 1, None)
    assert other.metrics("best") == {
        "best/test_return_iqm": 200.0, "best/test_return_mean": 200.0, "best/test_return_median": 200.0,
        "best/solved_fraction": 0.0, "best/runs": 1.0,
    }
    assert set(best.metrics("sweep")) == {f"sweep/{name}" for name in SUMMARY_METRICS}


def test_the_best_is_ranked_by_iqm_and_compared_with_the_runner_up():
    rows = [run_row(f"a{i}", "lr=1", r) for i, r in enumerate([500.0, 500, 500, 10])]  # mean 377.5, IQM 500
    rows += [run_row(f"b{i}", "lr=2", r) for i, r in enumerate([400.0, 410, 420, 430])]  # mean 415, IQM 415
    best, runner_up = configuration_rows(rows)
    assert (best.configuration, runner_up.configuration) == ("lr=1", "lr=2")
    improvement, verdict = best_against_runner_up([best, runner_up])
    assert improvement.value == 0.75  # 3 of 4 seeds beat every seed of lr=2
    assert verdict.startswith("lr=1 is not distinguishable from lr=2")
    assert best_against_runner_up([best]) == (None, "One configuration: nothing to compare it with.")


def a_sweep(client: mlflow.MlflowClient, swept: list[str], children: list[dict[str, str]]) -> str:
    """A sweep's parent run and a FINISHED child per params dict, each with a test return; the sweep's id."""
    experiment_id = client.create_experiment("sweep")
    parent = client.create_run(experiment_id, tags={"sweep_role": "parent", SWEPT_KEYS_TAG: json.dumps(swept)})
    sweep_id = parent.info.run_id
    for number, params in enumerate(children):
        run_id = client.create_run(experiment_id, tags={"mlflow.parentRunId": sweep_id}).info.run_id
        client.log_batch(run_id, metrics=[Metric(RESULT_METRIC, float(number), 0, 0)],
                         params=[Param(key, value) for key, value in params.items()])
        client.set_terminated(run_id)
    return sweep_id


def test_a_sweep_pools_its_seeds_into_one_row_per_configuration(tmp_path, tracking_uri):
    client = mlflow.MlflowClient(tracking_uri)
    grid = [{"seed": str(seed), "optimizer.lr": lr} for lr in ("0.001", "0.01") for seed in range(3)]
    sweep_id = a_sweep(client, ["seed", "optimizer.lr"], grid)
    runs, keys, _ = find_runs(client, sweep_id)
    assert keys == ["optimizer.lr"]
    report = write_report(client, runs, keys, tmp_path, "sweep")
    assert [(row.configuration, row.runs) for row in report.configurations] == [
        ("optimizer.lr=0.01", 3), ("optimizer.lr=0.001", 3)
    ]
    # The children's test returns are their numbers: 0, 1, 2 for lr=0.001 and 3, 4, 5 for lr=0.01.
    with open(tmp_path / "configurations.csv") as configurations_csv:
        best, runner_up = csv.DictReader(configurations_csv)
    assert (float(best["test return IQM"]), float(best["median"]), float(runner_up["mean"])) == (4.0, 4.0, 1.0)
    assert 3.0 <= float(best["IQM 95% low"]) <= 4.0 <= float(best["IQM 95% high"]) <= 5.0
    assert report.improvement.value == 1.0  # every lr=0.01 run beats every lr=0.001 run
    assert (tmp_path / "comparison.md").read_text().startswith(
        "optimizer.lr=0.01 beats optimizer.lr=0.001: P(improvement) 1 [1, 1], its interval above 0.5.")


def test_compare_reads_every_child_past_mlflows_page_of_1000_runs(tmp_path, tracking_uri, monkeypatch):
    client = mlflow.MlflowClient(tracking_uri)
    sweep_id = a_sweep(client, ["seed"], [{"seed": str(seed)} for seed in range(1005)])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    compare_main([sweep_id, "--out", str(tmp_path / "report")])
    with open(tmp_path / "report" / "runs.csv") as runs_csv:
        rows = list(csv.DictReader(runs_csv))
    assert len(rows) == 1005 and len({row["run id"] for row in rows}) == 1005
