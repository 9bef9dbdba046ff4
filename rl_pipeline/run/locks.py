"""One process at a time: exclusive locks on files, for a run being trained and a sweep being run.

The kernel drops a lock when its process ends, however it ends, so what a killed process held can be
resumed at once, while what a live one holds (or a resume in progress) cannot be taken a second time.
A lock guards against processes on the same machine only.
"""

import fcntl
import os
import tempfile
from pathlib import Path

from rl_pipeline.errors import ConfigError

RUN_LOCK = ".lock"  # in a run's checkpoint folder


class ProcessLock:
    """An exclusive lock on `path`; taken twice, `ConfigError(key, refusal)`, `{holder}` the holder's pid."""

    def __init__(self, path: Path, key: str, refusal: str):
        self.path = Path(path)
        self.key = key
        self.refusal = refusal
        self.file = None

    def acquire(self) -> "ProcessLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise ConfigError(self.key, self.refusal.format(holder=holder)) from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self) -> "ProcessLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


class RunLock(ProcessLock):
    """Held on a run's checkpoint folder while a process trains the run: two new runs never write into one
    folder, and a run is never resumed twice at once. `key` is the setting that chose the folder."""

    def __init__(self, directory: Path, key: str = "resume"):
        advice = "resume it once that process has stopped" if key == "resume" else "give this run its own folder"
        super().__init__(Path(directory) / RUN_LOCK, key,
                         f"the run in {directory} is being trained by another process (pid {{holder}}); {advice}")


class SweepLock(ProcessLock):
    """Held by the process that runs a sweep (its launcher's), from its parent run's creation or `resume=`
    to its end, so that a sweep is not resumed while it still runs: both would start its missing jobs."""

    def __init__(self, sweep_id: str):
        # A folder per user: one user's folder would refuse another's files. The empty lock files stay (the OS
        # clears its temp folder), since removing one could race a process that has just opened it.
        folder = Path(tempfile.gettempdir()) / f"rl_pipeline-sweeps-{os.getuid()}"
        super().__init__(folder / f"{sweep_id}.lock", "resume",
                         f"sweep {sweep_id} is being run by another process on this machine (pid {{holder}}); "
                         "resume it once that process has stopped")
