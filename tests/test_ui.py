"""The way into the comparison, as a person sees it: `python -m rl_pipeline.ui` and the MLflow UI in headless Chromium.

A short real sweep writes an SQLite store; `rl_pipeline.ui` serves it with a real `mlflow server` on
127.0.0.1; Selenium drives Debian's chromium through the links it prints. Screenshots land in
outputs/ui-screenshots/.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import zlib
from base64 import b64decode
from pathlib import Path

import mlflow
import psutil
import pytest
from conftest import TINY_RUN, all_runs, free_port, mlflow_server_process, run_module, start_module
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from rl_pipeline.tracking import views

SCREENSHOTS = Path(__file__).resolve().parents[1] / "outputs" / "ui-screenshots"
SWEEP = ("+experiment=dqn", "seed=0,1", "optimizer.lr=0.001,0.0003", *TINY_RUN)


@pytest.fixture(scope="module")
def swept_store(tmp_path_factory) -> tuple[str, str, list]:
    """(store URI, sweep id, child runs) of a 4-job sweep."""
    cwd = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    result = run_module("rl_pipeline", "-m", *SWEEP, cwd=cwd, tracking_uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = all_runs(uri)
    (parent,) = [run for run in runs if run.data.tags.get("sweep_role") == "parent"]
    return uri, parent.info.run_id, [run for run in runs if run.info.run_id != parent.info.run_id]


def start_ui(uri: str, *args: str) -> tuple[subprocess.Popen, list[str]]:
    """`python -m rl_pipeline.ui ARGS` in the background, and the lines it printed until it served."""
    process = start_module("rl_pipeline.ui", *args, tracking_uri=uri, stderr=subprocess.DEVNULL, start_new_session=True)
    lines = []
    for line in process.stdout:
        lines.append(line.strip())
        if "Ctrl-C" in line:
            return process, lines
    raise AssertionError(f"rl_pipeline.ui exited with {process.wait()}: {lines}")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=30) == 0


def links(lines: list[str]) -> list[str]:
    return re.findall(r"https?://\S+", " ".join(lines))


@pytest.fixture(scope="module")
def browser():
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "the browser test needs Debian's chromium and chromium-driver (see README)"
    options = Options()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield chrome
    chrome.quit()


def open_page(browser, url: str, ready: str, timeout: float = 60) -> str:
    """The page's text once `ready` shows on it; the MLflow assistant's side panel closed."""
    browser.get(url)
    WebDriverWait(browser, timeout).until(lambda b: ready in b.find_element(By.TAG_NAME, "body").text)
    for close in browser.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
        close.click()
    time.sleep(2)  # charts draw after the data arrives
    return browser.find_element(By.TAG_NAME, "body").text


def chart_card(browser, metric: str):
    """The chart of `metric` in chart mode: its title, curves, legend and Step axis."""
    return browser.find_element(By.XPATH, f"//*[text()='{metric}']/ancestor::*[.//*[text()='Step']][1]")


def chart_sections(text: str) -> list[str]:
    """The chart view's sections, in order: a section's name is the line above its "(n charts)"."""
    lines = text.splitlines()
    return [lines[i - 1] for i in range(1, len(lines)) if re.fullmatch(r"\(\d+\)", lines[i])]


@pytest.mark.slow
def test_the_links_that_ui_prints_open_the_comparison_in_a_real_browser(swept_store, browser):
    uri, sweep_id, children = swept_store
    names = [child.info.run_name for child in children]
    port = free_port()
    server, lines = start_ui(uri, "--port", str(port))
    try:
        (experiment_page,) = links(lines)
        assert experiment_page.startswith(f"http://127.0.0.1:{port}/#/experiments/")
        assert "workflowType=machine_learning" in experiment_page and "compareRunsMode=CHART" in experiment_page

        # 1. The experiment's runs, in Model-training mode, as charts: a store of sweeps alone still shows curves,
        # one per sweep (the mean of its runs, with a band), its runs listed in its group.
        group = children[0].data.tags["group"]
        text = open_page(browser, experiment_page, f"Group: {group}")
        browser.save_screenshot(str(SCREENSHOTS / "1-experiment.png"))
        assert "Model training" in text and "Group by: group" in text and "Traces" not in chart_sections(text)
        assert chart_sections(text)[:2] == ["eval", "train"] and all(name[:20] in text for name in names)
        assert f"{group} (eval/return_mean)" in chart_card(browser, "eval/return_mean").text  # the sweep's curve
    finally:
        stop(server)

    server, lines = start_ui(uri, sweep_id, "--port", str(port))
    try:
        sweep_page, comparison_page = links(lines)
        # 2. The sweep's runs grouped by the swept param: one eval curve per learning rate, against env steps.
        text = open_page(browser, sweep_page, "Group: 0.001")
        browser.save_screenshot(str(SCREENSHOTS / "2-sweep-grouped.png"))
        assert "Group by: optimizer.lr" in text and "Group: 0.0003" in text
        assert chart_sections(text) == ["eval", "train", "perf", "system"], "one-value results are no charts"
        eval_card = chart_card(browser, "eval/return_mean")
        assert "0.001" in eval_card.text and "0.0003" in eval_card.text  # a curve per group, x-axis env steps

        # 3. The parent's comparison among its artifacts.
        text = open_page(browser, comparison_page, "configurations.csv")
        browser.save_screenshot(str(SCREENSHOTS / "3-comparison.png"))
        assert {"comparison.md", "comparison.png", "runs.csv"} <= set(text.split())
        assert "Model training" in text and "Evaluation runs" not in text
        widths = [img.get_property("naturalWidth") for img in browser.find_elements(By.TAG_NAME, "img")]
        assert max(widths) >= 600, "the plot is shown, at its own size"
    finally:
        stop(server)


@pytest.mark.slow
def test_ui_against_a_server_prints_its_links_and_exits(swept_store):
    uri, sweep_id, _ = swept_store
    with mlflow_server_process(Path(uri.removeprefix("sqlite:///")), free_port()) as server:
        result = run_module("rl_pipeline.ui", sweep_id, tracking_uri=server, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    sweep_page, comparison_page = links(result.stdout.splitlines())
    assert sweep_page.startswith(f"{server}/#/experiments/") and sweep_page.endswith(f"viewStateShareKey=sweep-{sweep_id}")
    assert comparison_page.endswith(f"/runs/{sweep_id}/artifacts/comparison/comparison.png?workflowType=machine_learning")


@pytest.mark.slow
def test_a_sweep_view_groups_its_children_and_charts_curves_only(swept_store):
    uri, sweep_id, children = swept_store
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment(children[0].info.experiment_id)
    envelope = json.loads(experiment.tags[views.VIEW_TAG + views.sweep_view_key(sweep_id)])
    state = json.loads(zlib.decompress(b64decode(envelope["state"].removeprefix("deflate;"))))
    assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{sweep_id}'"
    assert state["groupBy"]["groupByKeys"] == [{"mode": "param", "groupByData": "optimizer.lr"}]
    shown = {chart["metricKey"] for chart in state["compareRunCharts"] if not chart["deleted"]}
    logged = {key for child in children for key in child.data.metrics}
    assert shown <= logged | {"system/system_memory_usage_megabytes", "system/cpu_utilization_percentage"}
    one_value = {key for key in logged if key.startswith(("test/", "final/"))}
    assert one_value and not one_value & shown, "results one value each are table columns, not charts"
    assert not logged - {chart["metricKey"] for chart in state["compareRunCharts"]}, "every metric placed, none auto"


def test_ui_without_a_store_says_so_in_one_line(tmp_path):
    result = run_module("rl_pipeline.ui", cwd=tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'none.db'}", timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"ui: no MLflow store at {tmp_path / 'none.db'} yet; train a run first (or set MLFLOW_TRACKING_URI)"
    )
    assert not (tmp_path / "none.db").exists(), "asking created no store"


@pytest.fixture
def empty_store(tmp_path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("rl_pipeline")
    return uri


def processes_on_port(port: int) -> list[psutil.Process]:
    """The processes that serve `port` (the server and its workers name it on their command line)."""
    serving = []
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if "--port" in command and str(port) in command and "rl_pipeline.ui" not in " ".join(command):
            serving.append(process)
    return serving


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_ui_stopped_by_a_signal_stops_its_server_and_frees_the_port(empty_store, signum):
    port = free_port()
    process, _ = start_ui(empty_store, "--port", str(port))
    assert processes_on_port(port), "the server runs, or this proves nothing"
    process.send_signal(signum)  # to the ui alone, as `timeout`, a service manager or a closed terminal send it
    assert process.wait(timeout=30) == 128 + signum
    assert processes_on_port(port) == []


def test_ui_on_a_port_in_use_says_so_in_one_line_naming_a_free_one(empty_store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_module("rl_pipeline.ui", "--port", str(port), tracking_uri=empty_store, timeout=60)
    assert result.returncode != 0 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    free = int(re.fullmatch(rf"ui: port {port} on 127.0.0.1 is in use; try --port (\d+)", line).group(1))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", free))  # it is free
