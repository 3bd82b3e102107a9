"""On-disk arrays that a full disk cannot turn into a SIGBUS.

A ``np.memmap`` over a sparse file gets its blocks only when a page is first written; on a
full disk that write is a SIGBUS that kills the process without a message. Here the space
is checked first and then reserved with ``posix_fallocate``, so a full disk is a one-line
error before any work, and writes into the map never need new blocks.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from companion.errors import CompanionError

SPARE_BYTES = 64 << 20  # left free beside the cache (checkpoints, outputs, logs)


class DiskFullError(CompanionError):
    """Not enough free disk space for a cache or an output."""


def _size(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Raise DiskFullError (one line) when ``directory`` has under ``needed`` + spare bytes."""
    free = shutil.disk_usage(directory).free
    if free < needed + SPARE_BYTES:
        raise DiskFullError(
            f"{directory}: {what} needs {_size(needed)} but only {_size(free)} is free — "
            "free some space or use an output directory on a larger disk"
        )


def open_array(path: Path, shape: tuple[int, ...], dtype: Any, *, what: str,
               keep: bool = False) -> np.memmap:  # fmt: skip
    """A writable memmap at ``path`` whose blocks are all allocated (``keep``: an existing
    file of the right size is reopened as it is, for resuming)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    path.parent.mkdir(parents=True, exist_ok=True)
    have = path.stat().st_size if path.is_file() else 0
    if not (keep and have == nbytes):
        path.unlink(missing_ok=True)
        check_free_space(path.parent, nbytes, what)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                os.posix_fallocate(fd, 0, max(nbytes, 1))
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    os.close(fd)
                    fd = -1
                    path.unlink(missing_ok=True)
                    raise DiskFullError(
                        f"{path}: the disk filled while reserving {_size(nbytes)} for {what} — "
                        "free some space or use an output directory on a larger disk"
                    ) from None
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, max(nbytes, 1))  # no fallocate here: the check above holds
        finally:
            if fd >= 0:
                os.close(fd)
    return np.memmap(path, dtype=dtype, mode="r+", shape=shape)
