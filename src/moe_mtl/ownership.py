"""Folders owned by a live process: one fit per run folder, and the work folders of a data preparation.

A fit holds `<run folder>/.moe-mtl-fit.lock` (its host and process id) while it trains; a second fit of the same
folder is refused while that process lives, and a lock whose process is gone (killed) is taken over.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError

LOCK_NAME = ".moe-mtl-fit.lock"
# environment variables that name a process's rank under the launchers Lightning supports (torchrun, SLURM, its
# own subprocess launcher): the first process has none of them, or all "0"
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def first_process() -> bool:
    """Whether this is the job's first process (rank 0 on node 0), before any process group exists."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def lock_holder(path: Path) -> tuple[str, int] | None:
    """(host, pid) written in a lock file; None if it is gone or unreadable."""
    try:
        host, pid = path.read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


@contextmanager
def run_folder_lock(folder: Path) -> Iterator[None]:
    """Hold `folder` for this process while the block runs; a UsageError if a live process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path, me = folder / LOCK_NAME, (socket.gethostname(), os.getpid())
    while True:
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = lock_holder(path)
            if holder is not None and (holder[0] != me[0] or process_alive(holder[1])):
                raise UsageError(
                    f"run folder {folder} is in use by a fit that is still running (process {holder[1]} on "
                    f"{holder[0]}); give this run its own folder (--trainer.logger.init_args.version, or leave the "
                    f"version unset), or wait for that fit to end. If none runs, remove {path}"
                ) from None
            path.unlink(missing_ok=True)  # its process is gone: a killed fit's
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(f"{me[0]} {me[1]}\n")
        break
    try:
        yield
    finally:
        if lock_holder(path) == me:
            path.unlink(missing_ok=True)
