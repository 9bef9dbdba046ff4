"""Compare runs: a table and a learning-curve plot with the seeds of each configuration aggregated.

    python -m rl_pipeline.compare <sweep id | experiment name> [--out DIR]

A sweep id is the run id of a sweep's parent run (its `sweep_id` tag); the report covers its child
runs. An experiment name covers every run of that experiment but the sweep parents.
"""

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from rl_pipeline import tracking
from rl_pipeline.plots import Curve, plot_curves

EVAL_METRIC = "eval/return_mean"
RESULT_METRIC = "test/return_mean"  # a run's result: its exported policy's return on held-out seeds
IQM_MIN_SEEDS = 5


def sweep_children(client: mlflow.MlflowClient, parent: Run) -> list[Run]:
    return client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )


def find_runs(client: mlflow.MlflowClient, target: str) -> tuple[list[Run], str]:
    """The runs that `target` names (a sweep id or an experiment name), and a title for them."""
    try:
        parent = client.get_run(target)
    except MlflowException:
        experiment = client.get_experiment_by_name(target)
        if experiment is None:
            raise SystemExit(f"compare: {target!r} is neither a sweep id (a run id) nor an experiment name")
        runs = client.search_runs([experiment.experiment_id])
        return [run for run in runs if run.data.tags.get("sweep_role") != "parent"], f"experiment {target}"
    return sweep_children(client, parent), parent.info.run_name


def varied_params(runs: list[Run]) -> list[str]:
    """The params whose values differ between runs (where each job writes is not a setting)."""
    keys = sorted({key for run in runs for key in run.data.params if not key.startswith("paths.")})
    return [key for key in keys if len({run.data.params.get(key) for run in runs}) > 1]


def configuration(run: Run, keys: list[str]) -> str:
    """What sets a run apart from the others, seed aside: the label its seeds are aggregated under."""
    parts = [f"{name}={run.data.params.get(key)}" for key in keys if (name := key.rsplit(".", 1)[-1]) != "seed"]
    return ",".join(parts) or "all runs"


@dataclass
class Row:
    run_name: str
    configuration: str
    seed: str
    test_return: float | None
    solved_env_steps: float | None
    wall_seconds: float | None
    status: str

    @classmethod
    def of(cls, run: Run, keys: list[str]) -> "Row":
        metrics = run.data.metrics
        return cls(
            run.info.run_name,
            configuration(run, keys),
            run.data.params.get("seed", ""),
            metrics.get(RESULT_METRIC),
            metrics.get("final/solved_env_steps"),
            metrics.get("final/wall_seconds"),
            run.info.status,
        )


COLUMNS = ("run", "configuration", "seed", "test return", "env steps to solve", "wall s", "status")


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def write_table(rows: list[Row], directory: Path) -> list[Path]:
    cells = [[_cell(v) for v in vars(row).values()] for row in rows]
    csv_path, md_path = directory / "comparison.csv", directory / "comparison.md"
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows([COLUMNS, *cells])
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def interquartile_mean(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean of the middle 50% along `axis` (rliable's IQM): robust to one outlying seed."""
    ordered = np.sort(values, axis=axis)
    n = values.shape[axis]
    return np.take(ordered, np.arange(n // 4, n - n // 4), axis=axis).mean(axis=axis)


def aggregate(curves: np.ndarray, rng: np.random.Generator, resamples: int = 2000) -> tuple[np.ndarray, ...]:
    """Center (IQM from 5 seeds, else mean) and its 95% bootstrap band, over seeds (axis 0)."""
    statistic = interquartile_mean if len(curves) >= IQM_MIN_SEEDS else np.mean
    picks = rng.integers(len(curves), size=(resamples, len(curves)))
    boot = np.stack([statistic(curves[p], axis=0) for p in picks])
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    return statistic(curves, axis=0), low, high


def on_grid(steps: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """A run's curve on a shared grid: its last value holds after it stopped (solved runs stay solved)."""
    index = np.searchsorted(steps, grid, side="right") - 1
    return np.where(index >= 0, values[np.clip(index, 0, None)], np.nan)


def aggregated_curves(client: mlflow.MlflowClient, runs: list[Run], keys: list[str]) -> list[Curve]:
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(configuration(run, keys), []).append(tracking.metric_curve(client, run.info.run_id, EVAL_METRIC))
    rng = np.random.default_rng(0)
    curves = []
    for label, seed_curves in sorted(groups.items()):
        grid = np.unique(np.concatenate([steps for steps, _ in seed_curves]))
        stacked = np.stack([on_grid(steps, values, grid) for steps, values in seed_curves])
        started = ~np.isnan(stacked).any(axis=0)  # where every seed has been evaluated
        center, low, high = aggregate(stacked[:, started], rng)
        stat = "IQM" if len(seed_curves) >= IQM_MIN_SEEDS else "mean"
        curves.append(Curve(f"{label} ({stat} of {len(seed_curves)})", grid[started], center, low, high))
    return curves


def write_report(client: mlflow.MlflowClient, runs: list[Run], directory: Path, title: str) -> list[Path]:
    """comparison.csv, comparison.md and comparison.png in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = varied_params(runs)
    rows = sorted((Row.of(run, keys) for run in runs), key=lambda row: (row.configuration, row.seed))
    plot = plot_curves(aggregated_curves(client, runs, keys), directory / "comparison.png", title)
    return [*write_table(rows, directory), plot]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rl_pipeline.compare", description=__doc__.split("\n")[0])
    parser.add_argument("target", help="a sweep id (the sweep's parent run id) or an experiment name")
    parser.add_argument("--out", type=Path, help="where to write the report (default: outputs/compare/TARGET)")
    args = parser.parse_args(argv)
    client = mlflow.MlflowClient(tracking.tracking_uri())
    runs, title = find_runs(client, args.target)
    if not runs:
        raise SystemExit(f"compare: no runs found for {args.target!r}")
    out = args.out or Path("outputs") / "compare" / args.target
    paths = write_report(client, runs, out, title)
    print(paths[1].read_text(), end="")
    print(f"Wrote {', '.join(str(p) for p in paths)}")


if __name__ == "__main__":
    main()
