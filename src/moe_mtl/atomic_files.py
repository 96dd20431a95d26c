"""Files written whole or not at all: a write goes to a temporary file beside its target, which then replaces the
target in one step (`os.replace`). A crash, a full disk or a signal mid-write leaves the old file, never half a new
one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new contents to; on leaving without an error, it is flushed to disk
    and moved over `path`. On an error it is deleted and `path` is left as it was. Creates `path`'s folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # beside the target: os.replace is atomic only within one file system; a unique name, so that concurrent
    # writers (DDP ranks, a requeued job) never share a temporary file
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield temp
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
