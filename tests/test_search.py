"""The Optuna sweeper's settings, composed by Hydra: its search space, sampler, pruner and storage, and
each mistake in them refused as one ConfigError naming its key before anything runs."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import (
    CANNOT,
    LEARNS,
    PRUNABLE,
    SEARCH,
    all_runs,
    parent_and_children,
    read_until,
    run_module,
    start_module,
)
from hydra import compose, initialize_config_dir
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.pruners import (
    HyperbandPruner,
    MedianPruner,
    NopPruner,
    SuccessiveHalvingPruner,
)
from optuna.samplers import CmaEsSampler, GridSampler, RandomSampler, TPESampler

from rl_pipeline.errors import ConfigError
from rl_pipeline.run import search
from rl_pipeline.run.config import CONF_DIR


def compose_search(*overrides: str, sweeps: tuple[str, ...] = ()):
    """The config of `python -m rl_pipeline -m OVERRIDES SWEEPS`, Hydra's node included, as the sweeper gets it.

    Hydra's compose API makes no multirun: the sweeps join the task's overrides as a multirun records them.
    """
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose(config_name="config", overrides=[*SEARCH, *overrides], return_hydra_config=True)
    config.hydra.overrides.task += list(sweeps)
    return config


def space(*overrides: str, sweeps: tuple[str, ...] = ()):
    config = compose_search(*overrides, sweeps=sweeps)
    return search.search_space(config, list(config.hydra.overrides.task))


def test_the_presets_space_becomes_optunas_distributions_and_the_rest_is_fixed():
    dimensions, fixed = space("seed=3")
    assert dimensions["optimizer.lr"].distribution == FloatDistribution(3e-4, 3e-3, log=True)
    assert dimensions["exploration.epsilon_fraction"].distribution == FloatDistribution(0.05, 0.3)
    assert dimensions["buffer.batch_size"].distribution == CategoricalDistribution([64, 128, 256])
    assert dimensions["network.hidden_sizes"].distribution == CategoricalDistribution(["[64,64]", "[128,128]", "[256,256]"])
    assert fixed == [*SEARCH, "seed=3"]


def test_a_command_line_sweep_replaces_the_presets_range_and_a_value_fixes_the_key():
    dimensions, fixed = space("buffer.batch_size=64", sweeps=("optimizer.lr=choice(1e-7,2.3e-3)",
                              "trainer.eval_episodes=tag(int, interval(2, 9))", "seed=range(0,3)"))
    assert dimensions["optimizer.lr"].distribution == CategoricalDistribution([1e-7, 2.3e-3])
    assert "buffer.batch_size" not in dimensions and "buffer.batch_size=64" in fixed
    assert dimensions["trainer.eval_episodes"].distribution == IntDistribution(2, 9)
    assert dimensions["seed"].distribution == CategoricalDistribution([0, 1, 2])


def test_a_resumed_search_passes_no_resume_to_its_jobs():
    _, fixed = space("resume=0123456789abcdef0123456789abcdef")
    assert fixed == list(SEARCH)


@pytest.mark.parametrize(("override", "key", "said"), [
    ("optimizer.lr=interval(3e-3,3e-4)", "hydra.sweeper.params.optimizer.lr", "expected choice(), range() or interval()"),
    ("optimizer.lr=tag(log,interval(0,1))", "hydra.sweeper.params.optimizer.lr", "expected choice(), range() or interval()"),
    ("network.hidden_sizes=choice([64,64],[32])", "hydra.sweeper.params.network.hidden_sizes", "quote a list"),
    ("optimizer.lrr=choice(1,2)", "hydra.sweeper.params.optimizer.lrr", "expected a key of the config"),
])
def test_a_bad_search_space_names_its_key_in_one_line(override, key, said):
    config = compose_search(sweeps=(override,))
    with pytest.raises(ConfigError) as raised:
        search.check(config, "sqlite:////tmp/unused/mlflow.db", same_machine=True)
    assert raised.value.key == key and said in raised.value.problem and "\n" not in str(raised.value)


def test_a_preset_range_that_is_no_sweep_syntax_is_refused():
    config = compose_search()
    config.hydra.sweeper.params["optimizer.lr"] = "interval(1e-3"
    with pytest.raises(ConfigError) as raised:
        search.search_space(config, [])
    assert raised.value.key == "hydra.sweeper.params" and "expected Hydra's sweep syntax" in raised.value.problem


def test_a_space_with_every_key_fixed_is_refused():
    config = compose_search(*(f"{key}={value}" for key, value in [
        ("optimizer.lr", 1e-3), ("buffer.batch_size", 64), ("agent.target_sync_interval_updates", 32),
        ("exploration.epsilon_fraction", 0.1), ("network.hidden_sizes", "[64,64]")]))
    with pytest.raises(ConfigError, match="expected at least one key to search"):
        search.search_space(config, list(config.hydra.overrides.task))


@pytest.mark.parametrize(("option", "kind"), [("tpe", TPESampler), ("random", RandomSampler), ("cmaes", CmaEsSampler)])
def test_each_sampler_option_builds_optunas_sampler(option, kind):
    config = compose_search(f"hydra/sweeper/sampler={option}")
    assert isinstance(search.build_sampler(config, space()[0]), kind)


def test_the_grid_sampler_takes_its_grid_from_the_choices_and_refuses_an_interval():
    config = compose_search("hydra/sweeper/sampler=grid", "exploration.epsilon_fraction=0.1",
                            sweeps=("optimizer.lr=choice(1e-3,3e-4)",))
    dimensions, _ = search.search_space(config, list(config.hydra.overrides.task))
    sampler = search.build_sampler(config, dimensions)
    assert isinstance(sampler, GridSampler) and sampler._search_space["optimizer.lr"] == [1e-3, 3e-4]
    with pytest.raises(ConfigError, match="interval\\(\\) for optimizer.lr, exploration.epsilon_fraction"):
        search.build_sampler(compose_search("hydra/sweeper/sampler=grid"), space()[0])


@pytest.mark.parametrize(("option", "kind"), [("median", MedianPruner), ("hyperband", HyperbandPruner),
                                              ("successive_halving", SuccessiveHalvingPruner), ("none", NopPruner)])
def test_each_pruner_option_builds_optunas_pruner(option, kind):
    assert isinstance(search.build_pruner(compose_search(f"hydra/sweeper/pruner={option}").hydra.sweeper), kind)


def test_the_preset_prunes_with_the_median_pruner_by_default():
    pruner = search.build_pruner(compose_search().hydra.sweeper)
    assert isinstance(pruner, MedianPruner) and pruner._n_startup_trials == 5 and pruner._n_warmup_steps == 0


@pytest.mark.parametrize(("override", "key"), [
    ("hydra.sweeper.pruner._target_=optuna.pruners.NoSuchPruner", "hydra.sweeper.pruner"),
    ("hydra.sweeper.pruner._target_=optuna.samplers.RandomSampler", "hydra.sweeper.pruner"),  # not a pruner
    ("+hydra.sweeper.pruner.no_such_argument=1", "hydra.sweeper.pruner"),
    ("hydra.sweeper.sampler._target_=optuna.samplers.NoSuchSampler", "hydra.sweeper.sampler"),
    ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials"),
    ("hydra.sweeper.direction=up", "hydra.sweeper.direction"),
])
def test_an_unknown_pruner_or_sampler_or_setting_names_its_key(override, key, tmp_path):
    with pytest.raises(ConfigError) as raised:
        search.check(compose_search(override), f"sqlite:///{tmp_path / 'mlflow.db'}", same_machine=True)
    assert raised.value.key == key and "\n" not in str(raised.value)


@pytest.mark.parametrize("storage", ["{tmp_path}/notes.txt", "sqlite:///{tmp_path}/notes.txt",
                                     "sqlite:///{tmp_path}/no/such/folder/optuna.db", "nosuchdb://host/db"])
def test_a_storage_that_is_no_database_is_refused_and_a_file_it_names_is_left_alone(storage, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, not a database\n")
    config = compose_search(f"hydra.sweeper.storage={storage.format(tmp_path=tmp_path)}")
    with pytest.raises(ConfigError) as raised:
        search.check(config, f"sqlite:///{tmp_path / 'mlflow.db'}", same_machine=True)
    assert raised.value.key == "hydra.sweeper.storage" and "expected an Optuna database" in raised.value.problem
    assert notes.read_text() == "my notes, not a database\n"


def test_the_study_lives_beside_the_sqlite_store_and_a_remote_launcher_needs_a_server_database(tmp_path):
    config = compose_search()
    assert search.storage_url(config, f"sqlite:///{tmp_path}/mlflow.db") == f"sqlite:///{tmp_path}/optuna.db"
    with pytest.raises(ConfigError) as raised:
        search.check(config, f"sqlite:///{tmp_path}/mlflow.db", same_machine=False)
    assert raised.value.key == "hydra.sweeper.storage" and "every job can reach" in raised.value.problem


def test_the_storage_tag_holds_no_password():
    url = "postgresql+psycopg://lab:secret@db.example:5432/optuna"
    assert search.without_password(url) == "postgresql+psycopg://lab@db.example:5432/optuna"


def search_trials(tracking_uri: str):
    """The search's parent, and its children by trial number (each number once)."""
    parent, children = parent_and_children(all_runs(tracking_uri))
    numbers = [int(run.data.tags[search.NUMBER_TAG]) for run in children]
    assert len(set(numbers)) == len(numbers), "a trial ran twice"
    return parent, dict(zip(numbers, children))


