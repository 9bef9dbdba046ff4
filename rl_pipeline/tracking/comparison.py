"""Compare runs: a row per configuration (its seeds together), a row per run, and each configuration's curve."""

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from rl_pipeline.tracking import mlflow_runs, statistics
from rl_pipeline.tracking.plots import Curve, plot_curves
from rl_pipeline.tracking.statistics import Estimate

EVAL_METRIC = "eval/return_mean"
RESULT_METRIC = "test/return_mean"  # a run's result: its exported policy's return on held-out seeds
SOLVED_METRIC = "final/solved_env_steps"
IMPROVEMENT_METRIC = "best/probability_of_improvement"  # on a sweep's parent: P(a best run beats a runner-up run)
SWEPT_KEYS_TAG = "swept_keys"  # on a sweep's parent: what the sweep varies, as a JSON list of override keys


def sweep_children(client: mlflow.MlflowClient, parent: Run) -> list[Run]:
    return list(mlflow_runs.search_runs(
        client, [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    ))


def find_runs(client: mlflow.MlflowClient, target: str) -> tuple[list[Run], list[str], str]:
    """The runs that `target` names (a sweep id or an experiment name), what tells their configurations apart, a title."""
    try:
        parent = client.get_run(target)
    except MlflowException:
        experiment = client.get_experiment_by_name(target)
        if experiment is None:
            raise SystemExit(f"compare: {target!r} is neither a sweep id (a run id) nor an experiment name")
        runs = [run for run in mlflow_runs.search_runs(client, [experiment.experiment_id]) if not is_sweep(run)]
        return runs, varied_params(runs), f"experiment {target}"
    children = sweep_children(client, parent)
    return children, configuration_keys(parent, children), parent.info.run_name


def is_sweep(run: Run) -> bool:
    return run.data.tags.get("sweep_role") == "parent"


def configuration_keys(parent: Run, children: list[Run]) -> list[str]:
    """What the sweep varies besides the seed."""
    swept = parent.data.tags.get(SWEPT_KEYS_TAG)
    keys = json.loads(swept) if swept else varied_params(children)
    return [key for key in keys if key != "seed"]


def varied_params(runs: list[Run]) -> list[str]:
    """The params whose values differ between runs, the seed aside."""
    keys = sorted({key for run in runs for key in run.data.params if key != "seed"})
    return [key for key in keys if len({run.data.params.get(key) for run in runs}) > 1]


def configuration(run: Run, keys: list[str]) -> str:
    """What sets a run apart from the others, seed aside: the label its seeds are aggregated under."""
    return ",".join(f"{key}={run.data.params.get(key)}" for key in keys) or "all runs"


@dataclass
class RunRow:
    run_id: str
    run_name: str
    configuration: str
    seed: str
    test_return: float | None
    solved_env_steps: float | None
    wall_seconds: float | None
    status: str

    @classmethod
    def of(cls, run: Run, keys: list[str]) -> "RunRow":
        metrics = run.data.metrics
        return cls(
            run.info.run_id,
            run.info.run_name,
            configuration(run, keys),
            run.data.params.get("seed", ""),
            metrics.get(RESULT_METRIC),
            metrics.get(SOLVED_METRIC),
            metrics.get("final/wall_seconds"),
            run.info.status,
        )

    @property
    def scored(self) -> bool:
        return self.status == "FINISHED" and self.test_return is not None


@dataclass
class ConfigurationRow:
    """One configuration over its seeds: the test return's IQM, mean and median with their 95% bootstrap
    intervals (statistics.py), how often and how fast it solved."""

    configuration: str
    runs: int
    iqm: Estimate
    mean: Estimate
    median: Estimate
    solved_fraction: float
    median_solved_env_steps: float | None  # over the runs that solved
    run_ids: str
    test_returns: tuple[float, ...]

    @classmethod
    def of(cls, label: str, rows: list[RunRow]) -> "ConfigurationRow":
        returns = tuple(row.test_return for row in rows)
        summary = statistics.summarize([np.array(returns)])
        solved = [row.solved_env_steps for row in rows if row.solved_env_steps is not None]
        return cls(
            label, len(rows), summary["iqm"], summary["mean"], summary["median"],
            len(solved) / len(rows), float(np.median(solved)) if solved else None,
            " ".join(row.run_id for row in rows), returns,
        )

    def metrics(self, prefix: str) -> dict[str, float]:
        """For a sweep's parent run: what its table sorts by (SUMMARY_METRICS, those that apply)."""
        metrics = {f"{prefix}/solved_fraction": self.solved_fraction, f"{prefix}/runs": float(self.runs)}
        for name in statistics.AGGREGATES:
            estimate = getattr(self, name)
            metrics[f"{prefix}/test_return_{name}"] = estimate.value
            if not np.isnan(estimate.low):
                metrics |= {f"{prefix}/test_return_{name}_low": estimate.low, f"{prefix}/test_return_{name}_high": estimate.high}
        if self.median_solved_env_steps is not None:
            metrics[f"{prefix}/median_solved_env_steps"] = self.median_solved_env_steps
        return metrics

    def cells(self) -> list[str]:
        estimates = (_cell(value) for name in statistics.AGGREGATES for value in vars(getattr(self, name)).values())
        return [
            self.configuration, str(self.runs), *estimates, _cell(self.solved_fraction),
            _cell(self.median_solved_env_steps), self.run_ids,
        ]


SUMMARY_METRICS = (
    *(f"test_return_{name}{bound}" for name in statistics.AGGREGATES for bound in ("", "_low", "_high")),
    "solved_fraction", "runs", "median_solved_env_steps",
)


def configuration_rows(rows: list[RunRow]) -> list[ConfigurationRow]:
    """A row per configuration from its finished runs, best first (highest IQM test return, then most often solved)."""
    groups: dict[str, list[RunRow]] = {}
    for row in rows:
        if row.scored:
            groups.setdefault(row.configuration, []).append(row)
    configurations = [ConfigurationRow.of(label, group) for label, group in groups.items()]
    return sorted(configurations, key=lambda c: (-c.iqm.value, -c.solved_fraction, c.configuration))


def best_against_runner_up(configurations: list[ConfigurationRow]) -> tuple[Estimate | None, str]:
    """The probability that a run of the best configuration beats one of the runner-up, and what it says."""
    if len(configurations) < 2:
        return None, "One configuration: nothing to compare it with."
    best, runner_up = configurations[:2]
    improvement = statistics.probability_of_improvement(best.test_returns, runner_up.test_returns)
    return improvement, statistics.verdict(best.configuration, runner_up.configuration, improvement)


RUN_COLUMNS = ("run id", "run", "configuration", "seed", "test return", "env steps to solve", "wall s", "status")
CONFIGURATION_COLUMNS = (
    "configuration", "runs", "test return IQM", "IQM 95% low", "IQM 95% high", "mean", "mean 95% low", "mean 95% high",
    "median", "median 95% low", "median 95% high", "solved fraction", "median env steps to solve", "run ids",
)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def write_tables(configurations: list[ConfigurationRow], runs: list[RunRow], directory: Path, verdict: str) -> list[Path]:
    """configurations.csv, runs.csv, and both tables in comparison.md under the verdict on the best."""
    tables = {
        "configurations": (CONFIGURATION_COLUMNS, [row.cells() for row in configurations]),
        "runs": (RUN_COLUMNS, [[_cell(v) for v in vars(row).values()] for row in runs]),
    }
    paths, lines = [], [verdict, ""]
    for name, (columns, cells) in tables.items():
        path = directory / f"{name}.csv"
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([columns, *cells])
        paths.append(path)
        lines += [f"## {name.capitalize()}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row) + " |" for row in cells] + [""]
    markdown = directory / "comparison.md"
    markdown.write_text("\n".join(lines))
    return [markdown, *paths]


def on_grid(steps: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """A run's curve on a shared grid: its last value holds after it stopped (solved runs stay solved)."""
    index = np.searchsorted(steps, grid, side="right") - 1
    return np.where(index >= 0, values[np.clip(index, 0, None)], np.nan)


def aggregated_curves(client: mlflow.MlflowClient, runs: list[Run], keys: list[str]) -> list[Curve]:
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(configuration(run, keys), []).append(mlflow_runs.metric_curve(client, run.info.run_id, EVAL_METRIC))
    curves = []
    for label, seed_curves in sorted(groups.items()):
        grid = np.unique(np.concatenate([steps for steps, _ in seed_curves]))
        stacked = np.stack([on_grid(steps, values, grid) for steps, values in seed_curves])
        started = ~np.isnan(stacked).any(axis=0)  # where every seed has been evaluated
        center, low, high = statistics.band(stacked[:, started])
        curves.append(Curve(f"{label} (IQM of {len(seed_curves)})", grid[started], center, low, high))
    return curves


@dataclass
class Report:
    configurations: list[ConfigurationRow]  # best first
    runs: list[RunRow]
    improvement: Estimate | None  # P(a run of the best beats one of the runner-up)
    verdict: str
    paths: list[Path]  # comparison.md, configurations.csv, runs.csv, comparison.png


def write_report(client: mlflow.MlflowClient, runs: list[Run], keys: list[str], directory: Path, title: str) -> Report:
    """The tables and the curves of `runs`, configurations told apart by `keys`, in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = sorted((RunRow.of(run, keys) for run in runs), key=lambda row: (row.configuration, row.seed))
    configurations = configuration_rows(rows)
    finished = [run for run in runs if run.info.status == "FINISHED"]
    plot = plot_curves(aggregated_curves(client, finished, keys), directory / "comparison.png", title)
    improvement, verdict = best_against_runner_up(configurations)
    tables = write_tables(configurations, rows, directory, verdict)
    return Report(configurations, rows, improvement, verdict, [*tables, plot])

