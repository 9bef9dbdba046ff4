"""What the MLflow UI opens on: saved views that show curves, and the links to them.

MLflow 3's UI keeps its chart layout in the browser, and auto-charts every metric: a metric whose
values are all at step 0 as a bar chart, any other as a line. A saved view is the one layout that
travels with the store: an experiment tag `mlflow.sharedViewState.<key>` holding the page's state,
opened by `?viewStateShareKey=<key>` (the UI's own Views menu lists them). Ours chart the curves,
list the one-value results (test/*, final/*) as table columns, and leave the rest out of sight.
"""

import base64
import json
import time
import zlib
from urllib.parse import quote

import mlflow

from rl_pipeline.tracking import comparison, mlflow_runs, store
from rl_pipeline.tracking.store import DEFAULT_PORT, local_address

VIEW_TAG = "mlflow.sharedViewState."
EXPERIMENT_VIEW = "rl_pipeline-runs"
# What the views chart, section by section: curves against env steps (system metrics against time).
CHARTS = {
    "eval": ["eval/return_mean", "eval/return_lower_bound"],
    "train": [
        "train/episode_return", "train/episode_length", "train/loss", "train/q_mean", "train/grad_norm", "train/lr",
        "train/epsilon",
    ],
    "perf": ["perf/env_steps_per_sec"],
    "system": ["system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"],
}
# Logged, but not charted: the UI would draw each of them, so the views list them as removed.
NOT_CHARTED = [
    "eval/return_std", "test/return_mean", "test/return_std", "test/return_lower_bound", "final/env_steps",
    "final/policy_env_steps", "final/solved_env_steps", "final/wall_seconds", "system/disk_usage_megabytes",
    "system/disk_usage_percentage", "system/disk_available_megabytes", "system/network_receive_megabytes",
    "system/network_transmit_megabytes", "system/system_memory_usage_percentage",
    *(f"{scope}/{name}" for scope in ("sweep", "best") for name in comparison.SUMMARY_METRICS),  # a sweep parent's
    comparison.IMPROVEMENT_METRIC,
]
RESULT_COLUMNS = ["test/return_mean", "test/return_lower_bound", "final/solved_env_steps", "final/wall_seconds"]


def chart(metric: str, section: str, deleted: bool = False) -> dict:
    x_axis = "time" if metric.startswith("system/") else "step"
    return {
        "uuid": f"chart-{metric}", "type": "LINE", "metricSectionId": f"section-{section}", "metricKey": metric,
        "displayName": metric, "deleted": deleted, "isGenerated": True, "runsCountToCompare": 10,
        "xAxisKey": x_axis, "useGlobalXaxisKey": x_axis == "step", "selectedXAxisMetricKey": "", "yAxisKey": "metric",
        "yAxisExpressions": [], "scaleType": "linear", "xAxisScaleType": "linear", "range": {}, "lineSmoothness": 0,
        "useGlobalLineSmoothing": True, "ignoreOutliers": False,
    }


