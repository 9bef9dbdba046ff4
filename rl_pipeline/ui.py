"""The way into the MLflow UI: `python -m rl_pipeline.ui [SWEEP_ID] [--port 5000]`.

Starts the MLflow UI on the configured store (or uses the server that MLFLOW_TRACKING_URI names)
and prints a link to the experiment's runs in the Model-training view, as charts; with a sweep id,
to that sweep's runs grouped by what it varies (see views.py).

The server takes seconds to start, so it starts first: this module imports nothing heavy (MLflow,
torch) until it has.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from rl_pipeline.errors import ConfigError
from rl_pipeline.tracking import store
from rl_pipeline.tracking.store import DEFAULT_PORT, local_address

# MLflow 3.17's server starts a job runner (8 consumer processes, 20+ s to its first answer, CPU while
# idle) for features that these servers never use.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
STOP_TIMEOUT_S = 10  # uvicorn waits for open connections to close


def serve(uri: str, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1 over the database store, its artifacts served from where runs wrote them."""
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
        "--port", str(port), "--workers", "1",
    ]
    # Its workers form one process group, stopped as one.
    return subprocess.Popen(command, env={**os.environ, **SERVER_ENV}, start_new_session=True)


def stop(process: subprocess.Popen, signum: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """The process's whole group (it was started in a session of its own): `signum`, then SIGKILL if it has
    not gone within `timeout_s`. Whatever of the group is left when its leader has exited goes too."""
    try:
        os.killpg(process.pid, signum)
        process.wait(timeout=timeout_s)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def check_port_free(port: int) -> None:
    """One line naming a port to try, rather than the server's start-up log ending in an exit."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise SystemExit(f"ui: port {port} on 127.0.0.1 is in use; try --port {free_port()}") from None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def wait_until_up(address: str, server: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"ui: mlflow server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"ui: mlflow server did not answer at {address} within {timeout_s:.0f} s")


def links(uri: str, args: argparse.Namespace) -> str:
    """The pages to open, their views saved first: MLflow (and torch, through the project) imported only now."""
    from rl_pipeline.tracking import mlflow_runs, views

    address = views.ui_address(uri, args.port)
    return "\n".join(views.pages(mlflow_runs.client(uri), args.experiment, address, args.sweep_id))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rl_pipeline.ui", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_id", nargs="?", help="a sweep's id (its parent run's id): open that sweep")
    parser.add_argument("--experiment", default="rl_pipeline", help="the experiment (logger.experiment_name)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="where to serve a database store's UI")
    args = parser.parse_args(argv)
    uri = store.tracking_uri()
    try:
        store.check_store(uri)
    except ConfigError as error:
        raise SystemExit(f"ui: {error}") from None
    database = store.sqlite_path(uri)
    if database is not None and not database.exists():
        raise SystemExit(f"ui: no MLflow store at {database} yet; train a run first (or set MLFLOW_TRACKING_URI)")
    if store.is_server(uri):
        print(f"Open {links(uri, args)}", flush=True)
        return
    check_port_free(args.port)
    # A closed terminal, `timeout` or a service manager stop the server with this process, as Ctrl-C does;
    # Ctrl-C does even where this process was started with SIGINT ignored (a script's background job).
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, exit_on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server = serve(uri, args.port)
    try:
        pages = links(uri, args)  # while the server starts
        wait_until_up(local_address(args.port), server)
        print(f"MLflow UI on {uri}; open {pages}\n(Ctrl-C stops it)", flush=True)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(server)


if __name__ == "__main__":
    main()
