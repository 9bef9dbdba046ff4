"""Hydra multirun -> one MLflow parent run holding a child run per job, and the sweep's comparison."""

import atexit
import json
import logging
import os
import sys
from pathlib import Path

import mlflow
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf

from rl_pipeline import compare, tracking

log = logging.getLogger(__name__)


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
        uri = tracking.tracking_uri()
        client = tracking.client(uri)
        overrides = list(config.hydra.overrides.task)
        keys = swept_keys(overrides, OmegaConf.select(config, "hydra.sweeper.params"))
        swept = [o for o in overrides if tracking.override_key(o) in keys]  # empty for a sweeper's search space
        parent = client.create_run(
            tracking.experiment_id(config.logger.experiment_name, uri),
            run_name="sweep " + (" ".join(swept) or "over " + ", ".join(keys)),
            tags={"overrides": " ".join(overrides), "sweep_role": "parent"},
        )
        self.parent_run_id, self.swept_keys = parent.info.run_id, keys
        client.set_tag(self.parent_run_id, "sweep_id", self.parent_run_id)
        os.environ[tracking.SWEEP_ENV] = json.dumps({"parent_run_id": self.parent_run_id, "swept_keys": keys})
        # Hydra skips on_multirun_end when a job raises or the sweep is interrupted: never leave the parent RUNNING.
        atexit.register(self.close_if_open, client)
        log.info("MLflow sweep %s: child runs nest under it", self.parent_run_id)

    def close_if_open(self, client: mlflow.MlflowClient) -> None:
        if client.get_run(self.parent_run_id).info.status == "RUNNING":
            client.set_terminated(self.parent_run_id, RunStatus.to_string(RunStatus.FAILED))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        os.environ.pop(tracking.SWEEP_ENV, None)
        client = tracking.client(tracking.tracking_uri())
        parent = client.get_run(self.parent_run_id)
        children = compare.sweep_children(client, parent)
        finished = [run for run in children if run.info.status == "FINISHED"]
        if finished:
            report = Path(config.hydra.sweep.dir) / "comparison"
            for path in compare.write_report(client, finished, report, parent.info.run_name):
                client.log_artifact(self.parent_run_id, str(path), "comparison")
            self.tag_best(client, finished)
        failed = [run for run in children if run.info.status != "FINISHED"]
        ok = children and not failed
        client.set_terminated(self.parent_run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))
        atexit.unregister(self.close_if_open)
        if failed:  # the other jobs ran and are compared; the sweep as a whole did not succeed
            print(f"Sweep {self.parent_run_id}: {len(failed)} of {len(children)} jobs failed:", file=sys.stderr)
            for run in failed:
                print(f"  {run.info.run_name}: {run.data.tags.get(tracking.ERROR_TAG, run.info.status)}", file=sys.stderr)
            sys.exit(1)

    def tag_best(self, client: mlflow.MlflowClient, runs: list) -> None:
        """The best job's run id, test return and swept params, as tags of the parent."""
        best = max(runs, key=lambda run: run.data.metrics.get(compare.RESULT_METRIC, float("-inf")))
        client.set_tag(self.parent_run_id, "best_run_id", best.info.run_id)
        client.set_tag(self.parent_run_id, "best_test_return", best.data.metrics.get(compare.RESULT_METRIC))
        for key in self.swept_keys:
            client.set_tag(self.parent_run_id, f"best.{key}", best.data.params.get(key))
