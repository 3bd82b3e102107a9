"""Atomic file writes: every file appears complete or not at all.

A file is written under a temporary name in its own directory and renamed onto the target.
The result has the mode a plain ``open()`` would give it (the umask's, or the existing file's
mode when it is replaced), not ``mkstemp``'s 0600, so collaborators on a shared project can read it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path


def _umask_mode() -> int:
    mask = os.umask(0o022)  # read once, at import (single-threaded)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _umask_mode()


def _target_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return FILE_MODE


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _commit(tmp: Path, path: Path) -> None:
    os.chmod(tmp, _target_mode(path))
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block ends
    without an exception, delete it otherwise."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_paths(paths: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """Temporary paths for a set of files; all are renamed into place only after the block
    succeeds, so on any failure every temporary is removed and no target changes."""
    targets = {key: Path(p) for key, p in paths.items()}
    with ExitStack() as stack:
        tmps: dict[str, Path] = {}
        for key, path in targets.items():
            tmps[key] = _temporary(path)
            stack.callback(tmps[key].unlink, missing_ok=True)
        yield tmps
        for key, path in targets.items():
            _commit(tmps[key], path)


def atomic_write_bytes(path: str | Path, data: bytes | memoryview, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (``fsync``: flush to disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="\n") as fh:
        fh.write(text)
