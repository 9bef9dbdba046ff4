import csv
import json

import mlflow
import numpy as np
import pytest
from mlflow.entities import Metric, Param
from scipy import stats

from rl_pipeline.compare import main as compare_main
from rl_pipeline.run.sweeps import swept_keys
from rl_pipeline.tracking.comparison import (
    RESULT_METRIC,
    SUMMARY_METRICS,
    SWEPT_KEYS_TAG,
    RunRow,
    aggregate,
    configuration_rows,
    find_runs,
    interquartile_mean,
    on_grid,
    write_report,
)


def test_interquartile_mean_drops_the_outer_quarters():
    # 8 seeds: the middle four are 3, 4, 5, 6
    values = np.array([[1.0], [100], [3], [4], [5], [6], [-50], [8]])
    assert interquartile_mean(values)[0] == pytest.approx(np.mean([3, 4, 5, 6]))


def test_a_stopped_run_holds_its_last_value_on_the_shared_grid():
    curve = on_grid(np.array([10, 20]), np.array([1.0, 2.0]), np.array([5, 10, 15, 20, 30]))
    np.testing.assert_array_equal(curve, [np.nan, 1.0, 1.0, 2.0, 2.0])


def test_bootstrap_band_contains_the_center_and_shrinks_with_agreement():
    rng = np.random.default_rng(0)
    spread = np.array([[0.0, 10.0], [100.0, 10.0], [50.0, 10.0]])  # seeds disagree at t0, agree at t1
    center, low, high = aggregate(spread, rng)
    np.testing.assert_allclose(center, [50.0, 10.0])
    assert np.all(low <= center) and np.all(center <= high)
    assert high[0] - low[0] > 30 and high[1] == low[1] == 10.0


def test_five_seeds_aggregate_by_interquartile_mean():
    five = np.array([[0.0], [10.0], [20.0], [30.0], [1000.0]])
    center, _, _ = aggregate(five, np.random.default_rng(0))
    assert center[0] == pytest.approx(np.mean([10.0, 20.0, 30.0]))


def test_swept_keys_are_the_sweep_overrides_and_the_sweepers_params():
    overrides = ["+experiment=dqn", "seed=0,1,2", "optimizer.lr=1e-3,3e-4", "trainer.max_env_steps=5000"]
    assert swept_keys(overrides, None) == ["seed", "optimizer.lr"]
    assert swept_keys(["+experiment=dqn"], {"buffer.batch_size": "choice(64, 128)"}) == ["buffer.batch_size"]


def run_row(run_id: str, configuration: str, test_return: float, solved_env_steps=None, status="FINISHED") -> RunRow:
    return RunRow(run_id, run_id, configuration, "0", test_return, solved_env_steps, 10.0, status)


def test_a_configuration_row_holds_its_seeds_mean_spread_interval_solved_fraction_and_median_steps():
    rows = [
        run_row("a", "lr=1", 500.0, 20_000), run_row("b", "lr=1", 470.0, 30_000), run_row("c", "lr=1", 440.0),
        run_row("d", "lr=1", 499.0, 40_000), run_row("e", "lr=2", 200.0), run_row("f", "lr=2", None, status="FAILED"),
    ]
    best, other = configuration_rows(rows)
    assert (best.configuration, best.runs, best.run_ids) == ("lr=1", 4, "a b c d")
    assert best.test_return_mean == np.mean([500, 470, 440, 499])
    assert best.test_return_std == pytest.approx(np.std([500, 470, 440, 499], ddof=1))
    half_width = stats.t.ppf(0.975, 3) * best.test_return_std / 2  # n = 4 seeds
    mean = best.test_return_mean
    assert (best.ci_low, best.ci_high) == pytest.approx((mean - half_width, mean + half_width))
    assert best.solved_fraction == 0.75 and best.median_solved_env_steps == 30_000  # over the three that solved
    # One finished run: no interval, no median; the failed run is in no configuration row.
    assert (other.configuration, other.runs, other.ci_low, other.median_solved_env_steps) == ("lr=2", 1, None, None)
    assert other.metrics("best") == {
        "best/test_return_mean": 200.0, "best/test_return_std": 0.0, "best/solved_fraction": 0.0, "best/runs": 1.0,
    }
    assert set(best.metrics("sweep")) == {f"sweep/{name}" for name in SUMMARY_METRICS}


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


def test_compare_reads_every_child_past_mlflows_page_of_1000_runs(tmp_path, tracking_uri, monkeypatch):
    client = mlflow.MlflowClient(tracking_uri)
    sweep_id = a_sweep(client, ["seed"], [{"seed": str(seed)} for seed in range(1005)])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    compare_main([sweep_id, "--out", str(tmp_path / "report")])
    with open(tmp_path / "report" / "runs.csv") as runs_csv:
        rows = list(csv.DictReader(runs_csv))
    assert len(rows) == 1005 and len({row["run id"] for row in rows}) == 1005
