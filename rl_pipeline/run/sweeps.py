"""Hydra multirun -> one MLflow parent run holding a child run per job, and the sweep's comparison."""

import atexit
import importlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

import mlflow
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow.entities import Metric, Param, RunStatus
from omegaconf import DictConfig, OmegaConf

from rl_pipeline.errors import ConfigError
from rl_pipeline.run import search
from rl_pipeline.run.jobs import exit_on, mark_sweep_interrupted, sweep_interrupted
from rl_pipeline.run.locks import SweepLock
from rl_pipeline.tracking import comparison, mlflow_runs, store, views

log = logging.getLogger(__name__)

# The optional extra (pyproject.toml) that installs each launcher plugin.
LAUNCHER_EXTRAS = {"hydra_plugins.hydra_ray_launcher": "ray", "hydra_plugins.hydra_submitit_launcher": "slurm"}
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"  # runs the jobs in this process
# Launchers whose jobs run on this machine, where an SQLite store beside the sweep is theirs too.
SAME_MACHINE_LAUNCHERS = (
    BASIC_LAUNCHER,
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
)


def swept_keys(overrides: list[str], sweeper_params) -> list[str]:
    """Keys the sweep varies: sweep overrides on the command line (`seed=0,1,2`) and the sweeper's params."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.key_or_group for o in parsed if o.is_sweep_override()] + list(sweeper_params or {})


class MLflowSweep(Callback):
    """Opens the parent run before the first job and closes it, with the comparison, after the last.

    Creating the store, the experiment and the parent up front also means parallel jobs never race
    to create them (a known failure of a fresh SQLite store under concurrent writers).
    """

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        uri = store.tracking_uri()
        launcher = check_launcher(config, uri)
        if search.is_search(config):
            try:
                search.check(config, uri, same_machine=launcher in SAME_MACHINE_LAUNCHERS)
            except ConfigError as error:
                exit_on(error)
        client = mlflow_runs.client(uri)
        overrides = [o for o in config.hydra.overrides.task if mlflow_runs.override_key(o) != "resume"]
        keys = swept_keys(overrides, OmegaConf.select(config, "hydra.sweeper.params"))
        experiment_id = mlflow_runs.experiment_id(config.logger.experiment_name, uri)
        if config.resume is None:
            parent = new_parent(client, experiment_id, overrides, keys)
            self.lock = SweepLock(parent.info.run_id).acquire()
        else:
            parent = sweep_parent(client, experiment_id, config.resume)
            try:  # held to this process's end: the kernel drops it however the process ends
                self.lock = SweepLock(parent.info.run_id).acquire()
            except ConfigError as error:
                exit_on(error)
            client.update_run(parent.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            log.info("Resuming sweep %s", parent.info.run_id)
            keys = json.loads(parent.data.tags[comparison.SWEPT_KEYS_TAG])
        self.parent_run_id, self.swept_keys = parent.info.run_id, keys
        group = parent.data.tags[mlflow_runs.GROUP_TAG]
        sweep = {"parent_run_id": self.parent_run_id, "swept_keys": keys, "group": group}
        self.command_line = [*config.hydra.overrides.hydra, *overrides]  # as typed: the sweepers' settings too
        set_in_jobs(config, {  # what each job needs, wherever the launcher runs it
            f"hydra.job.env_set.{mlflow_runs.SWEEP_ENV}": json.dumps(sweep),
            "hydra.job.env_set.MLFLOW_TRACKING_URI": uri,
            "hydra.sweep.dir": str(Path(config.hydra.sweep.dir).resolve()),  # not relative to a worker's folder
        })
        # Hydra skips on_multirun_end when a job raises or the sweep is interrupted: never leave the parent RUNNING.
        atexit.register(self.close_if_open, client)
        self.sweep_dir = Path(config.hydra.sweep.dir).resolve()
        self.jobs_here = launcher == BASIC_LAUNCHER
        self.searching = search.is_search(config)
        self.previous_sigint = signal.signal(signal.SIGINT, self.interrupt)
        log.info("MLflow sweep %s: child runs nest under it; watch them at %s", self.parent_run_id, self.link(uri, experiment_id))

    def link(self, uri: str, experiment_id: str) -> str:
        page = views.runs_link(views.ui_address(uri), experiment_id, views.sweep_view_key(self.parent_run_id))
        return views.where_to_look(uri, page)

    def interrupt(self, signum, frame) -> None:
        """Ctrl-C: the running jobs stop after their iteration, KILLED and resumable; the rest do not start.

        Jobs in other processes (joblib) get the terminal's Ctrl-C themselves: this process waits for
        them to stop. A second Ctrl-C stops at once.
        """
        if sweep_interrupted(self.sweep_dir):
            raise KeyboardInterrupt
        mark_sweep_interrupted(self.sweep_dir)
        log.info("Ctrl-C: running jobs stop after their iteration, the others do not start (again to stop now)")
        if self.jobs_here:
            raise KeyboardInterrupt  # the job of this process, outside training: it stops where it is

    def close_if_open(self, client: mlflow.MlflowClient) -> None:
        if client.get_run(self.parent_run_id).info.status == "RUNNING":
            status = RunStatus.KILLED if sweep_interrupted(self.sweep_dir) else RunStatus.FAILED
            client.set_terminated(self.parent_run_id, RunStatus.to_string(status))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        signal.signal(signal.SIGINT, self.previous_sigint)
        uri = store.tracking_uri()
        client = mlflow_runs.client(uri)
        parent = client.get_run(self.parent_run_id)
        children = comparison.sweep_children(client, parent)
        if sweep_interrupted(self.sweep_dir):
            self.end_interrupted(client, children)
        client.log_batch(self.parent_run_id, params=shared_params(children))
        finished = [run for run in children if run.info.status == "FINISHED"]
        if finished:
            self.summarize(client, children, Path(config.hydra.sweep.dir) / "comparison", parent)
        # A search's trials lost with a stopped sweep were asked again when it resumed: listed, not failures.
        failed = [run for run in children if run.info.status != "FINISHED" and search.LOST not in run.data.tags]
        ok = children and not failed
        client.set_terminated(self.parent_run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))
        atexit.unregister(self.close_if_open)
        print(f"MLflow sweep {self.parent_run_id}: {len(finished)} of {len(children)} runs finished; "
              f"compare at {self.link(uri, parent.info.experiment_id)}")
        if failed:  # the other jobs ran and are compared; the sweep as a whole did not succeed
            print(f"Sweep {self.parent_run_id}: {len(failed)} of {len(children)} jobs failed:", file=sys.stderr)
            for run in failed:
                print(f"  {run.info.run_name}: {run.data.tags.get(mlflow_runs.ERROR_TAG, run.info.status)}", file=sys.stderr)
            sys.exit(1)

    def end_interrupted(self, client: mlflow.MlflowClient, children: list) -> NoReturn:
        """The parent KILLED, and one line: which runs to resume, and how."""
        client.set_terminated(self.parent_run_id, RunStatus.to_string(RunStatus.KILLED))
        atexit.unregister(self.close_if_open)
        killed = [run for run in children if run.info.status == "KILLED"]
        finished = sum(run.info.status == "FINISHED" for run in children)
        if self.searching:  # the study goes on as a whole: its lost trials are asked again
            resumes = mlflow_runs.resume_command(["-m", *self.command_line], self.parent_run_id)
        else:
            resumes = "; ".join(mlflow_runs.resume_command(run.data.tags.get("overrides", "").split(), run.info.run_id)
                                for run in killed)
        print(f"Sweep {self.parent_run_id} interrupted: {finished} runs finished, {len(killed)} KILLED with their "
              f"checkpoints" + (f"; go on with: {resumes}" if killed else ""), file=sys.stderr)
        sys.exit(1)

    def summarize(self, client: mlflow.MlflowClient, children: list, directory: Path, parent) -> None:
        """The comparison as the parent's artifacts; the sweep's and its best configuration's scores as its metrics."""
        keys = comparison.configuration_keys(parent, children)
        report = comparison.write_report(client, children, keys, directory, parent.info.run_name)
        for path in report.paths:
            client.log_artifact(self.parent_run_id, str(path), "comparison")
        scored = [row for row in report.runs if row.scored]
        if not scored:
            return
        best = report.configurations[0]
        metrics = {**comparison.ConfigurationRow.of("sweep", scored).metrics("sweep"), **best.metrics("best")}
        if report.improvement is not None:
            metrics[comparison.IMPROVEMENT_METRIC] = report.improvement.value
        client.set_tag(self.parent_run_id, "best_verdict", report.verdict)
        client.log_batch(self.parent_run_id, metrics=[Metric(key, value, now_ms(), 0) for key, value in metrics.items()])
        best_run = max((row for row in scored if row.configuration == best.configuration), key=lambda row: row.test_return)
        client.set_tag(self.parent_run_id, "best_configuration", best.configuration)
        client.set_tag(self.parent_run_id, "best_run_id", best_run.run_id)
        client.set_tag(self.parent_run_id, "best_test_return", best_run.test_return)
        best_params = next(run for run in children if run.info.run_id == best_run.run_id).data.params
        for key in self.swept_keys:
            client.set_tag(self.parent_run_id, f"best.{key}", best_params.get(key))


