"""Time to a solved CartPole: the pipeline (A) against Stable-Baselines3 (B) and a plain PyTorch loop (C).

    python -m benchmarks.speed [--seeds 0 1 2] [--out outputs/benchmarks]     (pip install -e '.[bench]')

Runs, seed by seed and one process at a time, each system as its own process from start to exit:
  A  python -m rl_pipeline +experiment=dqn (and +experiment=rainbow_lite), as a user runs it;
  B  benchmarks/sb3_dqn.py: SB3's DQN, rl-baselines3-zoo's hyperparameters, the same stop rule;
  C  benchmarks/plain_dqn.py: experiment=dqn as one plain PyTorch loop, the same stop rule.
Every process stops once solved (or at 100,000 env steps), then tests its final policy on the same
100 held-out episodes. Prints a markdown table and writes it, with the raw figures as JSON, to --out.
A logs to its own SQLite store there, created before the first timed run (see "store creation").
"""

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from benchmarks import services
from rl_pipeline import ui as ui_command

SYSTEMS = {  # name -> command line; {seed} and {out} are filled in per run
    "A dqn": "-m rl_pipeline +experiment=dqn seed={seed} hydra.run.dir={out}/run",
    "A rainbow_lite": "-m rl_pipeline +experiment=rainbow_lite seed={seed} hydra.run.dir={out}/run",
    "B sb3": "-m benchmarks.sb3_dqn --seed {seed}",
    "C plain": "-m benchmarks.plain_dqn --seed {seed}",
}
RATIOS = {"A dqn / B sb3": ("A dqn", "B sb3"), "A rainbow_lite / B sb3": ("A rainbow_lite", "B sb3"),
          "A dqn / C plain": ("A dqn", "C plain")}
RUN_ID = re.compile(r"^MLflow run (\w+):", re.MULTILINE)
LINK = re.compile(r"http://127\.0\.0\.1:\d+/\S*")
STORE_OPEN = "import sys; from mlflow import MlflowClient; MlflowClient(sys.argv[1]).search_experiments()"


