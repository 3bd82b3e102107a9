"""One run per output directory: an exclusive lock, leftovers cleaned, write errors as one line.

:func:`exclusive` wraps :func:`companion.run.run_classification`, the one place every
command and host job goes through. While a run holds ``OUT/.companion.lock`` (a file holding
its pid, host and start time, locked with ``flock``) a second run on the same directory is
refused with a one-line message naming the first. A lock left by a process that died is
reclaimed (the kernel drops ``flock`` locks of dead processes). Once the lock is held,
temporary files of an interrupted write are removed, and the outputs of an earlier run
(``ROOT_itNNN_*``, ``iteration_NNN/``) are removed when the run starts afresh, or when they lie
past the iteration count of a continued run. Disk-full and read-only errors while writing
become :class:`~companion.errors.OutputError` naming the file.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import socket
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from companion.errors import DiskFullError, OutputError

log = logging.getLogger("companion.outdir")

LOCK_FILE = ".companion.lock"
# errors of the file system that a user fixes (space, permissions), not bugs
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
F = TypeVar("F", bound=Callable[..., Any])


def check_free_space(
    path: str | Path, nbytes: int, what: str = "the file", *, spare: int | None = None
) -> None:
    """DiskFullError unless the file system holding ``path`` has ``nbytes`` free, plus
    ``spare`` (default: 1% or 64 MiB) — call it before creating a large file, where a full
    disk would otherwise end in ENOSPC half-way or, for a memory-mapped file, SIGBUS."""
    path = Path(path)
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    need = int(nbytes) + (max(64 << 20, int(nbytes) // 100) if spare is None else int(spare))
    if free < need:
        raise DiskFullError(
            f"{path}: the disk is full for {what}: it needs {_size(need)} but only "
            f"{_size(free)} is free — free some space or choose another output directory"
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def make_output_dir(out_dir: Path) -> None:
    """Create ``out_dir``; OutputError naming the cause when that is impossible."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{out_dir}: is a file, not a directory — choose another --out") from None
    except NotADirectoryError:
        raise OutputError(
            f"{out_dir}: a parent of the output directory is a file — choose another --out"
        ) from None
    except OSError as exc:
        raise _write_error(exc, out_dir) from None


def _write_error(exc: OSError, where: Path) -> OutputError:
    path = exc.filename or where
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "the disk is full: free some space (or choose another --out) and run again"
        if (Path(where) / "checkpoint").is_dir():
            fix += " with --continue"
    elif exc.errno == errno.EROFS:
        fix = "the file system is read-only: choose another --out"
    else:
        fix = "no permission to write there: choose another --out or fix its permissions"
    return OutputError(f"{path}: cannot write ({exc.strerror}) — {fix}")


class Lock:
    """An exclusive, advisory lock on an output directory (see the module doc)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        for _ in range(20):  # the holder may remove the file between our open and flock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise _write_error(exc, self.path.parent) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputError(
                    f"{self.path.parent}: another companion run is using this output "
                    f"directory ({holder}) — wait for it to finish, stop it, or choose another "
                    "--out"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released and removed while we waited: take the new file
                os.close(fd)
                continue
            stale = _read_holder(fd, raw=True)
            if stale:
                log.info("reclaimed the lock of a run that ended without releasing it (%s)", stale)
            me = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            self.fd = fd
            return
        raise OutputError(f"{self.path}: could not take the lock — run again")

    def refuse_if_held(self) -> None:
        """OutputError naming the holder when another live run holds this lock (nothing
        is created or taken)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"{self.path.parent}: another companion run is using this output directory "
                f"({_read_holder(fd)}) — wait for it to finish, stop it, or choose another --out"
            ) from None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _read_holder(fd: int, raw: bool = False) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    if raw or not text:
        return text or ("" if raw else "a process that did not say who it is")
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return text[:200]


_HIDDEN_TMP = re.compile(r"^\..+\.tmp$")
_TMP = re.compile(r"\.tmp$")


def remove_leftovers(out_dir: Path, *, root: str, resume: bool, n_iterations: int) -> None:
    """Temporary files of an interrupted write; outputs of an earlier, different run."""
    removed: list[str] = []
    # our atomic writers' temporaries: hidden ``.NAME.*.tmp`` beside the outputs, any
    # ``*.tmp`` in the checkpoint and its cache
    for d, pattern in (
        (out_dir, _HIDDEN_TMP),
        (out_dir / "checkpoint", _TMP),
        (out_dir / "checkpoint" / "cache", _TMP),
    ):
        if d.is_dir():
            for p in d.iterdir():
                if p.is_file() and pattern.search(p.name):
                    p.unlink(missing_ok=True)
                    removed.append(p.name)
    it_file = re.compile(rf"^{re.escape(root)}_it(\d{{3}})_")
    for p in out_dir.iterdir():
        m = it_file.match(p.name) if p.is_file() else re.match(r"^iteration_(\d{3})$", p.name)
        if m is None:
            continue
        if resume and int(m.group(1)) <= n_iterations:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    if removed:
        shown = ", ".join(sorted(removed)[:4]) + (" ..." if len(removed) > 4 else "")
        log.info(
            "removed %d leftover(s) of an earlier run from %s: %s", len(removed), out_dir, shown
        )


@contextmanager
def claim(
    out_dir: str | Path, *, root: str = "run", resume: bool = False, n_iterations: int = 0
) -> Iterator[Path]:
    """Hold ``out_dir`` for one run: created, locked, cleaned; write errors as OutputError."""
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    make_output_dir(out_dir)
    lock = Lock(out_dir)
    lock.acquire()
    try:
        remove_leftovers(out_dir, root=root, resume=resume, n_iterations=n_iterations)
        yield out_dir
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS or (
            exc.errno in (errno.EACCES, errno.EPERM) and not _under(exc.filename, out_dir)
        ):
            raise
        raise _write_error(exc, out_dir) from None
    except (zipfile.BadZipFile, EOFError) as exc:
        if not resume:
            raise
        raise OutputError(
            f"{out_dir / 'checkpoint'}: the saved state is damaged ({exc}) — remove that "
            "directory to start again (without --continue)"
        ) from None
    finally:
        lock.release()
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # refused before any work: leave no trace


def _under(filename: Any, out_dir: Path) -> bool:
    if not filename:
        return False
    try:
        return Path(os.path.abspath(filename)).is_relative_to(os.path.abspath(out_dir))
    except (TypeError, ValueError):
        return False


def exclusive(run: F) -> F:
    """Decorate ``run_classification(particles, params, out_dir, *, resume, root, checked,
    ...)``: :func:`companion.preflight.preflight` before any work, then the whole run
    happens inside :func:`claim` of its output directory."""

    @functools.wraps(run)
    def wrapper(particles: Any, params: Any, out_dir: Any, *args: Any, **kwargs: Any) -> Any:
        from companion.preflight import preflight

        # feasibility and device (unless the caller checked them), clamped values warned
        preflight(particles, params, checked=bool(kwargs.get("checked", False)))
        with claim(
            out_dir,
            root=kwargs.get("root", "run"),
            resume=bool(kwargs.get("resume", False)),
            n_iterations=int(getattr(params, "total_iters", 0) or 0),
        ):
            return run(particles, params, out_dir, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