def new_parent(client: mlflow.MlflowClient, experiment_id: str, overrides: list[str], keys: list[str]):
    """A new sweep's parent run, named by what the sweep varies."""
    swept = [o for o in overrides if mlflow_runs.override_key(o) in keys]  # empty for a sweeper's search space
    parent = client.create_run(
        experiment_id,
        run_name="sweep " + (" ".join(swept) or "over " + ", ".join(keys)),
        tags={"overrides": " ".join(overrides), "sweep_role": "parent", comparison.SWEPT_KEYS_TAG: json.dumps(keys)},
    )
    run_id = parent.info.run_id
    client.set_tag(run_id, "sweep_id", run_id)
    client.set_tag(run_id, mlflow_runs.GROUP_TAG, f"{parent.info.run_name} {run_id[:8]}")  # two sweeps of one command stay apart
    views.save_sweep_view(client, experiment_id, run_id, keys)
    return client.get_run(run_id)


def sweep_parent(client: mlflow.MlflowClient, experiment_id: str, sweep_id: str):
    """`resume=<sweep id>`: the sweep's parent run, under which its jobs go on."""
    parent = mlflow_runs.run_or_none(client, str(sweep_id))
    if parent is None or parent.data.tags.get("sweep_role") != "parent" or parent.info.experiment_id != experiment_id:
        exit_on(ConfigError("resume", f"expected the id of a sweep's parent run in this experiment (the id "
                            f"'MLflow sweep ID' printed), got {sweep_id}"))
    return parent


