"""On-disk row arrays that a full disk cannot turn into a SIGBUS and that stay out of RSS.

A ``np.memmap`` over a sparse file gets its blocks only when a page is first written; on a
full disk that write is a SIGBUS that kills the process without a message. Here the space
is checked first and then reserved with ``posix_fallocate``, so a full disk is a one-line
error before any work. Rows are read and written with ``pread``/``pwrite`` rather than
mapped: mapped pages count in the process's resident set (a 1M-particle cache would
show as gigabytes of RSS), pages read through the file are only page cache, which the
kernel reclaims.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np

from companion.errors import DiskFullError
from companion.outdir import check_free_space

SPARE_BYTES = 64 << 20  # left free beside the cache (checkpoints, outputs, logs)


def _size(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


class RowFile:
    """A (rows, ...) array in a file, indexed by row: ``f[idx]`` reads, ``f[idx] = a`` writes
    (``idx``: an int array or a slice); ``np.asarray(f)`` reads it all. ``offset``: bytes
    before the first row (a file header)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: Any, writable: bool,
                 offset: int = 0) -> None:  # fmt: skip
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self.offset = int(offset)
        self._fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def _runs(self, idx: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rows = np.arange(self.shape[0])[idx] if isinstance(idx, slice) else np.asarray(idx)
        rows = rows.astype(np.int64).reshape(-1)
        order = np.argsort(rows, kind="stable")
        r = rows[order]
        starts = np.flatnonzero(np.r_[True, np.diff(r) != 1])
        ends = np.r_[starts[1:], len(r)]
        return r, order, starts, ends

    def __getitem__(self, idx: Any) -> np.ndarray:
        r, order, starts, ends = self._runs(idx)
        buf = np.empty((len(r), *self.shape[1:]), self.dtype)
        flat = buf.reshape(len(r), -1).view(np.uint8).reshape(len(r), self.row_bytes)
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            want = (b - a) * self.row_bytes
            at = self.offset + int(r[a]) * self.row_bytes
            got = os.preadv(self._fd, [memoryview(flat[a:b]).cast("B")], at)
            if got != want:
                raise OSError(errno.EIO, f"{self.path}: short read (truncated cache)")
        out = np.empty_like(buf)
        out[order] = buf
        return out

    def __setitem__(self, idx: Any, values: Any) -> None:
        r, order, starts, ends = self._runs(idx)
        vals = np.ascontiguousarray(np.broadcast_to(
            np.asarray(values, self.dtype), (len(r), *self.shape[1:]))[order])  # fmt: skip
        flat = vals.reshape(len(r), -1).view(np.uint8).reshape(len(r), self.row_bytes)
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            data = memoryview(np.ascontiguousarray(flat[a:b])).cast("B")
            off, done = self.offset + int(r[a]) * self.row_bytes, 0
            while done < len(data):
                done += os.pwrite(self._fd, data[done:], off + done)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[slice(None)]
        return a if dtype is None else a.astype(dtype)

    def flush(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def open_rows(path: Path, shape: tuple[int, ...], dtype: Any) -> RowFile:
    """An existing row file, read-only."""
    return RowFile(path, shape, dtype, writable=False)


def open_array(path: Path, shape: tuple[int, ...], dtype: Any, *, what: str,
               keep: bool = False) -> RowFile:  # fmt: skip
    """A writable row file at ``path`` whose blocks are all allocated (``keep``: an existing
    file of the right size is reopened as it is, for resuming)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    path.parent.mkdir(parents=True, exist_ok=True)
    have = path.stat().st_size if path.is_file() else 0
    if not (keep and have == nbytes):
        path.unlink(missing_ok=True)
        check_free_space(path, nbytes, what, spare=SPARE_BYTES)
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
    return RowFile(path, shape, dtype, writable=True)
