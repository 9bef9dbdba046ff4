"""An Optuna study behind a Hydra sweep (hydra/sweeper=optuna): ask a batch of trials, launch them as
jobs, tell each trial what its MLflow run became, until n_trials trials have completed or been pruned.

The study lives in an RDB storage beside the runs, so that each job, wherever the launcher runs it,
reopens its own trial to report its evaluations and to ask whether to stop (rl_pipeline.run.trial).
The MLflow run is the record of what happened to a trial: the study is told from it, after the job
or, for the jobs a crashed sweep left, by `resume=<sweep id>`.
"""

import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
)
from hydra.errors import HydraException
from hydra.utils import instantiate
from mlflow.entities import Metric, RunStatus
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from rl_pipeline.errors import ConfigError
from rl_pipeline.run.jobs import sweep_interrupted
from rl_pipeline.tracking import mlflow_runs, store
from rl_pipeline.tracking.mlflow_runs import TRIAL_ENV

log = logging.getLogger(__name__)

SWEEPER = "hydra_plugins.rl_pipeline_optuna.optuna_sweeper.OptunaSweeper"
STUDY_TAG, STORAGE_TAG = "optuna.study_name", "optuna.storage"
NUMBER_TAG, STATE_TAG, PRUNED_AT_TAG = "optuna.trial_number", "optuna.trial_state", "optuna.pruned_at_env_step"
# A trial whose job the sweep lost (a crash, Ctrl-C): FAIL, but no verdict on its configuration.
LOST = "lost_with_the_sweep"
SQLITE_BUSY_TIMEOUT_S = 60  # SQLite serializes writers: jobs wait their turn rather than fail
CATEGORICAL_TYPES = (str, int, float, bool, type(None))


