"""The array module (NumPy or CuPy), device selection and host↔device moves.

Core functions take their array module from their inputs (:func:`get_array_module`), so
one process can run and test both paths; only this module decides where data lives.
CuPy is imported lazily: nothing here needs it unless a GPU is asked for.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
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
        mod = type(a).__module__
        if mod.startswith("cupy"):  # cupy, or a CuPy-like test module (tests/strict_xp.py)
            root = mod.split(".")[0]
            return sys.modules[root] if root in sys.modules else importlib.import_module(root)
    return np


def is_cupy(xp: Any) -> bool:
    """True for CuPy (and CuPy-like device modules: their arrays live off the host)."""
    return getattr(xp, "__name__", "numpy").startswith("cupy")


def to_host(a: Any) -> np.ndarray:
    """A NumPy copy of ``a`` (no-op for NumPy arrays)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def synchronize(xp: Any) -> None:
    """Wait for the device's queued work (a no-op for NumPy), for timing."""
    if is_cupy(xp) and hasattr(xp, "cuda") and hasattr(xp.cuda, "Device"):
        dev = xp.cuda.Device()
        if hasattr(dev, "synchronize"):
            dev.synchronize()


def host_float(a: Any) -> float:
    """One value read back to the host, explicitly (a device sync; counted by the strict
    test module). Use it, not ``float(x)``, where control flow needs a device value."""
    return float(to_host(a))


def host_int(a: Any) -> int:
    """Like :func:`host_float`, for an integer."""
    return int(to_host(a))


def host_bool(a: Any) -> bool:
    """Like :func:`host_float`, for a truth value."""
    return bool(to_host(a))


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


GPU_BUDGET = 8 << 30  # bytes of batch temporaries on a GPU (fixed, see work_budget)


def work_budget(xp: Any) -> int:
    """Bytes the classifier may use for one batch's temporaries.

    A fixed ceiling on both backends, so batch sizes — hence results, e.g. of the per-batch
    Sinkhorn — do not change with what else runs on the machine: GPU ``GPU_BUDGET`` (less only
    when 40% of free device memory is less; the host side stays within the host budget, since
    the host holds no more than one batch); CPU half the host budget (--memory-limit; by
    default half the available RAM), at most 1 GiB (two cores gain nothing from larger
    batches).
    """
    if is_cupy(xp):
        return max(64 << 20, min(GPU_BUDGET, int(0.4 * available_memory(xp))))
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


def csr_matrix(data: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int],
               xp: Any) -> Any:  # fmt: skip
    """A CSR matrix on the device of ``xp`` from host COO triplets (duplicates summed once,
    here, in a fixed order). ``matrix @ dense`` then sums each output row in a fixed order:
    deterministic, unlike scatter-adds with atomics."""
    import scipy.sparse as sp

    m = sp.csr_matrix((data, (rows, cols)), shape=shape)
    m.sum_duplicates()
    m.sort_indices()
    if not is_cupy(xp):
        return m
    make = getattr(xp, "csr_from_scipy", None)  # CuPy-like test modules
    if make is not None:
        return make(m)
    import cupyx.scipy.sparse as cps

    return cps.csr_matrix(m)


def scatter_add_rows(target: Any, index: Any, rows: Any, weights: Any = None) -> None:
    """``target[index[i]] += rows[i]`` (times ``weights[i]`` when given) for a 2-D float
    ``target`` (duplicates summed).

    Deterministic on both backends: rows are sorted by target (stable), each run of equal
    targets is summed in that order by a CSR product (SciPy / cuSPARSE), and the per-target
    sums are added with unique indices — no atomics, so the result does not depend on
    thread scheduling. One device sync (the number of distinct targets). (On NumPy the CSR
    product reads the rows in place: ~20x faster than ``add.reduceat`` over ``rows[order]``,
    measured on (8000, 4806) float32 rows.)
    """
    xp = get_array_module(target)
    n = int(index.shape[0])
    if n == 0:
        return
    order = xp.argsort(index, kind="stable")
    idx = index[order]
    new = xp.ones(n, dtype=bool)
    new[1:] = idx[1:] != idx[:-1]
    starts = xp.flatnonzero(new)  # the sync
    indptr = xp.concatenate([starts, xp.asarray([n], dtype=starts.dtype)])
    data = xp.ones(n, rows.dtype) if weights is None else weights[order].astype(rows.dtype)
    seg = csr_from_parts(xp, data, order, indptr, (int(starts.shape[0]), n))
    sums = xp.asarray(seg @ rows)
    target[idx[starts]] += sums.astype(target.dtype, copy=False)


