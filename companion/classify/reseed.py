"""Re-seeding of (nearly) empty classes by splitting a big one (RELION VDAM, CL2D).

A class that holds less than ``fraction × mean`` of the particles is wasted capacity. Each
such class gets a new reference made from a donor — the largest class, or the least
coherent of the big ones when the caller scores coherence — and the donor's share (size or
prior) is split evenly between the two. The two references of a split are either the two
half-set averages of the donor (averages of random halves of its members, when the caller
has them) or the donor ``A`` perturbed in opposite directions, ``A ⊙ (1 ± s·z)`` with ``z`` a
smooth random field (the classic LBG / k-means split): particles then choose between the two
at the next E-step. Pure functions over NumPy or CuPy arrays; the random field comes from the
given ``numpy.random.Generator``, so a run is reproducible and NumPy/CuPy agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from companion.classify.backend import get_array_module, to_host


@dataclass
class Reseeded:
    """Outcome of :func:`reseed_references`.

    refs: (K, ...) references with the splits applied (a new array; input untouched).
    sizes: (K,) float64 sizes (or priors, in the units given) with each donor's share split
        evenly between it and the class it seeded; the total is unchanged except that the
        re-seeded classes' own (small) shares move to their donors first.
    pairs: (M, 2) int64 rows of (re-seeded class, donor), in the order applied.
    """

    refs: Any
    sizes: np.ndarray
    pairs: np.ndarray


def find_empty(class_sizes: Any, fraction: float) -> np.ndarray:
    """Indices (int64, ascending) of classes holding less than ``fraction × mean`` size."""
    sizes = np.asarray(to_host(class_sizes), dtype=np.float64)
    if fraction <= 0 or sizes.size == 0:
        return np.zeros(0, dtype=np.int64)
    mean = sizes.sum() / sizes.size
    return np.flatnonzero(sizes < fraction * mean).astype(np.int64)


def reseed_references(
    refs: Any,
    class_sizes: Any,
    empty: Any,
    rng: np.random.Generator,
    coherence: Any = None,
    halves: tuple[Any, Any] | None = None,
    scale: float = 0.05,
) -> Reseeded:
    """Give every class in ``empty`` a reference split off a donor class.

    Args:
        refs: (K, ...) class references (images (K, h, w) get a smooth perturbation field;
            other shapes a white one). Real or complex, NumPy or CuPy.
        class_sizes: (K,) particles (or prior mass) per class.
        empty: indices of the classes to re-seed (e.g. :func:`find_empty`).
        rng: the source of the perturbations (deterministic given its state).
        coherence: optional (K,) score, higher = more coherent (e.g. 1 / resolution, mean
            max-posterior). When given, the donor is the least coherent class among those at
            least as big as the mean; otherwise the largest class.
        halves: optional pair of (K, ...) arrays, the half-set averages of every class; a
            donor split for the first time gives its two halves to itself and the new class.
        scale: relative size ``s`` of the opposite perturbations ``A ⊙ (1 ± s·z)``.

    Each split updates the sizes before the next donor is chosen; a donor needs a size ≥ 2
    (nothing is done for the remaining classes otherwise).
    """
    xp = get_array_module(refs)
    out = refs.copy()
    sizes = np.asarray(to_host(class_sizes), dtype=np.float64).copy()
    k = sizes.shape[0]
    if out.shape[0] != k:
        raise ValueError(f"refs hold {out.shape[0]} classes but class_sizes {k}")
    todo = [int(e) for e in np.unique(np.asarray(to_host(empty), dtype=np.int64))]
    coh = None if coherence is None else np.asarray(to_host(coherence), dtype=np.float64)
    waiting = np.zeros(k, dtype=bool)
    waiting[todo] = True
    # the re-seeded classes' few members go back to the pool: their share moves to donors
    pool = float(sizes[waiting].sum())
    sizes[waiting] = 0.0
    split_before = np.zeros(k, dtype=bool)
    pairs: list[tuple[int, int]] = []
    for e in todo:
        d = _donor(sizes, waiting, coh)
        if d is None:
            break
        if halves is not None and not split_before[d]:
            out[d] = xp.asarray(halves[0][d], dtype=out.dtype)
            out[e] = xp.asarray(halves[1][d], dtype=out.dtype)
        else:
            z = xp.asarray(_field(rng, out.shape[1:], out.dtype.kind == "c"), dtype=out.dtype)
            base = out[d].copy()
            out[d] = base * (1 - scale * z)
            out[e] = base * (1 + scale * z)
        share = sizes[d] / 2
        sizes[d] = share
        sizes[e] = share
        split_before[d] = split_before[e] = True
        waiting[e] = False
        pairs.append((e, d))
    if pairs and pool > 0:  # hand the pool back in proportion (keeps the total)
        tot = sizes.sum()
        sizes += pool * sizes / tot if tot > 0 else 0.0
    arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return Reseeded(refs=out, sizes=sizes, pairs=arr)


def reseed_empty(
    refs: Any,
    class_sizes: Any,
    fraction: float,
    rng: np.random.Generator,
    coherence: Any = None,
    halves: tuple[Any, Any] | None = None,
    scale: float = 0.05,
) -> Reseeded | None:
    """:func:`find_empty` then :func:`reseed_references`; None when no class needs it."""
    empty = find_empty(class_sizes, fraction)
    if empty.size == 0:
        return None
    res = reseed_references(refs, class_sizes, empty, rng, coherence, halves, scale)
    return res if res.pairs.shape[0] else None


def _donor(sizes: np.ndarray, waiting: np.ndarray, coherence: np.ndarray | None) -> int | None:
    cand = ~waiting & (sizes >= 2)
    if not cand.any():
        return None
    if coherence is None:
        return int(np.flatnonzero(cand)[np.argmax(sizes[cand])])
    big = cand & (sizes >= sizes.mean())  # at least the mean class size
    big = big if big.any() else cand
    idx = np.flatnonzero(big)
    return int(idx[np.argmin(coherence[idx])])


def _field(rng: np.random.Generator, shape: tuple[int, ...], complex_: bool) -> np.ndarray:
    """Zero-mean, unit-sd random field; smooth (low-pass, ~1/8 of the box) for 2-D shapes."""
    z = rng.standard_normal(shape)
    if complex_:
        z = (z + 1j * rng.standard_normal(shape)) / np.sqrt(2)
    if len(shape) == 2 and min(shape) >= 8:
        fy = np.fft.fftfreq(shape[0])[:, None]
        fx = np.fft.fftfreq(shape[1])[None, :]
        sigma_f = 8.0 / min(shape)  # keep features larger than ~1/8 of the box
        lp = np.exp(-(fx**2 + fy**2) / (2 * sigma_f**2))
        zf = np.fft.ifft2(np.fft.fft2(z) * lp)
        z = zf if complex_ else zf.real
    z = z - z.mean()
    sd = np.sqrt(np.mean(np.abs(z) ** 2))
    return z / sd if sd > 0 else z
