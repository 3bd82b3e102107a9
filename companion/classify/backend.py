"""The array module (NumPy or CuPy), device selection and host↔device moves.

Core functions take their array module from their inputs (:func:`get_array_module`), so
one process can run and test both paths; only this module decides where data lives.
CuPy is imported lazily: nothing here needs it unless a GPU is asked for.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from companion.errors import DeviceError


def cupy_or_none() -> Any:
    """The cupy module when it imports and sees a GPU, else None."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:
        return None
    return None


def get_array_module(*arrays: Any) -> Any:
    """NumPy or CuPy, whichever owns the arrays (NumPy for scalars and lists)."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np


def is_cupy(xp: Any) -> bool:
    return getattr(xp, "__name__", "numpy") == "cupy"


def to_host(a: Any) -> np.ndarray:
    """A NumPy copy of ``a`` (no-op for NumPy arrays)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def to_device(a: Any, xp: Any) -> Any:
    """``a`` on the device of ``xp`` (no copy when it is already there)."""
    if is_cupy(xp):
        return xp.asarray(a)
    return to_host(a)


def select_device(name: str = "auto") -> Any:
    """The array module for ``--device``: ``cpu`` → NumPy, ``gpu`` → CuPy, ``auto`` → either.

    Raises DeviceError (one line) when ``gpu`` is asked for and CuPy or a GPU is missing.
    """
    if name == "cpu":
        return np
    cp = cupy_or_none()
    if cp is not None:
        return cp
    if name == "gpu":
        try:
            import cupy  # noqa: F401

            why = "CuPy sees no CUDA GPU"
        except Exception:
            why = "CuPy is not installed (pip install 'companion[gpu]')"
        raise DeviceError(f"--device gpu: {why} — use --device cpu or --device auto")
    if name != "auto":
        raise DeviceError(f"--device {name}: unknown device — use auto, cpu or gpu")
    return np


def describe_device(xp: Any) -> str:
    """One line naming the device, e.g. ``cpu (numpy 2.1, 2 cores)``."""
    if is_cupy(xp):
        try:
            dev = xp.cuda.Device()
            props = xp.cuda.runtime.getDeviceProperties(dev.id)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        except Exception:
            name = "CUDA GPU"
        return f"gpu: {name} (cupy {xp.__version__})"
    return f"cpu (numpy {np.__version__}, {os.cpu_count() or 1} cores)"


def _cgroup_free() -> int | None:
    """Bytes this process's cgroup may still allocate (v2 or v1), or None without a limit."""
    for limit_f, usage_f in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
         "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):  # fmt: skip
        try:
            raw = open(limit_f).read().strip()
            if raw == "max" or int(raw) >= 1 << 60:
                return None
            return max(0, int(raw) - int(open(usage_f).read().strip()))
        except (OSError, ValueError):
            continue
    return None


def available_memory(xp: Any) -> int:
    """Bytes free for work arrays: free GPU memory (CuPy) or available host RAM (NumPy),
    the latter never more than the cgroup (container, SLURM job) still allows."""
    if is_cupy(xp):
        free, _total = xp.cuda.runtime.memGetInfo()
        pool = xp.get_default_memory_pool()
        return int(free + pool.free_bytes())
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            avail = 4 << 30
    cg = _cgroup_free()
    return avail if cg is None else min(avail, cg)


DEFAULT_MEMORY_FRACTION = 0.5  # --memory-limit default: this fraction of available host RAM
_memory_limit: int | None = None  # bytes, set for the duration of a run (memory_limit())


def parse_size(text: str) -> int:
    """Bytes in ``4G``, ``512M``, ``1.5GB``, ``2e9`` (K/M/G/T powers of 1024); ValueError."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    value = float(t) * mult
    if not value > 0:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)


def host_memory_limit() -> int:
    """The host-memory budget of this run: --memory-limit, else a fraction of available RAM."""
    if _memory_limit is not None:
        return _memory_limit
    return int(DEFAULT_MEMORY_FRACTION * available_memory(np))


@contextlib.contextmanager
def memory_limit(limit: int | None) -> Iterator[int]:
    """Use ``limit`` bytes (None: the default) as the host budget inside the block."""
    global _memory_limit
    old = _memory_limit
    _memory_limit = None if limit is None else int(limit)
    try:
        yield host_memory_limit()
    finally:
        _memory_limit = old


def work_budget(xp: Any) -> int:
    """Bytes the classifier may use for one batch's temporaries.

    GPU: 40% of free device memory (the host side stays within the host budget, since the
    host holds no more than one batch). CPU: half the host budget (--memory-limit; by
    default half the available RAM), at most 1 GiB (two cores gain nothing from larger
    batches, and a fixed ceiling keeps batch sizes — hence results — the same from run to
    run on any machine with more than 4 GiB free).
    """
    if is_cupy(xp):
        return max(64 << 20, int(0.4 * available_memory(xp)))
    return int(min(1 << 30, max(32 << 20, host_memory_limit() // 2)))


def batch_size(bytes_per_item: float, xp: Any, *, fixed_bytes: float = 0, most: int = 1 << 16,
               least: int = 1, budget: int | None = None) -> int:  # fmt: skip
    """Items per batch so that ``fixed + n × bytes_per_item`` fits the work budget.

    Rounded down to a power of two (so small changes in free memory do not change it).
    """
    budget = work_budget(xp) if budget is None else budget
    n = int((budget - fixed_bytes) // max(bytes_per_item, 1.0))
    n = max(least, min(most, n))
    return max(least, 1 << (max(n, 1).bit_length() - 1))


def scatter_add_rows(target: Any, index: Any, rows: Any) -> None:
    """``target[index[i]] += rows[i]`` for a 2-D float32 ``target`` (duplicates summed)."""
    xp = get_array_module(target)
    if len(index) == 0:
        return
    if is_cupy(xp):
        at = getattr(xp.add, "at", None)
        if at is not None:
            at(target, index, rows)
        else:  # older CuPy
            import cupyx

            cupyx.scatter_add(target, index, rows)
        return
    # NumPy: sort rows by target, then one vectorised sum per distinct target row (a loop
    # over targets, at most one per row; np.add.at is several times slower here)
    order = np.argsort(index, kind="stable")
    idx = index[order]
    rows = rows[order]
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    ends = np.r_[starts[1:], len(idx)]
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        target[idx[s]] += rows[s] if e - s == 1 else rows[s:e].sum(axis=0)


@contextlib.contextmanager
def device_errors(what: str = "classification") -> Iterator[None]:
    """Turn a GPU out-of-memory error into a one-line DeviceError."""
    try:
        yield
    except Exception as exc:  # CuPy's OutOfMemoryError without importing CuPy
        name = type(exc).__name__
        if "OutOfMemory" in name or "CUBLAS_STATUS_ALLOC_FAILED" in str(exc):
            raise DeviceError(
                f"{what}: the GPU ran out of memory — use a smaller batch (--batch-size), "
                "fewer classes, or a coarser --max-resolution"
            ) from None
        raise


def logsumexp(a: Any) -> Any:
    """``log(sum(exp(a), axis=1))`` of a 2-D array on its own array module, overflow-safe."""
    xp = get_array_module(a)
    m = a.max(axis=1)
    return m + xp.log(xp.exp(a - m[:, None]).sum(axis=1))