@pytest.mark.slow
def test_a_search_prunes_the_trials_that_cannot_learn_and_keeps_their_runs(tmp_path, tracking_uri):
    result = run_module("rl_pipeline", "-m", *PRUNABLE, "hydra.sweeper.n_trials=4", cwd=tmp_path, tracking_uri=tracking_uri)
    assert result.returncode == 0, result.stderr[-3000:]

    parent, trials = search_trials(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    study = optuna.load_study(study_name=parent.data.tags[search.STUDY_TAG], storage=parent.data.tags[search.STORAGE_TAG])
    assert parent.data.tags[search.STORAGE_TAG] == f"sqlite:///{tmp_path / 'optuna.db'}"  # beside the MLflow store
    states = {trial.number: trial.state.name for trial in study.trials}
    assert states == {number: run.data.tags[search.STATE_TAG] for number, run in trials.items()}
    pruned = [run for run in trials.values() if run.data.tags[search.STATE_TAG] == "PRUNED"]
    assert pruned and all(run.info.status == "FINISHED" for run in trials.values())
    for run in pruned:
        assert float(run.data.params["optimizer.lr"]) == CANNOT
        stopped_at = int(run.data.tags[search.PRUNED_AT_TAG])
        assert stopped_at < 3072 and run.data.metrics["final/env_steps"] == stopped_at
        assert "test/return_mean" not in run.data.metrics  # no test episodes spent on it
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/return_lower_bound")][-1] == stopped_at
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"checkpoints", "learning_curve.png"} <= artifacts and "model" not in artifacts
    best = study.best_trial
    assert best.state.name == "COMPLETE" and best.params["optimizer.lr"] == LEARNS
    assert best.value == trials[best.number].data.metrics["test/return_mean"]
    assert parent.data.tags["optuna.best_trial"] == str(best.number)
    assert parent.data.tags["optuna.best.optimizer.lr"] == str(LEARNS)
    assert parent.data.metrics["optuna/trials_pruned"] == len(pruned)
    assert parent.data.metrics["optuna/trials_complete"] == 4 - len(pruned)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")} == {
        "optuna/trials.csv", "optuna/optimization_history.png"}  # importances need two searched keys


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_its_study_and_parent_running_every_trial_once(tmp_path, tracking_uri):
    unpruned = [arg for arg in PRUNABLE if not arg.startswith("hydra.sweeper.pruner.")]
    search_args = (*unpruned, "hydra.sweeper.n_trials=3", "hydra/sweeper/pruner=none", "trainer.max_env_steps=4096",
                   "trainer.checkpoint_interval_env_steps=1024", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    sweep = start_module("rl_pipeline", "-m", *search_args, cwd=tmp_path, tracking_uri=tracking_uri, start_new_session=True)
    try:
        said = "".join(read_until(sweep, f"{tmp_path / 'sweep' / '1'}/checkpoints/last.ckpt at 1024 env steps"))
        os.killpg(sweep.pid, signal.SIGKILL)  # mid-trial: no handler runs, nothing is closed
        sweep.wait(timeout=60)
    finally:
        sweep.kill()
    sweep_id = re.search(r"MLflow sweep (\w+):", said).group(1)
    parent, trials = search_trials(tracking_uri)
    assert parent.info.status == "RUNNING" and trials[1].info.status == "RUNNING"

    resumed = run_module("rl_pipeline", "-m", *search_args, f"resume={sweep_id}", cwd=tmp_path, tracking_uri=tracking_uri)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming sweep {sweep_id}: trials 1 were running when it stopped" in resumed.stderr

    parent, trials = search_trials(tracking_uri)
    assert parent.info.run_id == sweep_id and parent.info.status == "FINISHED"
    assert sorted(trials) == [0, 1, 2, 3]  # trial 1 lost with the sweep, asked again as trial 3
    assert trials[1].info.status == "KILLED" and trials[1].data.tags[search.STATE_TAG] == "FAIL"
    assert all(trials[n].info.status == "FINISHED" and trials[n].data.tags[search.STATE_TAG] == "COMPLETE" for n in (0, 2, 3))
    study = optuna.load_study(study_name=parent.data.tags[search.STUDY_TAG], storage=parent.data.tags[search.STORAGE_TAG])
    assert [trial.state.name for trial in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert parent.data.metrics["optuna/trials_complete"] == 3 and parent.data.metrics["optuna/trials_lost"] == 1


@pytest.mark.slow
@pytest.mark.parametrize(("mistake", "said"), [
    ("optimizer.lr=interval(3e-3,3e-4)", "Config error: hydra.sweeper.params.optimizer.lr: expected choice(), range()"),
    ("hydra.sweeper.pruner._target_=optuna.pruners.NoSuchPruner", "Config error: hydra.sweeper.pruner: expected an Optuna pruner"),
    ("hydra.sweeper.storage={tmp_path}/notes.txt", "Config error: hydra.sweeper.storage: expected an Optuna database"),
], ids=["search-space", "pruner", "storage"])
def test_a_bad_search_is_one_line_and_exit_2_before_any_run(tmp_path, tracking_uri, mistake, said):
    (tmp_path / "notes.txt").write_text("not a database\n")
    result = run_module("rl_pipeline", "-m", *SEARCH, mistake.format(tmp_path=tmp_path), cwd=tmp_path, tracking_uri=tracking_uri)
    assert result.returncode == 2 and result.stderr.strip().startswith(said), result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1
    assert not all_runs(tracking_uri) and (tmp_path / "notes.txt").read_text() == "not a database\n"


@pytest.mark.slow
def test_a_search_under_joblib_runs_two_trials_at_a_time_on_one_sqlite_study(tmp_path, tracking_uri):
    result = run_module("rl_pipeline", "-m", *PRUNABLE, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", cwd=tmp_path, tracking_uri=tracking_uri)
    assert result.returncode == 0, result.stderr[-3000:]
    parent, trials = search_trials(tracking_uri)
    study = optuna.load_study(study_name=parent.data.tags[search.STUDY_TAG], storage=parent.data.tags[search.STORAGE_TAG])
    assert {t.number: t.state.name for t in study.trials} == {n: run.data.tags[search.STATE_TAG] for n, run in trials.items()}
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 4 and len(study.trials) == 4
    assert "PRUNED" in {t.state.name for t in study.trials}  # a job pruned on what its sibling's job reported
    assert all(run.info.status == "FINISHED" and run.data.tags["torch_threads"] == "1" for run in trials.values())
    for trial in study.trials:  # each job reported its evaluations to its own trial
        steps = [m.step for m in mlflow.MlflowClient(tracking_uri).get_metric_history(
            trials[trial.number].info.run_id, "eval/return_lower_bound")]
        assert sorted(trial.intermediate_values) == steps


@pytest.mark.slow
def test_the_wheel_ships_the_sweeper_plugin_in_hydras_namespace_package(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ beside the sources
    source.mkdir()
    root = Path(search.__file__).parents[2]
    for part in ("pyproject.toml", "README.md", "rl_pipeline", "hydra_plugins"):
        (shutil.copytree if (root / part).is_dir() else shutil.copy)(root / part, source / part)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("rl_pipeline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hydra_plugins/rl_pipeline_optuna/optuna_sweeper.py" in names
    assert "hydra_plugins/__init__.py" not in names  # a namespace package, shared with Hydra's other plugins


@pytest.mark.slow
def test_ctrl_c_on_a_search_says_how_to_resume_the_sweep_and_that_command_completes_it(tmp_path, tracking_uri):
    unpruned = [arg for arg in PRUNABLE if not arg.startswith("hydra.sweeper.pruner.")]
    search_args = (*unpruned, "hydra.sweeper.n_trials=2", "hydra/sweeper/pruner=none", "trainer.max_env_steps=4096",
                   "trainer.checkpoint_interval_env_steps=1024")
    sweep = start_module("rl_pipeline", "-m", *search_args, cwd=tmp_path, tracking_uri=tracking_uri,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        read_until(sweep, "/1/checkpoints/last.ckpt at 1024 env steps")
        os.killpg(sweep.pid, signal.SIGINT)  # as a terminal sends Ctrl-C
        assert sweep.wait(timeout=120) == 1
        line = sweep.stderr.read().strip().splitlines()[-1]
    finally:
        sweep.kill()
    parent, trials = search_trials(tracking_uri)
    assert parent.info.status == "KILLED" and trials[1].info.status == "KILLED"
    assert trials[1].data.tags[search.STATE_TAG] == "FAIL" and trials[1].data.tags[search.LOST] == "true"
    command = re.search(r"go on with: python -m rl_pipeline (.+)$", line).group(1)
    assert command.endswith(f"resume={parent.info.run_id}") and command.startswith("-m ")

    resumed = run_module("rl_pipeline", *shlex.split(command), cwd=tmp_path, tracking_uri=tracking_uri)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    parent, trials = search_trials(tracking_uri)
    assert parent.info.status == "FINISHED" and sorted(trials) == [0, 1, 2]
    assert [trials[n].data.tags[search.STATE_TAG] for n in (0, 1, 2)] == ["COMPLETE", "FAIL", "COMPLETE"]
