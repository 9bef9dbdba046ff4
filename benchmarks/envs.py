"""The presets beyond CartPole: every experiment x env x seed, beside rl-baselines3-zoo's and CleanRL's figures.

    python -m benchmarks.envs [--presets dqn rainbow_lite ...] [--envs acrobot ...] [--seeds 0 1 2 3 4]
                              [--jobs 1] [--out outputs/benchmarks/envs] [override ...]

One Hydra multirun, `python -m rl_pipeline -m +experiment=... env=... seed=...`, as a user runs it: each
run trains its preset's tuned settings for that env (conf/tuned/<preset>/<env>.yaml) to its budget and
tests on 100 held-out episodes. MLflow holds it as one sweep: a parent run with every run as a child.
Jobs run one at a time (`--jobs 2`: two at a time under joblib, one core each; the returns do not
depend on it, only the wall time). Then, per env and preset, the test return's IQM, mean and median
over seeds with their 95% stratified-bootstrap intervals (rl_pipeline/tracking/statistics.py), and a
sample-efficiency plot per env: the IQM of the eval return against env steps with its bootstrap band.
results.md, results.json and the plots go to --out and onto the parent run (artifacts, benchmark/).
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np

from rl_pipeline.tracking import comparison, statistics
from rl_pipeline.tracking.plots import plot_curves

PRESETS = ("dqn", "rainbow_lite", "qrdqn", "c51", "rainbow")
ENVS = ("cartpole", "acrobot", "mountain_car", "lunar_lander")
SWEEP_ID = re.compile(r"^MLflow sweep (\w+):", re.MULTILINE)

# Held-out test return at each env's budget: rl-baselines3-zoo's benchmark.md (one trained agent each;
# LunarLander-v2 there) and CleanRL's dqn.py docs (3 seeds, 500k env steps). The targets are issue 23's.
REFERENCE = {
    "CartPole-v1": {"zoo_budget": 50_000, "zoo_dqn": 500.0, "zoo_qrdqn": 500.0, "cleanrl_dqn": 488.7, "target": 475.0},
    "Acrobot-v1": {"zoo_budget": 100_000, "zoo_dqn": -76.6, "zoo_qrdqn": -69.1, "cleanrl_dqn": -91.5, "target": -75.0},
    "MountainCar-v0": {"zoo_budget": 120_000, "zoo_dqn": -100.9, "zoo_qrdqn": -106.0, "cleanrl_dqn": -195.0,
                       "target": -100.0},
    "LunarLander-v3": {"zoo_budget": 100_000, "zoo_dqn": 154.4, "zoo_qrdqn": 70.2, "cleanrl_dqn": None, "target": 200.0},
}
COLUMNS = ("env", "preset", "seeds", "env steps (mean)", "IQM [95% CI]", "mean [95% CI]", "median [95% CI]",
           "target", "met", "zoo DQN", "zoo QR-DQN", "CleanRL DQN")


def sweep_command(args: argparse.Namespace) -> list[str]:
    command = [
        sys.executable, "-m", "rl_pipeline", "-m", f"+experiment={','.join(args.presets)}", f"env={','.join(args.envs)}",
        f"seed={','.join(map(str, args.seeds))}", "logger.experiment_name=benchmark-envs",
        "trainer.lightning.enable_progress_bar=false", f"hydra.sweep.dir={args.out / 'sweep'}",
    ]
    if args.jobs > 1:
        command += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}"]
    return command + args.overrides


def run_sweep(command: list[str], log: Path) -> str:
    """Runs the multirun to its end, its output to `log`; the MLflow id of its parent run."""
    with log.open("w") as output:
        subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, check=False)
    found = SWEEP_ID.search(log.read_text())
    if found is None:
        raise SystemExit(f"benchmarks.envs: the sweep ended without its MLflow parent; see {log}")
    return found.group(1)


def result_row(env_id: str, preset: str, runs: list) -> dict:
    returns = np.array([run.data.metrics[comparison.RESULT_METRIC] for run in runs])
    reference = REFERENCE.get(env_id, {})
    summary = statistics.summarize([returns])
    return {
        "env": env_id, "preset": preset, "seeds": sorted(int(run.data.params["seed"]) for run in runs),
        "test_returns": returns.tolist(),
        "env_steps": float(np.mean([run.data.metrics.get("final/env_steps", np.nan) for run in runs])),
        **{name: vars(estimate) for name, estimate in summary.items()},
        "target": reference.get("target"),
        "met": None if "target" not in reference else bool(summary["iqm"].value >= reference["target"]),
        **{key: reference.get(key) for key in ("zoo_dqn", "zoo_qrdqn", "cleanrl_dqn")},
    }


def markdown(rows: list[dict]) -> str:
    def cell(value) -> str:
        return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    def estimate(row: dict, name: str) -> str:
        return str(statistics.Estimate(**row[name]))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        met = {True: "yes", False: "no", None: "-"}[row["met"]]
        lines.append("| " + " | ".join([
            row["env"], row["preset"], str(len(row["seeds"])), f"{row['env_steps']:,.0f}",
            *(estimate(row, name) for name in statistics.AGGREGATES), cell(row["target"]), met,
            cell(row["zoo_dqn"]), cell(row["zoo_qrdqn"]), cell(row["cleanrl_dqn"]),
        ]) + " |")
    return "\n".join(lines) + "\n"


def env_order(env_id: str) -> int:
    """The table's order: CartPole, Acrobot, MountainCar, LunarLander, then any other env."""
    return list(REFERENCE).index(env_id) if env_id in REFERENCE else len(REFERENCE)


def report(client: mlflow.MlflowClient, sweep_id: str, out: Path) -> list[dict]:
    """The table and the plots of the sweep's finished runs, in `out` and on the parent run."""
    children = comparison.sweep_children(client, client.get_run(sweep_id))
    finished = [run for run in children if run.info.status == "FINISHED" and comparison.RESULT_METRIC in run.data.metrics]
    by_env: dict[str, list] = {}
    for run in finished:
        by_env.setdefault(run.data.params["env.id"], []).append(run)
    rows, paths = [], []
    for env_id, runs in sorted(by_env.items(), key=lambda item: env_order(item[0])):
        by_preset: dict[str, list] = {}
        for run in runs:
            by_preset.setdefault(run.data.params["experiment"], []).append(run)
        rows += [result_row(env_id, preset, preset_runs) for preset, preset_runs in sorted(by_preset.items())]
        curves = comparison.aggregated_curves(client, runs, ["experiment"])
        paths.append(plot_curves(curves, out / f"{env_id}.png", f"{env_id}: IQM of the eval return over seeds, 95% bootstrap band"))
    table = markdown(rows)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"sweep_id": sweep_id, "rows": rows}, indent=2))
    for path in [out / "results.md", out / "results.json", *paths]:
        client.log_artifact(sweep_id, str(path), "benchmark")
    failed = len(children) - len(finished)
    print(table + (f"\n{failed} of {len(children)} runs did not finish; see the sweep's log.\n" if failed else ""))
    return rows


def output_folder(out: Path) -> Path:
    """`out`, made and absolute; the runs' MLflow store in it unless MLFLOW_TRACKING_URI names one."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--envs", nargs="+", default=list(ENVS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=1, help="jobs at a time (joblib when more than 1)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/envs"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.test_episodes=20")
    args = parser.parse_args(argv)
    args.out = output_folder(args.out)
    sweep_id = run_sweep(sweep_command(args), args.out / "sweep.log")
    report(mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]), sweep_id, args.out)


if __name__ == "__main__":
    main()
