"""``--cluster`` values: what kind of Dask cluster, how many workers, which address."""

from __future__ import annotations

import re
from dataclasses import dataclass

FORMS = "local:N, gpus, tcp://HOST:PORT, slurm or pbs"


@dataclass(frozen=True)
class ClusterSpec:
    kind: str  # "local", "gpus", "address", "slurm", "pbs"
    workers: int | None = None  # local:N
    address: str | None = None  # an existing scheduler

    def describe(self) -> str:
        if self.kind == "local":
            return f"a local Dask cluster of {self.workers} worker process(es)"
        if self.kind == "gpus":
            return "a local Dask-CUDA cluster (one worker per visible GPU)"
        if self.kind == "address":
            return f"the Dask scheduler at {self.address}"
        return f"a {self.kind.upper()} cluster through dask-jobqueue"


def parse_cluster(text: str) -> ClusterSpec:
    """Parse a ``--cluster`` value; ValueError (one line, the accepted forms) otherwise."""
    t = str(text).strip()
    low = t.lower()
    m = re.fullmatch(r"local(?::(\d+))?", low)
    if m:
        n = int(m.group(1)) if m.group(1) else 0
        if n < 1:
            raise ValueError(f"--cluster {t!r}: give the number of workers, e.g. local:4")
        return ClusterSpec("local", workers=n)
    if low in ("gpus", "gpu", "cuda"):
        return ClusterSpec("gpus")
    if low in ("slurm", "pbs"):
        return ClusterSpec(low)
    if re.fullmatch(r"(tcp|tls|ucx|ws|wss)://[^\s/:]+(:\d+)?/?", low):
        return ClusterSpec("address", address=t.rstrip("/"))
    raise ValueError(f"--cluster {t!r}: expected one of {FORMS}")
