"""Compare runs: a row per configuration (its seeds together), a row per run, and each configuration's curve.

    python -m rl_pipeline.compare <sweep id | experiment name> [--out DIR]

A sweep id is the run id of a sweep's parent run (its `sweep_id` tag); the report covers its child
runs, one configuration per value of what the sweep varies besides the seed. An experiment name
covers every run of that experiment but the sweep parents, one configuration per set of params.
"""

import argparse
from pathlib import Path

import mlflow

from rl_pipeline.tracking import store
from rl_pipeline.tracking.comparison import find_runs, write_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rl_pipeline.compare", description=__doc__.split("\n")[0])
    parser.add_argument("target", help="a sweep id (the sweep's parent run id) or an experiment name")
    parser.add_argument("--out", type=Path, help="where to write the report (default: outputs/compare/TARGET)")
    args = parser.parse_args(argv)
    client = mlflow.MlflowClient(store.tracking_uri())
    runs, keys, title = find_runs(client, args.target)
    if not runs:
        raise SystemExit(f"compare: no runs found for {args.target!r}")
    out = args.out or Path("outputs") / "compare" / args.target
    report = write_report(client, runs, keys, out, title)
    print(report.paths[0].read_text(), end="")
    print(f"Wrote {', '.join(str(p) for p in report.paths)}")


if __name__ == "__main__":
    main()
