"""How many CPU threads a run may use, and holding the BLAS/OpenMP/FFT pools to it."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (
    Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
    Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
)


def cgroup_cpu_limit(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> float | None:
    """The CPU quota of this process's cgroup in cores (``quota / period``), or None."""
    try:
        quota, period = v2.read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(v1[0].read_text())
        period_us = int(v1[1].read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


@contextmanager
def limit_threads(n: int | None) -> Iterator[int]:
    """Hold the BLAS/OpenMP pools (threadpoolctl) and scipy.fft's workers to ``n`` threads
    (default: :func:`available_cores`) inside the block; yields the number used."""
    from threadpoolctl import threadpool_limits

    n = available_cores() if n is None else max(1, int(n))
    try:
        import scipy.fft

        fft_workers = scipy.fft.set_workers(n)
    except ImportError:  # pragma: no cover - scipy is a dependency
        fft_workers = nullcontext()
    with threadpool_limits(limits=n), fft_workers:
        yield n
