"""Lazy image access for a ParticleSet, grouped by stack file.

Projects often hold thousands of per-micrograph stacks: open files are kept in a small
LRU cache, and every read sorts the requested particles by (stack, index) so each file is
touched once per batch. Images are read with ``pread`` (a :class:`RowFile` past the MRC
header), not memory-mapped: mapped pages count in the process's resident set, so reading a
1M-particle stack through a map shows as its whole size in RSS, while pages read through
the file are page cache, which the kernel reclaims.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from companion.errors import InputError

if TYPE_CHECKING:
    from companion.classify.diskcache import RowFile
    from companion.particles import ParticleSet

MAX_OPEN_STACKS = 64
HEADER_BYTES = 1024
# MRC modes that hold real-valued images, their bytes per pixel and types (as mrcfile reads)
IMAGE_MODES = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}
MODE_DTYPES = {0: "i1", 1: "i2", 2: "f4", 6: "u2", 12: "f2"}
REEXTRACT = "re-extract the particles or restore the stack from a backup"


class StackCache:
    """LRU cache of open read-only MRC stacks."""

    def __init__(self, max_open: int = MAX_OPEN_STACKS) -> None:
        self.max_open = max_open
        self._open: OrderedDict[Path, RowFile] = OrderedDict()
        self._lock = threading.Lock()

    def data(self, path: Path) -> RowFile:
        """The images of ``path``: ``data[idx]`` reads images ``idx`` (n, ny, nx)."""
        with self._lock:
            rows = self._open.get(path)
            if rows is not None:
                self._open.move_to_end(path)
            else:
                rows = _open_stack(path)
                self._open[path] = rows
                while len(self._open) > self.max_open:
                    _, old = self._open.popitem(last=False)
                    old.close()
        return rows

    def close(self) -> None:
        with self._lock:
            for mrc in self._open.values():
                mrc.close()
            self._open.clear()


def stack_shape(path: Path) -> tuple[int, int, int]:
    """``(n_images, ny, nx)`` from the MRC header of ``path``, checked against the file size.

    InputError (naming the file) for a missing file, a header with an impossible mode or
    size, or a file shorter than its header says (truncated copy, disk full while writing).
    """
    return stack_layout(path)[:3]


def stack_layout(path: Path) -> tuple[int, int, int, np.dtype, int]:
    """``(n_images, ny, nx, dtype, data offset)`` of the MRC stack ``path`` (checked as
    :func:`stack_shape` says)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
            size = f.seek(0, 2)
    except FileNotFoundError:
        raise InputError(
            f"{path}: image stack not found — check the project directory "
            "(--project-dir) or the paths in the particle file"
        ) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the image stack ({exc.strerror})") from None
    if len(head) < HEADER_BYTES:
        raise InputError(
            f"{path}: {size} bytes, shorter than an MRC header (1024) — the stack is truncated "
            f"or not an MRC file; {REEXTRACT}"
        )
    order = ">" if head[212] == 0x11 else "<"  # machine stamp: 0x44 little, 0x11 big endian
    nx, ny, nz, mode = (int(v) for v in np.frombuffer(head, dtype=order + "i4", count=4))
    nsymbt = int(np.frombuffer(head, dtype=order + "i4", count=1, offset=92)[0])
    if mode not in IMAGE_MODES:
        raise InputError(
            f"{path}: MRC header mode {mode} is not an image mode (0, 1, 2, 6 or 12) — the file "
            f"is corrupt or not an image stack; {REEXTRACT}"
        )
    if not (0 < nx < 1 << 16 and 0 < ny < 1 << 16 and 0 < nz < 1 << 31 and nsymbt >= 0):
        raise InputError(
            f"{path}: MRC header size {nx}x{ny}x{nz} (extended header {nsymbt} bytes) is "
            f"impossible — the file is corrupt; {REEXTRACT}"
        )
    need = HEADER_BYTES + nsymbt + nx * ny * nz * IMAGE_MODES[mode]
    if size < need:
        raise InputError(
            f"{path}: {size} bytes but its header describes {nz} images of {nx}x{ny} px "
            f"({need} bytes) — the stack is truncated; {REEXTRACT}"
        )
    dtype = np.dtype(MODE_DTYPES[mode]).newbyteorder(order)
    return nz, ny, nx, dtype, HEADER_BYTES + nsymbt


def _open_stack(path: Path) -> RowFile:
    from companion.classify.diskcache import RowFile  # here: companion.classify imports us

    nz, ny, nx, dtype, offset = stack_layout(path)  # a one-line error for a bad stack
    try:
        return RowFile(path, (nz, ny, nx), dtype, writable=False, offset=offset)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the image stack ({exc.strerror})") from None


_CACHE = StackCache()