def view_state(search_filter: str = "", group_by: list[tuple[str, str]] = (), columns: list[str] = ()) -> dict:
    """The runs page's state: chart mode's charts and sections, the table's columns, filter and grouping.

    `group_by` holds (mode, key) pairs, mode "param" or "tag"; runs grouped show one curve per
    group, its mean, with a band from the group's min to its max.
    """
    charts = [chart(metric, section) for section, metrics in CHARTS.items() for metric in metrics]
    charts += [chart(metric, metric.split("/")[0], deleted=True) for metric in NOT_CHARTED]
    sections = [
        {"uuid": f"section-{name}", "name": name, "display": True, "isReordered": False, "deleted": False,
         "isGenerated": True}
        for name in CHARTS
    ]
    return {
        "searchFilter": search_filter, "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": [f"metrics.`{key}`" for key in RESULT_COLUMNS] + [f"params.`{key}`" for key in columns],
        "columnOrder": [], "columnWidths": {}, "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": charts, "compareRunSections": sections, "isAccordionReordered": False,
        "viewMaximized": False, "runListHidden": False, "hideEmptyCharts": True, "useGroupedValuesInCharts": True,
        "groupBy": {
            "aggregateFunction": "average",
            "groupByKeys": [{"mode": mode, "groupByData": key} for mode, key in group_by],
        } if group_by else None,
        "groupsExpanded": {},
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def save_view(client: mlflow.MlflowClient, experiment_id: str, key: str, name: str, state: dict) -> None:
    """A view that the UI's Views menu lists and `?viewStateShareKey=<key>` opens; saved again, it is replaced."""
    now = int(time.time() * 1000)
    # Compressed as the UI compresses its own (an experiment tag holds at most 20,000 characters).
    compressed = "deflate;" + base64.b64encode(zlib.compress(json.dumps(state).encode())).decode()
    envelope = {"name": name, "createdAt": now, "updatedAt": now, "state": compressed}
    client.set_experiment_tag(experiment_id, VIEW_TAG + key, json.dumps(envelope))


def save_experiment_view(client: mlflow.MlflowClient, experiment_id: str) -> None:
    # One curve per sweep (its runs' mean, with a band) and per single run: a sweep's parent has no curves of its own.
    state = view_state(group_by=[("tag", mlflow_runs.GROUP_TAG)], columns=["env", "seed"])
    save_view(client, experiment_id, EXPERIMENT_VIEW, "rl_pipeline: all runs", state)


def sweep_view_key(sweep_id: str) -> str:
    return f"sweep-{sweep_id}"


def save_sweep_view(client: mlflow.MlflowClient, experiment_id: str, sweep_id: str, swept_keys: list[str]) -> None:
    """The sweep's children, grouped by what the sweep varies besides the seed (all together if only the seed)."""
    configuration_keys = [key for key in swept_keys if key != "seed"]
    group_by = [("param", key) for key in configuration_keys] or [("tag", "sweep_id")]
    state = view_state(f"tags.`mlflow.parentRunId` = '{sweep_id}'", group_by, [*configuration_keys, "seed"])
    save_view(client, experiment_id, sweep_view_key(sweep_id), f"sweep {sweep_id[:8]}", state)


def ui_address(uri: str, port: int = DEFAULT_PORT) -> str:
    """Where the UI of `uri` is: the server itself, or the one `python -m rl_pipeline.ui` starts for a database."""
    return uri.rstrip("/") if store.is_server(uri) else local_address(port)


def runs_link(address: str, experiment_id: str, view: str) -> str:
    return (
        f"{address}/#/experiments/{experiment_id}/runs"
        f"?workflowType=machine_learning&compareRunsMode=CHART&viewStateShareKey={quote(view)}"
    )


def run_link(address: str, experiment_id: str, run_id: str, path: str = "") -> str:
    return f"{address}/#/experiments/{experiment_id}/runs/{run_id}{path}?workflowType=machine_learning"


def comparison_link(address: str, experiment_id: str, sweep_id: str) -> str:
    return run_link(address, experiment_id, sweep_id, "/artifacts/comparison/comparison.png")


def where_to_look(uri: str, page: str) -> str:
    """`page` on the tracking server, or on the UI that `python -m rl_pipeline.ui` starts for a database store."""
    return page if store.is_server(uri) else f"{page} (once `python -m rl_pipeline.ui` serves it)"


def pages(client: mlflow.MlflowClient, experiment_name: str, address: str, sweep_id: str | None) -> list[str]:
    """What to open: the experiment's runs; or a sweep's runs and its comparison. Their views are saved (again) first."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise SystemExit(f"ui: no experiment {experiment_name!r} in {client.tracking_uri}; run one first")
    if sweep_id is None:
        save_experiment_view(client, experiment.experiment_id)
        return [runs_link(address, experiment.experiment_id, EXPERIMENT_VIEW)]
    parent = mlflow_runs.run_or_none(client, sweep_id)
    if parent is None or not comparison.is_sweep(parent):
        raise SystemExit(f"ui: {sweep_id!r} is not a sweep id (the run id of a sweep's parent run)")
    experiment_id = parent.info.experiment_id
    save_sweep_view(client, experiment_id, sweep_id, json.loads(parent.data.tags[comparison.SWEPT_KEYS_TAG]))
    return [runs_link(address, experiment_id, sweep_view_key(sweep_id)), comparison_link(address, experiment_id, sweep_id)]
