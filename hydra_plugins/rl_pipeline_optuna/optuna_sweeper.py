"""`hydra/sweeper=optuna`: an Optuna (>= 4) search through ask-and-tell, its trials pruned across jobs.

Hydra imports every module of the `hydra_plugins` namespace at start-up: this one only registers the
sweeper's config and hands the search to rl_pipeline.run.search, imported once a search runs.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from omegaconf import MISSING


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.rl_pipeline_optuna.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sampler and pruner are built by the search, the pruner again in each job
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": "median"}])
    direction: str = "maximize"  # of the objective: each completed trial's held-out test return
    study_name: str = "search"  # the study is named `<study_name>-<sweep id>`, one per sweep
    storage: str | None = None  # an Optuna RDB URL; null: optuna.db beside the MLflow SQLite store
    n_trials: int = 20  # trials to complete or prune
    n_jobs: int = 1  # trials asked at once and handed to the launcher as one batch
    sampler: Any = MISSING
    pruner: Any = MISSING
    params: dict[str, str] | None = None  # key -> Hydra sweep syntax: choice(...), range(...), interval(...), tag(log, ...)


SAMPLERS = {
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": None},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
    "grid": {"_target_": "optuna.samplers.GridSampler", "seed": None},  # its grid: every choice() of the params
    "cmaes": {"_target_": "optuna.samplers.CmaEsSampler", "seed": None},
}
PRUNERS = {  # steps are env steps: each evaluation reports the greedy return's lower bound at its env step
    "median": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5, "n_warmup_steps": 0},
    "hyperband": {"_target_": "optuna.pruners.HyperbandPruner", "min_resource": "auto", "max_resource": "auto",
                  "reduction_factor": 3},
    "successive_halving": {"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": "auto",
                           "reduction_factor": 4},
    "none": {"_target_": "optuna.pruners.NopPruner"},
}

store = ConfigStore.instance()
store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="rl_pipeline")
for name, node in SAMPLERS.items():
    store.store(group="hydra/sweeper/sampler", name=name, node=node, provider="rl_pipeline")
for name, node in PRUNERS.items():
    store.store(group="hydra/sweeper/pruner", name=name, node=node, provider="rl_pipeline")


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any):
        """Hydra passes the sweeper's config as arguments: the search reads it from the config, as each job does."""

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        from rl_pipeline.run.search import Search

        Search(self.config, self.launcher).run(arguments)
