"""``companion bench assign``: speed and memory of the balanced-mode assignment at scale.

Balanced mode solves two capacity-constrained problems over an (N, K) matrix of class log
posteriors (:mod:`companion.classify.balance`): the soft Sinkhorn projection of every E-step
and the final hard labels. This benchmark builds such a matrix with an attractor built in
(class popularity falling like 1/rank, so uncapped argmax labels pile into a few classes),
then times both solvers on the chosen devices and reports the extra memory they use, the
largest class against the cap, how many particles the cap moved from their best class, and
the mean log-posterior each particle gave up for the cap (against its unconstrained best, an
upper bound of the optimum, so this also bounds the solver's gap from above).
"""

from __future__ import annotations

import argparse
import math
import time
import tracemalloc
from typing import Any

import numpy as np

from companion.bench.speed import device_sync

#: rows generated per chunk (bounds the generator's temporaries)
_GEN_ROWS = 1 << 16


def add_args(p: argparse.ArgumentParser) -> None:
    """Options of ``companion bench assign``."""
    from companion.commands.options import add_n_particles, add_option

    add_n_particles(p, 1_000_000)
    add_option(p, "--n-classes", aliases=("--classes",), type=int, default=200, metavar="K",
               help="number of classes K [default: 200]")  # fmt: skip
    p.add_argument(
        "--slack", type=float, default=1.0, help="cap = ceil(slack × N / K) [default: 1.0]"
    )
    p.add_argument(
        "--spread",
        type=float,
        default=20.0,
        help="typical log-posterior spread between classes of a particle [default: 20]",
    )
    p.add_argument("--device", choices=["cpu", "gpu", "both"], default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the score matrix [default: 0]")
    p.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")


def attractor_scores(n: int, k: int, spread: float, seed: int) -> np.ndarray:
    """(n, k) float32 log posteriors (rows log-normalised) where class j is favoured by
    ``log(1 / (j + 1))`` on top of per-particle noise of scale ``spread / 4``."""
    rng = np.random.default_rng(seed)
    bias = -np.log1p(np.arange(k, dtype=np.float32)) * (spread / 4)
    out = np.empty((n, k), np.float32)
    for s in range(0, n, _GEN_ROWS):
        z = rng.standard_normal((min(_GEN_ROWS, n - s), k), dtype=np.float32)
        z *= spread / 4
        z += bias
        z -= z.max(axis=1, keepdims=True)
        z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
        out[s : s + z.shape[0]] = z
    return out


def run_assign_benchmark(n: int = 1_000_000, k: int = 200, *, slack: float = 1.0,
                         spread: float = 20.0, device: str = "cpu",
                         seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """One dict per device: timings, extra memory, cap, largest class, moved, score cost."""
    from companion.classify.backend import select_device
    from companion.errors import ParameterError

    if k < 1 or n < k:
        raise ParameterError(
            f"--n-particles {n} --n-classes {k}: need at least one class and N ≥ K"
        )
    if not slack >= 1.0:
        raise ParameterError(f"--slack {slack}: must be ≥ 1 (the caps must hold every particle)")
    if not spread > 0:
        raise ParameterError(f"--spread {spread}: must be positive")
    cap = int(math.ceil(slack * n / k))
    scores = attractor_scores(n, k, spread, seed)
    top = scores.argmax(axis=1)
    devices = ["cpu", "gpu"] if device == "both" else [device]
    rows = []
    for dev in devices:
        xp = select_device(dev)
        rows.append(_one(xp, dev, scores, top, cap))
    return rows


def _one(xp: Any, dev: str, scores: np.ndarray, top: np.ndarray,
         cap: int) -> dict[str, Any]:  # fmt: skip
    from companion.classify.backend import describe_device, to_device, to_host
    from companion.classify.balance import assign_capped, sinkhorn_capped

    n, k = scores.shape
    s = to_device(scores, xp)
    sync = device_sync(xp)
    mem = _Memory(xp)
    sync()
    t0 = time.perf_counter()
    w = sinkhorn_capped(s, float(cap))
    sync()
    t_soft = time.perf_counter() - t0
    col = to_host(w.sum(axis=0))
    del w
    soft_mem = mem.extra()
    mem = _Memory(xp)
    t0 = time.perf_counter()
    labels = assign_capped(s, cap)
    sync()
    t_hard = time.perf_counter() - t0
    hard_mem = mem.extra()
    labels = to_host(labels)
    sizes = np.bincount(labels, minlength=k)
    uncapped = np.bincount(top, minlength=k)
    rows = np.arange(n)
    given_up = scores[rows, top].astype(np.float64) - scores[rows, labels]
    return {
        "device": describe_device(xp),
        "n": n,
        "k": k,
        "cap": cap,
        "uncapped_largest": int(uncapped.max()),
        "uncapped_below_10pct": int((uncapped < 0.1 * n / k).sum()),
        "sinkhorn_s": t_soft,
        "sinkhorn_extra_GB": soft_mem,
        "sinkhorn_largest_column": float(col.max()),
        "assign_s": t_hard,
        "assign_extra_GB": hard_mem,
        "largest_class": int(sizes.max()),
        "smallest_class": int(sizes.min()),
        "cap_respected": bool(sizes.max() <= cap),
        "moved_fraction": float((labels != top).mean()),
        "score_given_up_per_particle": float(given_up.mean()),
        "bench_device": dev,
    }


class _Memory:
    """Extra memory allocated since construction (peak, GB): NumPy allocations through
    tracemalloc on the CPU, the growth of CuPy's memory pool on the GPU."""

    def __init__(self, xp: Any) -> None:
        self.xp = xp
        if xp is np:
            if tracemalloc.is_tracing():
                tracemalloc.stop()
            tracemalloc.start()
            self.base = tracemalloc.get_traced_memory()[0]
        else:
            self.pool = xp.get_default_memory_pool()
            self.base = self.pool.total_bytes()

    def extra(self) -> float:
        if self.xp is np:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return (peak - self.base) / 1e9
        return (self.pool.total_bytes() - self.base) / 1e9


def format_assign(rows: list[dict[str, Any]]) -> str:
    """A few lines per device."""
    out = []
    for r in rows:
        out.append(
            f"{r['device']}: N {r['n']}, K {r['k']}, cap {r['cap']} (uncapped argmax: largest "
            f"class {r['uncapped_largest']}, {r['uncapped_below_10pct']} classes below 10% of "
            f"the mean)\n"
            f"  soft (Sinkhorn, one E-step):  {r['sinkhorn_s']:8.2f} s, "
            f"{r['sinkhorn_extra_GB']:.2f} GB extra, "
            f"largest column {r['sinkhorn_largest_column']:.1f}\n"
            f"  hard (final labels):          {r['assign_s']:8.2f} s, "
            f"{r['assign_extra_GB']:.2f} GB extra, classes {r['smallest_class']}–"
            f"{r['largest_class']} (cap {'kept' if r['cap_respected'] else 'EXCEEDED'}), "
            f"{100 * r['moved_fraction']:.1f}% moved from their best class, "
            f"{r['score_given_up_per_particle']:.3f} log-posterior given up per particle"
        )
    return "\n".join(out)