def csr_from_parts(xp: Any, data: Any, indices: Any, indptr: Any, shape: tuple) -> Any:
    """A CSR matrix on the device of ``xp`` from its arrays (on that device; ``indices``
    sorted within each row by the caller): ``matrix @ dense`` sums each row in that order."""
    if not is_cupy(xp):
        import scipy.sparse as sp

        return sp.csr_matrix((data, indices, indptr), shape=shape)
    make = getattr(xp, "csr_from_parts", None)  # CuPy-like test modules
    if make is not None:
        return make(data, indices, indptr, shape)
    import cupyx.scipy.sparse as cps

    return cps.csr_matrix((data, indices.astype(xp.int32), indptr.astype(xp.int32)), shape=shape)


# allocation failures of the CUDA libraries (cuBLAS, cuFFT, cuSOLVER, cuSPARSE) as CuPy
# reports them (the status name is in the message)
_ALLOC_FAILED = ("CUBLAS_STATUS_ALLOC_FAILED", "CUFFT_ALLOC_FAILED", "CUSOLVER_STATUS_ALLOC_FAILED",
                 "CUSPARSE_STATUS_ALLOC_FAILED")  # fmt: skip


@contextlib.contextmanager
def device_errors(what: str = "classification") -> Iterator[None]:
    """Turn a GPU out-of-memory error into a one-line DeviceError."""
    try:
        yield
    except Exception as exc:  # CuPy's OutOfMemoryError without importing CuPy
        name = type(exc).__name__
        if "OutOfMemory" in name or any(code in str(exc) for code in _ALLOC_FAILED):
            raise DeviceError(
                f"{what}: the GPU ran out of memory — use a smaller batch (--batch-size), "
                "fewer classes, or a coarser --max-resolution"
            ) from None
        raise


_TF32_NOTED: set[str] = set()


@contextlib.contextmanager
def matmul_precision(xp: Any, tf32: bool) -> Iterator[None]:
    """Inside the block, float32/complex64 matmuls of CuPy may use TF32 tensor cores
    (``--tf32``; cuBLAS's fast TF32 compute type, ~10 mantissa bits in the products, float32
    accumulation). A no-op without ``tf32``; on NumPy (and CuPy builds without the setting)
    a no-op that says so once."""
    if not tf32:
        yield
        return
    core = getattr(xp, "_core", None) if is_cupy(xp) else None
    if core is None or not hasattr(core, "set_compute_type"):
        name = getattr(xp, "__name__", "numpy")
        if name not in _TF32_NOTED:
            _TF32_NOTED.add(name)
            logging.getLogger(__name__).info(
                "--tf32: no effect on %s (TF32 is a CUDA tensor-core mode)", name
            )
        yield
        return
    try:
        from cupy._core import _routines_linalg as linalg

        tf32_type = int(linalg.COMPUTE_TYPE_TF32)
    except (ImportError, AttributeError):
        tf32_type = 7  # cupy/_core/_routines_linalg.pxd: COMPUTE_TYPE_TF32
    old = core.get_compute_type(xp.float32)
    core.set_compute_type(xp.float32, tf32_type)
    try:
        yield
    finally:
        core.set_compute_type(xp.float32, old)


def logsumexp(a: Any) -> Any:
    """``log(sum(exp(a), axis=1))`` of a 2-D array on its own array module, overflow-safe."""
    xp = get_array_module(a)
    m = a.max(axis=1)
    return m + xp.log(xp.exp(a - m[:, None]).sum(axis=1))
