"""Initial references: CTF-weighted averages of random particle subsets (no alignment), seeded.

Class k starts from ``m = clamp(N // K, 1, INIT_SUBSET)`` distinct random particles
averaged as ``Σ cy·X / (Σ C² + m/2)`` (a damped CTF correction that never divides by a
CTF zero), masked in real space. Unaligned averages are nearly alike; the classes separate
through the noise in them and the soft, uncertain first iterations (as in CryoSPARC/RELION).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from companion.classify import fourier as fo
from companion.classify.backend import to_device, to_host
from companion.classify.preprocess import Prepared, ctf_terms
from companion.particles import ParticleSet

INIT_SUBSET = 20


def initial_references(particles: ParticleSet, prep: Prepared, k: int, seed: int,
                       xp: Any) -> np.ndarray:  # fmt: skip
    """(K, w, w) float32 working-box references."""
    n = len(particles)
    m = int(np.clip(n // k, 1, INIT_SUBSET))
    rng = np.random.default_rng([seed, 0x1A17])
    if k * m <= n:
        pick = rng.permutation(n)[: k * m]
    else:
        pick = rng.integers(0, n, k * m)
    owner = np.repeat(np.arange(k), m)
    order = np.argsort(pick, kind="stable")
    pick, owner = pick[order], owner[order]
    geom = prep.geom
    num = xp.zeros((k, geom.n_coef), xp.complex64)
    den = xp.zeros((k, geom.n_coef), xp.float32)
    step = 4096
    for s in range(0, len(pick), step):
        idx, own = pick[s : s + step], owner[s : s + step]
        x = to_device(np.asarray(prep.coeffs[idx]), xp)
        cy, c2, _, _ = ctf_terms(particles, idx, geom, xp)
        o = to_device(own, xp)
        contrib = x * cy
        _index_add(num, o, contrib)
        _index_add(den, o, c2)
    avg = num / (den + np.float32(0.5 * m))
    mask = fo.soft_mask(geom.work_box, geom.mask_radius, xp=xp)
    background = fo.radial_mask(geom.work_box, geom.mask_radius, xp=xp)
    refs = fo.apply_mask(fo.from_kept(avg, geom), mask, background)
    return to_host(refs).astype(np.float32)


def _index_add(target: Any, idx: Any, rows: Any) -> None:
    """target[idx[i]] += rows[i] for a small number of target rows (grouped sums)."""
    for k in np.unique(to_host(idx)):
        sel = idx == int(k)
        target[int(k)] += rows[sel].sum(axis=0)
