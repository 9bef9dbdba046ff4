"""Where the MLflow store is, and whether it is one: answered without importing MLflow.

`python -m rl_pipeline.ui` checks the store and starts its server before it imports anything heavy.
"""

import os
import urllib.request
from pathlib import Path

from rl_pipeline.errors import ConfigError

DEFAULT_STORE = Path("outputs") / "mlflow.db"
SERVER_SCHEMES = ("http", "https")
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # SQLAlchemy's, with or without +driver
SQLITE_HEADER = b"SQLite format 3\x00"
DEFAULT_PORT = 5000  # the UI's


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set; else an embedded SQLite store in ./outputs (no server needed)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE.resolve()}"


def is_server(uri: str) -> bool:
    return uri.startswith(tuple(f"{scheme}://" for scheme in SERVER_SCHEMES))


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def check_store(uri: str, timeout_s: float = 3.0) -> None:
    """The store must be a server that answers, or a database: checked before anything is written to it."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if ":" in uri else ""
    if scheme not in SERVER_SCHEMES + DATABASE_SCHEMES:
        what = "an http(s):// MLflow server or a database URI (sqlite:///, postgresql://, mysql://, mssql://)"
        raise ConfigError("MLFLOW_TRACKING_URI", f"expected {what}, got {uri}")
    if scheme in SERVER_SCHEMES:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
                pass
        except OSError as error:
            raise ConfigError("MLFLOW_TRACKING_URI", f"expected a reachable MLflow server, got {uri} ({error})") from None
    path = sqlite_path(uri)
    if path is None:
        return
    if path.is_dir() or (path.exists() and path.stat().st_size and not is_sqlite(path)):
        raise ConfigError("MLFLOW_TRACKING_URI", f"expected an SQLite database file, got {path}, which is not one")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("MLFLOW_TRACKING_URI", f"cannot create the store's folder {path.parent}: {error.strerror}") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError("MLFLOW_TRACKING_URI", f"expected a writable SQLite store, got {path}")


def is_sqlite(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(len(SQLITE_HEADER)) == SQLITE_HEADER


def local_address(port: int) -> str:
    """A server's address on this machine."""
    return f"http://127.0.0.1:{port}"
