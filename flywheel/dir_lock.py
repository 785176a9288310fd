"""One driver per run (or sweep) directory: an exclusive ``flock`` on ``<dir>/driver.lock``, held while the
run is open and released by the OS however the driver ends (SIGKILL included).

A second ``flywheel run --resume DIR`` (another terminal, a retry while the first still runs) would otherwise write
the same store, checkpoints and MLflow run as the first. Within one process a directory's lock is taken once
(``hold`` again is a no-op) and freed by ``release``.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from flywheel.config import ConfigError

LOCK_FILE = "driver.lock"
_held: dict[str, object] = {}


class DirectoryInUse(ConfigError):
    """Another process holds the directory."""


def hold(directory: str | Path) -> None:
    """Take ``directory``'s lock or raise ``DirectoryInUse`` naming the process that holds it."""
    directory = Path(directory).resolve()
    key = str(directory)
    if key in _held:
        return
    f = open(directory / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
        f.close()
        raise DirectoryInUse(f"{directory} is in use by another flywheel process ({holder}); wait for it to end, "
                             "or stop it, before running this directory again") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            f"{' '.join(sys.argv)[:500]}\n")
    f.flush()
    _held[key] = f


def release(directory: str | Path) -> None:
    """Give ``directory``'s lock back (the lock file stays; it holds no lock once its holder is gone)."""
    f = _held.pop(str(Path(directory).resolve()), None)
    if f is not None:
        f.close()
