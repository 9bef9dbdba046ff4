"""A job that is a trial of an Optuna search: it reports each evaluation to its trial and stops once pruned.

The sweep (rl_pipeline.run.search) tells the study how the trial ended; the job only reports and asks.
"""

import logging

import mlflow
import optuna
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig

from rl_pipeline.run.search import PRUNED_AT_TAG, STATE_TAG, build_pruner, open_storage
from rl_pipeline.tracking import mlflow_runs

log = logging.getLogger(__name__)


class PruneTrial(pl.Callback):
    """Reports `monitor` at each evaluation as the trial's intermediate value, stepped by env steps, and
    stops training (at the evaluation's end, as the stop rule does) once the study's pruner says so."""

    def __init__(self, trial: optuna.Trial, monitor: str = "eval/return_lower_bound"):
        self.trial, self.monitor = trial, monitor
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        value = float(trainer.callback_metrics[self.monitor])
        self.trial.report(value, pl_module.env_steps)
        if self.trial.should_prune():
            self.pruned_at = pl_module.env_steps
            trainer.should_stop = True
            log.info("Optuna trial %d pruned at %d env steps (%s %.1f)", self.trial.number, self.pruned_at,
                     self.monitor, value)


def trial_pruning() -> PruneTrial | None:
    """This job's trial, reopened from the study's storage, in a callback; None outside an Optuna search."""
    trial = mlflow_runs.current_trial()
    if trial is None:
        return None
    sweeper = HydraConfig.get().sweeper
    study = optuna.load_study(study_name=trial["study"], storage=open_storage(sweeper.storage),
                              pruner=build_pruner(sweeper))
    return PruneTrial(optuna.Trial(study, trial["trial_id"]))


def tag_outcome(pruning: PruneTrial) -> None:
    """The trial's state on its run, for the sweep to tell the study."""
    if pruning.pruned_at is None:
        mlflow.set_tag(STATE_TAG, "COMPLETE")
        return
    mlflow.set_tags({STATE_TAG: "PRUNED", PRUNED_AT_TAG: str(pruning.pruned_at)})
