"""The services a lab runs for sweeps beyond one machine, started on 127.0.0.1 and stopped again, for the
tests and the scale-out benchmark: PostgreSQL, an MLflow server on a database, a Ray head node."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rl_pipeline.ui import SERVER_ENV, free_port, stop

STOP_TIMEOUT_S = 60  # a service may take its time to shut down cleanly
POSTGRES_BIN = Path("/usr/lib/postgresql")  # Debian's postgresql: <version>/bin/initdb, postgres, pg_isready


def wait_for(ready: Callable[[], bool], process: subprocess.Popen, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (exit code {process.poll()})")
        time.sleep(0.25)


@contextmanager
def postgres(port: int | None = None) -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 over a fresh data directory; yields its database's SQLAlchemy URI.

    PostgreSQL refuses to run as root: as root, it runs as the `postgres` user.
    """
    port = port or free_port()
    binaries = max(POSTGRES_BIN.glob("*/bin"), key=lambda path: int(path.parent.name))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="rl-pipeline-postgres-"))  # not under pytest's tmp: the user must reach it
    if as_postgres:
        shutil.chown(home, "postgres")
    data = home / "data"
    subprocess.run([*as_postgres, binaries / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    server = subprocess.Popen(
        [*as_postgres, binaries / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", home,
         "-c", "max_connections=200"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    ready = [binaries / "pg_isready", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-q"]
    try:
        wait_for(lambda: subprocess.run(ready).returncode == 0, server, "PostgreSQL")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        stop(server, signal.SIGINT, STOP_TIMEOUT_S)  # PostgreSQL's fast shutdown: it does not wait for clients to leave
        shutil.rmtree(home, ignore_errors=True)


def create_database(url: str, name: str) -> str:
    """A new database on the PostgreSQL server of `url` (a SQLAlchemy URI); its SQLAlchemy URI."""
    import psycopg

    server = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + f"/{name}"


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, port: int | None = None, workers: int = 1) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 over `backend_uri`, serving artifacts from `artifacts`; yields its URL."""
    port = port or free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(workers), "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts)],
        cwd=artifacts.parent, env={**os.environ, **SERVER_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(url + "/health"), server, "mlflow server")
        yield url
    finally:
        stop(server, timeout_s=STOP_TIMEOUT_S)  # the server and its workers


@contextmanager
def ray_head(num_cpus: int = 2, port: int | None = None) -> Iterator[str]:
    """A Ray cluster's head node on 127.0.0.1 (`ray start --head`, kept in the foreground); yields its address."""
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    head = subprocess.Popen(
        [Path(sys.executable).parent / "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false",
         "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    status = [Path(sys.executable).parent / "ray", "status", f"--address={address}"]
    try:
        wait_for(lambda: subprocess.run(status, capture_output=True).returncode == 0, head, "Ray head")
        yield address
    finally:
        stop(head, timeout_s=STOP_TIMEOUT_S)