def read_images(
    particles: ParticleSet, idx: np.ndarray, *, normalise_contrast: bool = True
) -> np.ndarray:
    """Images of ``particles`` at ``idx`` (in that order), float32[len(idx), box, box]."""
    idx = np.asarray(idx, dtype=np.int64)
    box = particles.box
    out = np.empty((len(idx), box, box), dtype=np.float32)
    if len(idx) == 0:
        return out
    stacks = particles.stack_index[idx]
    order = np.lexsort((particles.image_index[idx], stacks))
    sorted_stacks = stacks[order]
    bounds = np.flatnonzero(np.diff(sorted_stacks)) + 1
    for group in np.split(order, bounds):
        s = int(stacks[group[0]])
        path = particles.stack_paths[s]
        data = _CACHE.data(path)
        img_idx = particles.image_index[idx[group]]
        if img_idx.max() >= data.shape[0] or img_idx.min() < 0:
            bad = int(idx[group][np.argmax((img_idx >= data.shape[0]) | (img_idx < 0))])
            raise InputError(
                f"{particles.source_path}: row {particles.source_row[bad] + 1} refers to image "
                f"{particles.image_index[bad] + 1} of {path}, which holds {data.shape[0]} images "
                "— the particle file and the stacks do not match"
            )
        if data.shape[1:] != (box, box):
            row = int(particles.source_row[idx[group[0]]]) + 1
            raise InputError(
                f"{particles.source_path}: row {row}: images in {path} are "
                f"{data.shape[2]}x{data.shape[1]} px but the particle file says box {box} — "
                "re-extract or fix the optics table"
            )
        out[group] = data[img_idx]  # reads only those images
    if normalise_contrast:
        c = particles.contrast[idx]
        if not np.all(c == 1.0):
            out *= c[:, None, None]
    return out


def file_order(particles: ParticleSet, idx: np.ndarray | None = None) -> np.ndarray:
    """Particle indices sorted by (stack, image index): the cheapest order to read them in."""
    if idx is None:
        idx = np.arange(len(particles), dtype=np.int64)
    idx = np.asarray(idx, dtype=np.int64)
    order = np.lexsort((particles.image_index[idx], particles.stack_index[idx]))
    return idx[order]


def iter_batches(
    particles: ParticleSet, batch_size: int, idx: np.ndarray | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, images)`` in file order, ``batch_size`` particles at a time."""
    ordered = file_order(particles, idx)
    for start in range(0, len(ordered), max(1, int(batch_size))):
        chunk = ordered[start : start + batch_size]
        yield chunk, read_images(particles, chunk)


def check_stacks(particles: ParticleSet) -> list[str]:
    """Every problem with the stacks: missing files, indices past the end, wrong box."""
    problems: list[str] = []
    if len(particles) == 0:
        return problems
    max_idx = np.full(len(particles.stack_paths), -1, dtype=np.int64)
    np.maximum.at(max_idx, particles.stack_index, particles.image_index)
    first_row = np.full(len(particles.stack_paths), -1, dtype=np.int64)
    # first source row referencing each stack, for messages
    rev = np.arange(len(particles) - 1, -1, -1)
    first_row[particles.stack_index[rev]] = particles.source_row[rev]
    n_images = np.full(len(particles.stack_paths), np.iinfo(np.int64).max, dtype=np.int64)
    for s, path in enumerate(particles.stack_paths):
        if max_idx[s] < 0:
            continue
        where = f"{particles.source_path}: row {first_row[s] + 1}"
        if not path.is_file():
            problems.append(f"{where}: image stack {path} not found — check --project-dir")
            continue
        try:
            nz, ny, nx = stack_shape(path)
        except InputError as exc:
            problems.append(f"{where}: {exc}")
            continue
        n_images[s] = nz
        if (nx, ny) != (particles.box, particles.box):
            problems.append(
                f"{where}: images in {path} are {nx}x{ny} px but the particle file says box "
                f"{particles.box} — fix rlnImageSize / blob/shape or re-extract"
            )
    # indices past the end: name the first offending row of each stack
    past = np.flatnonzero(particles.image_index >= n_images[particles.stack_index])
    if len(past):
        first = np.full(len(particles.stack_paths), len(particles), dtype=np.int64)
        np.minimum.at(first, particles.stack_index[past], past)
        for s in np.flatnonzero(first < len(particles)):
            i = int(first[s])
            problems.append(
                f"{particles.source_path}: row {particles.source_row[i] + 1} refers to image "
                f"{particles.image_index[i] + 1} of {particles.stack_paths[s]}, which holds "
                f"{n_images[s]} images — the particle file and the stacks do not match"
            )
    return problems


def require_stacks(particles: ParticleSet) -> None:
    """InputError naming the first stack problem (and how many more) — before any work."""
    problems = check_stacks(particles)
    if problems:
        more = f" (and {len(problems) - 1} more stack problem(s))" if len(problems) > 1 else ""
        raise InputError(problems[0] + more)
