"""Initial references and the seeding iteration, as RELION's 2D classification does.

Every class starts from the same reference: the phase-flipped average of all particles
(``Σ cy·X / Σ |cy|``; cy = C, |C| for phase-flipped images, 1 for CTF-premultiplied ones),
low-pass filtered at 0.07 of the sampling frequency (RELION's default ``ini_high`` for
unaligned averages) and masked. In the first iteration each particle is aligned against the
class it was dealt to (``seed_owner``: a seeded random split into K equal groups) instead of
competing for classes; that M-step gives K *aligned* averages of random subsets, which differ
enough for the classes to separate (``MlOptimiser::expectation``: seeds are generated in the
first iteration with ``exp_iclass_min = exp_iclass_max`` = the particle's random group).

The sum is accumulated during preprocessing (:func:`accumulate`); when the preprocessed
particles come from a cache, :func:`initial_references` re-reads them once.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from companion.classify import fourier as fo
from companion.classify.backend import to_device, to_host
from companion.particles import ParticleSet

LOWPASS_FRACTION = 0.07  # of the original box: the initial low-pass shell (RELION)


def seed_owner(n: int, k: int, seed: int) -> np.ndarray:
    """The class each particle is aligned against in the first iteration (equal groups)."""
    perm = np.random.default_rng([seed, 0x1A17]).permutation(n)
    owner = np.empty(n, np.int64)
    owner[perm] = np.arange(n) % k
    return owner


def lowpass_shell(geom: fo.Geometry) -> int:
    return int(min(geom.s_max, max(2, round(LOWPASS_FRACTION * geom.box))))


def accumulate(sums: list[np.ndarray], coef: Any, cy: Any) -> None:
    """Add a batch to ``sums = [Σ cy·X (F,), Σ |cy| (F,)]`` (host, float64)."""
    sums[0] += to_host((coef * cy).sum(axis=0)).astype(np.complex128)
    sums[1] += to_host(abs(cy).sum(axis=0)).astype(np.float64)


def initial_references(particles: ParticleSet, prep: Any, k: int, xp: Any) -> np.ndarray:
    """(K, w, w) float32 working-box references, all the same."""
    from companion.classify.ctf import ctf_terms

    geom = prep.geom
    sums = prep.average_sums
    if sums is None:
        n = len(particles)
        sums = [np.zeros(geom.n_coef, np.complex128), np.zeros(geom.n_coef, np.float64)]
        step = 4096
        for s in range(0, n, step):
            idx = np.arange(s, min(n, s + step))
            coef = to_device(np.asarray(prep.coeffs[idx]), xp)
            cy, _, _, _ = ctf_terms(particles, idx, geom, xp)
            accumulate(sums, coef, cy)
    avg = sums[0] / np.maximum(sums[1], 1e-6)
    # raised-cosine low-pass, 2 shells wide, at the initial resolution (RELION)
    r = np.hypot(geom.kx.astype(np.float64), geom.ky.astype(np.float64))
    edge = lowpass_shell(geom)
    t = np.clip((r - edge + 1.0) / 2.0, 0.0, 1.0)
    avg = avg * 0.5 * (1.0 + np.cos(math.pi * t))
    coef = to_device(np.repeat(avg[None].astype(np.complex64), k, axis=0), xp)
    mask = fo.soft_mask(geom.work_box, geom.mask_radius, xp=xp)
    background = fo.radial_mask(geom.work_box, geom.mask_radius, xp=xp)
    refs = fo.apply_mask(fo.from_kept(coef, geom), mask, background)
    return to_host(refs).astype(np.float32)