def check_launcher(config: DictConfig, uri: str) -> str:
    """The launcher must be installed, and be able to reach the store from wherever it runs jobs; its class."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_"))
    module, _, name = target.rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        extra = next((extra for package, extra in LAUNCHER_EXTRAS.items() if target.startswith(package)), None)
        install = f"; pip install -e '.[{extra}]'" if extra else ""
        exit_on(ConfigError("hydra/launcher", f"expected an installed launcher, got {target} ({error}){install}"))
    if store.sqlite_path(uri) is not None and target not in SAME_MACHINE_LAUNCHERS:
        exit_on(ConfigError("MLFLOW_TRACKING_URI", f"expected an MLflow server (http://HOST:PORT) that every job can "
                            f"reach, got the SQLite file {uri}, which {name}'s jobs on other machines cannot"))
    return target


def set_in_jobs(config: DictConfig, settings: dict[str, str]) -> None:
    """Sets each key of `settings` in every job's config.

    Launchers compose each job's config anew from the sweep's Hydra overrides, to which these are
    added. Ray workers and SLURM nodes inherit nothing from this process: its environment variables
    reach them as hydra.job.env_set, which Hydra sets around the job where it runs.
    """
    for key, value in settings.items():
        config.hydra.overrides.hydra.append(mlflow_runs.quoted_override(f"++{key}", value))
        OmegaConf.update(config, key, value, force_add=True)  # and in this one, for the sweeper


def shared_params(children: list) -> list[Param]:
    """The settings every job of the sweep shares: the parent's params."""
    configs = [run.data.params for run in children if run.data.params]
    if not configs:
        return []
    return [Param(key, value) for key, value in sorted(configs[0].items()) if all(c.get(key) == value for c in configs)]


def now_ms() -> int:
    return int(time.time() * 1000)