def is_search(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.sweeper._target_") == SWEEPER


@dataclass
class Dimension:
    """One searched key: how a job's override names it, and what Optuna samples for it."""

    override_key: str  # `optimizer.lr`, or `+key` for a key the config does not have yet
    distribution: BaseDistribution


def search_space(config: DictConfig, arguments: list[str]) -> tuple[dict[str, Dimension], list[str]]:
    """The searched keys (the sweeper's params, a command line sweep of a key in its place) and the fixed overrides."""
    preset = [f"{key}={value}" for key, value in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
    dimensions, fixed = {}, []
    for override in parse(preset, "hydra.sweeper.params") + parse(arguments, "the command line's overrides"):
        name = override.key_or_group
        if not override.is_sweep_override():  # a value, also for a key the preset searches: it is fixed
            dimensions.pop(name, None)
            fixed.append(override.input_line)
            continue
        check_known(config, override, name)
        dimensions[name] = Dimension(override.get_key_element(), distribution(name, override))
    if not dimensions:
        raise ConfigError("hydra.sweeper.params", "expected at least one key to search, as choice(), range() or "
                          "interval(), in the preset or on the command line; got none")
    return dimensions, [line for line in fixed if mlflow_runs.override_key(line) != "resume"]


def parse(lines: list[str], where: str) -> list[Override]:
    try:
        return OverridesParser.create().parse_overrides(lines)
    except HydraException as error:
        raise ConfigError("hydra.sweeper.params", f"expected Hydra's sweep syntax in {where}, got "
                          f"{(str(error).splitlines() or [''])[0]}") from None


def check_known(config: DictConfig, override: Override, name: str) -> None:
    """A searched key must be one the config has (or a group's option, or added with +)."""
    known = override.is_add() or name in config.hydra.runtime.choices or OmegaConf.select(config, name) is not None
    if not known:
        raise ConfigError(f"hydra.sweeper.params.{name}", "expected a key of the config (add a new one with +), "
                          f"got {override.input_line}")


def distribution(name: str, override: Override) -> BaseDistribution:
    """Hydra's sweep syntax as Optuna's distribution: choice/range -> categorical, interval -> float (tag int: int)."""
    sweep, key = override.value(), f"hydra.sweeper.params.{name}"
    try:
        if isinstance(sweep, (ChoiceSweep, RangeSweep)):
            choices = list(override.sweep_iterator())
            if not all(isinstance(choice, CATEGORICAL_TYPES) for choice in choices):
                raise ValueError("choices must be numbers, strings or booleans: quote a list, '[64,64]'")
            return CategoricalDistribution(choices)
        if isinstance(sweep, IntervalSweep):
            kind = IntDistribution if "int" in sweep.tags else FloatDistribution
            low, high = (int(sweep.start), int(sweep.end)) if kind is IntDistribution else (sweep.start, sweep.end)
            return kind(low, high, log="log" in sweep.tags)
        raise ValueError(f"{type(sweep).__name__} is not searchable")
    except ValueError as error:
        raise ConfigError(key, f"expected choice(), range() or interval() with bounds Optuna takes, got "
                          f"{override.input_line} ({error})") from None


def storage_url(config: DictConfig, uri: str) -> str:
    """The study's storage: hydra.sweeper.storage, else optuna.db beside the MLflow SQLite store (or in outputs/)."""
    given = OmegaConf.select(config, "hydra.sweeper.storage")
    if given:
        return given
    beside = store.sqlite_path(uri)
    folder = beside.parent if beside is not None else store.DEFAULT_STORE.parent
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def without_password(url: str) -> str:
    """The URL that optuna.load_study takes, less its password (PGPASSWORD or ~/.pgpass supply it)."""
    return make_url(url)._replace(password=None).render_as_string(hide_password=False)


def open_storage(url: str) -> optuna.storages.RDBStorage:
    engine = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if url.startswith("sqlite") else None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as error:  # SQLAlchemy's and the driver's errors: a bad URL, no database, no server
        raise ConfigError("hydra.sweeper.storage", "expected an Optuna database (sqlite:///FILE, "
                          f"postgresql+psycopg://USER@HOST/DB), got {without_password(url) if '://' in url else url} "
                          f"({type(error).__name__}: {(str(error).splitlines() or [''])[0]})") from None


def build_sampler(config: DictConfig, dimensions: dict[str, Dimension]) -> optuna.samplers.BaseSampler:
    node = config.hydra.sweeper.sampler
    extra = {}
    if str(node.get("_target_", "")).endswith("GridSampler"):
        extra["search_space"] = grid(dimensions)
    return built(node, "hydra.sweeper.sampler", optuna.samplers.BaseSampler, **extra)


def grid(dimensions: dict[str, Dimension]) -> dict[str, list]:
    """The grid sampler's grid: every choice of every key."""
    not_choices = [name for name, dimension in dimensions.items()
                   if not isinstance(dimension.distribution, CategoricalDistribution)]
    if not_choices:
        raise ConfigError("hydra.sweeper.sampler", f"expected choice() or range() for every searched key with the "
                          f"grid sampler, got interval() for {', '.join(not_choices)}")
    return {name: list(dimension.distribution.choices) for name, dimension in dimensions.items()}


def build_pruner(sweeper: DictConfig) -> optuna.pruners.BasePruner:
    return built(sweeper.pruner, "hydra.sweeper.pruner", optuna.pruners.BasePruner)


def built(node: DictConfig, key: str, kind: type, **extra):
    try:
        made = instantiate(node, **extra)
    except Exception as error:  # Hydra wraps the import or the constructor's own error
        cause = error.__cause__ or error
        raise ConfigError(key, f"expected an Optuna {kind.__name__[4:].lower()} (_target_ and its arguments), got "
                          f"{OmegaConf.to_container(node)} ({(str(cause).splitlines() or [''])[0]})") from None
    if not isinstance(made, kind):
        raise ConfigError(key, f"expected an optuna {kind.__module__}.{kind.__name__}, got {type(made).__name__}")
    return made


def check(config: DictConfig, uri: str, same_machine: bool) -> None:
    """Every mistake in the search's settings, found before the sweep's parent run exists."""
    settings = config.hydra.sweeper
    for key in ("n_trials", "n_jobs"):
        if settings[key] < 1:
            raise ConfigError(f"hydra.sweeper.{key}", f"expected an integer >= 1, got {settings[key]}")
    if settings.direction not in ("maximize", "minimize"):
        raise ConfigError("hydra.sweeper.direction", f"expected maximize or minimize, got {settings.direction}")
    dimensions, _ = search_space(config, list(config.hydra.overrides.task))
    build_sampler(config, dimensions)
    build_pruner(settings)
    url = storage_url(config, uri)
    if url.startswith("sqlite") and not same_machine:
        raise ConfigError("hydra.sweeper.storage", "expected a database that every job can reach "
                          f"(postgresql+psycopg://USER@HOST/DB) for this launcher, got the SQLite file {url}")
    open_storage(url)


class Search:
    """One sweep's study: ask, launch, settle, until done; then its outcome on the parent run."""

    def __init__(self, config: DictConfig, launcher):
        self.config, self.launcher, self.settings = config, launcher, config.hydra.sweeper
        sweep = json.loads(config.hydra.job.env_set[mlflow_runs.SWEEP_ENV])
        self.parent_run_id = sweep["parent_run_id"]
        self.client = mlflow_runs.client(store.tracking_uri())
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.resuming = config.resume is not None

    def run(self, arguments: list[str]) -> None:
        self.dimensions, self.fixed = search_space(self.config, arguments)
        self.study = self.open_study()
        if self.resuming:
            self.settle_lost()
        while not sweep_interrupted(self.sweep_dir) and (batch := self.batch_size()):
            first_job = len(self.study.get_trials(deepcopy=False))
            trials = [self.study.ask({name: d.distribution for name, d in self.dimensions.items()}) for _ in range(batch)]
            self.launcher.launch([self.job_overrides(trial) for trial in trials], initial_job_idx=first_job)
            for trial in trials:
                self.settle(trial.number)
        self.summarize()

    def open_study(self) -> optuna.Study:
        """This sweep's study: made with its parent run, or the one a resumed sweep's parent names."""
        url = storage_url(self.config, store.tracking_uri())
        self.config.hydra.sweeper.storage = url  # every job reopens its trial here
        parent = self.client.get_run(self.parent_run_id)
        name = parent.data.tags.get(STUDY_TAG) or f"{self.settings.study_name}-{self.parent_run_id[:8]}"
        study = optuna.create_study(
            study_name=name, storage=open_storage(url), sampler=build_sampler(self.config, self.dimensions),
            pruner=build_pruner(self.settings), direction=self.settings.direction, load_if_exists=True,
        )
        self.client.set_tag(self.parent_run_id, STUDY_TAG, name)
        self.client.set_tag(self.parent_run_id, STORAGE_TAG, without_password(url))
        log.info("Optuna study: optuna.load_study(study_name=%r, storage=%r)", name, without_password(url))
        return study

    def counts(self) -> dict[str, int]:
        trials = self.study.get_trials(deepcopy=False)
        return {
            "complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "failed": sum(t.state == TrialState.FAIL and not t.user_attrs.get(LOST) for t in trials),
            "lost": sum(t.state == TrialState.FAIL and bool(t.user_attrs.get(LOST)) for t in trials),
        }

    def batch_size(self) -> int:
        """Trials to ask next: up to n_jobs, while fewer than n_trials have completed or been pruned and as
        many have failed (a search that fails every trial ends)."""
        counts, n_trials = self.counts(), self.settings.n_trials
        if counts["failed"] >= n_trials:
            return 0
        return max(0, min(self.settings.n_jobs, n_trials - counts["complete"] - counts["pruned"]))

    def job_overrides(self, trial: optuna.Trial) -> list[str]:
        identity = json.dumps({"study": self.study.study_name, "trial_id": trial._trial_id, "number": trial.number})
        sampled = [f"{self.dimensions[name].override_key}={value}" for name, value in trial.params.items()]
        return [*self.fixed, *sampled, mlflow_runs.quoted_override(f"++hydra.job.env_set.{TRIAL_ENV}", identity),
                mlflow_runs.quoted_override("++hydra.sweeper.storage", self.config.hydra.sweeper.storage)]

    def trial_run(self, number: int):
        """The trial's MLflow run: the child of this sweep tagged with its number."""
        query = f"tags.`{NUMBER_TAG}` = '{number}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'"
        experiment = self.client.get_run(self.parent_run_id).info.experiment_id
        return next(iter(mlflow_runs.search_runs(self.client, [experiment], query)), None)

    def settle(self, number: int) -> None:
        """Tells the study what the trial's run became: COMPLETE with its test return, PRUNED, or FAIL."""
        if self.study.trials[number].state.is_finished():
            return
        run = self.trial_run(number)
        status = run.info.status if run else None
        if status == "FINISHED" and PRUNED_AT_TAG in run.data.tags:
            self.tell(number, run, TrialState.PRUNED)
        elif status == "FINISHED" and "test/return_mean" in run.data.metrics:
            self.tell(number, run, TrialState.COMPLETE, run.data.metrics["test/return_mean"])
        else:  # FAILED of its own; KILLED, left RUNNING or never started: lost with the sweep
            never_started = run is None and (self.resuming or sweep_interrupted(self.sweep_dir))
            self.fail(number, run, lost=status in ("KILLED", "RUNNING") or never_started)

    # The run first, then the study: a sweep killed in between leaves the trial RUNNING, which a resume
    # settles again from the run.
    def tell(self, number: int, run, state: TrialState, value: float | None = None) -> None:
        self.client.set_tag(run.info.run_id, STATE_TAG, state.name)
        self.study.tell(number, value, state=state)

    def fail(self, number: int, run, lost: bool) -> None:
        """A FAIL trial; `lost`: its job died with the sweep (its run KILLED), not of its configuration."""
        if run is not None:
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            self.client.set_tag(run.info.run_id, STATE_TAG, TrialState.FAIL.name)
            if lost:
                self.client.set_tag(run.info.run_id, LOST, "true")
        if lost:
            optuna.Trial(self.study, self.study.trials[number]._trial_id).set_user_attr(LOST, True)
        self.study.tell(number, state=TrialState.FAIL)

    def settle_lost(self) -> None:
        """Resuming: the trials the crashed sweep left RUNNING are told what their runs became."""
        left = [t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        for number in left:
            self.settle(number)
        lost = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.user_attrs.get(LOST)]
        if lost:
            print(f"Resuming sweep {self.parent_run_id}: trials {', '.join(str(t.number) for t in lost)} were "
                  "running when it stopped: FAIL, their runs KILLED", file=sys.stderr)

    def summarize(self) -> None:
        """The study's outcome on the parent run: counts, the best trial, Optuna's plots and the trials table."""
        counts = self.counts()
        now = int(time.time() * 1000)
        metrics = [Metric(f"optuna/trials_{key}", value, now, 0) for key, value in counts.items()]
        self.client.log_batch(self.parent_run_id, metrics=metrics)
        print(f"Optuna study {self.study.study_name}: {counts['complete']} complete, {counts['pruned']} pruned, "
              f"{counts['failed']} failed" + (f", {counts['lost']} lost with a stopped sweep" if counts["lost"] else ""))
        if not counts["complete"]:
            return
        best = self.study.best_trial
        self.client.set_tag(self.parent_run_id, "optuna.best_trial", best.number)
        self.client.set_tag(self.parent_run_id, "optuna.best_value", best.value)
        for name, value in best.params.items():
            self.client.set_tag(self.parent_run_id, f"optuna.best.{name}", value)
        for path in self.write_artifacts(self.sweep_dir / "optuna", counts["complete"]):
            self.client.log_artifact(self.parent_run_id, str(path), "optuna")

    def write_artifacts(self, directory: Path, complete: int) -> list[Path]:
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as plots

        directory.mkdir(parents=True, exist_ok=True)
        table = directory / "trials.csv"
        self.study.trials_dataframe().to_csv(table, index=False)
        drawn = {"optimization_history.png": plots.plot_optimization_history}
        if complete >= 2 and len(self.dimensions) >= 2:  # importances compare at least two keys over two trials
            drawn["param_importances.png"] = plots.plot_param_importances
        paths = [table]
        for name, plot in drawn.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot(self.study)
            axes.figure.savefig(directory / name, bbox_inches="tight")
            plt.close(axes.figure)
            paths.append(directory / name)
        return paths