def run_process(args: list[str], log: Path, env: dict) -> dict:
    """Runs `python args` to its exit; its wall seconds, start time, peak RSS and output."""
    with open(log, "w") as output:
        started = time.time()
        process = subprocess.Popen([sys.executable, *args], stdout=output, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not all children's
        ended = time.time()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{shlex.join(args)} exited {process.returncode}; see {log}")
    return {"started": started, "wall_s": ended - started, "ended": ended,
            "peak_rss_mb": usage.ru_maxrss / 1024, "output": log.read_text()}


def pipeline_result(output: str, uri: str) -> dict:
    """What the pipeline's MLflow run holds of the figures that B and C write themselves."""
    metrics = MlflowClient(uri).get_run(RUN_ID.search(output).group(1)).data.metrics
    return {"env_steps": metrics["final/env_steps"], "solved_env_steps": metrics.get("final/solved_env_steps"),
            "test_return_mean": metrics["test/return_mean"]}


def run_system(system: str, seed: int, out: Path, uri: str) -> dict:
    run_dir = out / f"{system.replace(' ', '-')}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    times, result = run_dir / "timestamps.json", run_dir / "result.json"
    args = shlex.split(SYSTEMS[system].format(seed=seed, out=run_dir))
    if system.startswith("A"):
        args.append(f"+callbacks.timestamps={{_target_: benchmarks.timing.Timestamps, path: '{times}'}}")
    else:
        args += ["--result", str(result)]
    process = run_process(args, run_dir / "output.log", {**os.environ, "MLFLOW_TRACKING_URI": uri})
    if system.startswith("A"):
        figures = {**pipeline_result(process["output"], uri), **json.loads(times.read_text())}
    else:
        figures = json.loads(result.read_text())
    training_s = figures["last_update"] - figures["first_env_step"]
    return {
        "system": system, "seed": seed,
        "solved_env_steps": figures["solved_env_steps"],
        "wall_s": process["wall_s"],
        "env_steps_per_s": figures["env_steps"] / training_s,
        "startup_s": figures["first_env_step"] - process["started"],
        "winddown_s": process["ended"] - figures["last_update"],
        "peak_rss_mb": process["peak_rss_mb"],
        "test_return_mean": figures["test_return_mean"],
    }


def store_creation_s(out: Path) -> dict:
    """Seconds to open a fresh SQLite store (creating it) and the same store again, each in a new process."""
    store = out / "fresh-store.db"
    store.unlink(missing_ok=True)
    uri = f"sqlite:///{store.resolve()}"
    def open_store() -> float:
        return run_process(["-c", STORE_OPEN, uri], out / "store.log", dict(os.environ))["wall_s"]

    fresh = open_store()
    existing = open_store()
    return {"fresh_s": fresh, "existing_s": existing, "extra_s": fresh - existing}


def ui_start_s(uri: str) -> float:
    """Seconds from starting `python -m rl_pipeline.ui` on the store to its printed link answering."""
    started = time.time()
    ui = subprocess.Popen([sys.executable, "-m", "rl_pipeline.ui", "--port", str(ui_command.free_port())],
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        link = next(LINK.search(line).group(0) for line in ui.stdout if LINK.search(line))
        services.wait_for(lambda: services.answers(link), ui, "the UI's link")
        return time.time() - started
    finally:
        ui_command.stop(ui, signal.SIGINT, services.STOP_TIMEOUT_S)


def table(rows: list[dict]) -> str:
    lines = [
        "| system | seed | env steps to solve | wall s to solve | env steps/s | start-up s | wind-down s "
        "| peak RSS MB | held-out return (100 ep.) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        solved = f"{r['solved_env_steps']:,.0f}" if r["solved_env_steps"] else "not solved"
        lines.append(
            f"| {r['system']} | {r['seed']} | {solved} | {r['wall_s']:.1f} | {r['env_steps_per_s']:,.0f} "
            f"| {r['startup_s']:.1f} | {r['winddown_s']:.1f} | {r['peak_rss_mb']:,.0f} | {r['test_return_mean']:.1f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> tuple[str, dict]:
    """Medians per system, and the ratios of wall seconds: per seed, their median, and of the medians."""
    by_system = {s: {r["seed"]: r for r in rows if r["system"] == s} for s in SYSTEMS}
    medians = {s: {key: statistics.median(r[key] for r in runs.values()) for key in
                   ("wall_s", "env_steps_per_s", "startup_s", "winddown_s", "peak_rss_mb")}
               for s, runs in by_system.items()}
    lines = ["| system | median wall s | median env steps/s | median start-up s | median wind-down s | median peak RSS MB |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s} | {m['wall_s']:.1f} | {m['env_steps_per_s']:,.0f} | {m['startup_s']:.1f} | {m['winddown_s']:.1f} "
              f"| {m['peak_rss_mb']:,.0f} |" for s, m in medians.items()]
    lines += ["", "| wall-time ratio | per seed | median of per-seed | ratio of medians |", "|---|---|---|---|"]
    ratios = {}
    for name, (a, b) in RATIOS.items():
        per_seed = {seed: by_system[a][seed]["wall_s"] / by_system[b][seed]["wall_s"] for seed in by_system[a]}
        ratios[name] = {"per_seed": per_seed, "median": statistics.median(per_seed.values()),
                        "of_medians": medians[a]["wall_s"] / medians[b]["wall_s"]}
        seeds = ", ".join(f"{seed}: {ratio:.2f}" for seed, ratio in per_seed.items())
        lines.append(f"| {name} | {seeds} | {ratios[name]['median']:.2f} | {ratios[name]['of_medians']:.2f} |")
    return "\n".join(lines), {"medians": medians, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(args.out / 'mlflow.db').resolve()}"
    MlflowClient(uri).search_experiments()  # A's store exists before the first timed run
    store = store_creation_s(args.out)
    rows = []
    for seed in args.seeds:
        for system in SYSTEMS:
            rows.append(run_system(system, seed, args.out, uri))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    summary_text, figures = summary(rows)
    ui_s = ui_start_s(uri)
    report = (
        f"{table(rows)}\n\n{summary_text}\n\nStore creation: a fresh SQLite store opens in {store['fresh_s']:.2f} s, "
        f"an existing one in {store['existing_s']:.2f} s: {store['extra_s']:.2f} s extra for a first run.\n"
        f"python -m rl_pipeline.ui: its link answered {ui_s:.1f} s after it started.\n"
    )
    print(report)
    (args.out / "speed.md").write_text(report)
    (args.out / "speed.json").write_text(
        json.dumps({"runs": rows, "store_creation": store, "ui_start_s": ui_s, **figures}, indent=2)
    )


if __name__ == "__main__":
    main()
