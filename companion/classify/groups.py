"""Noise groups: which rows of the noise model (sigma² per shell, intensity scale) each
particle uses.

Every micrograph group (``ParticleSet.group``) with at least ``MIN_GROUP_PARTICLES``
particles gets its own row; the smaller groups of one optics group share a pooled row. A
micrograph of a few dozen particles has too few Fourier coefficients in its low shells for a
stable spectrum or scale (RELION warns below 5 particles and leaves the merging to Subset
selection's "Regroup particles"; here it is automatic). Memory stays bounded with thousands
of micrographs: the noise model holds one (S,) spectrum and one scale per row, at most
N / MIN_GROUP_PARTICLES + (optics groups) rows, and the E-step gathers a batch's rows.
"""

from __future__ import annotations

import numpy as np

MIN_GROUP_PARTICLES = 50  # also the size below which the initial spectrum is pooled


def noise_rows(
    group: np.ndarray,
    optics_group: np.ndarray,
    n_groups: int,
    min_particles: int = MIN_GROUP_PARTICLES,
) -> tuple[np.ndarray, np.ndarray]:
    """``(row per particle int32[N], row per group int32[G])``.

    Rows: the large groups in group order, then one pooled row per optics group that has
    small groups (in optics-group order)."""
    group = np.asarray(group, dtype=np.int64)
    counts = np.bincount(group, minlength=n_groups)
    large = counts >= min_particles
    of_group = np.full(n_groups, -1, dtype=np.int64)
    of_group[large] = np.arange(int(large.sum()))
    small = ~large[group] if group.size else np.zeros(0, bool)
    if small.any():
        # a group's optics group: that of its first particle
        first = np.full(n_groups, -1, dtype=np.int64)
        order = np.arange(group.size)[::-1]
        first[group[order]] = order
        seen = first >= 0
        optics_of = np.zeros(n_groups, dtype=np.int64)
        optics_of[seen] = np.asarray(optics_group)[first[seen]]
        pooled = ~large & seen
        _, pooled_row = np.unique(optics_of[pooled], return_inverse=True)
        of_group[pooled] = int(large.sum()) + pooled_row
    of_group[of_group < 0] = 0  # groups without particles (a subset): any row
    return of_group[group].astype(np.int32), of_group.astype(np.int32)
