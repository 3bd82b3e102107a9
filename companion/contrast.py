"""Measure image contrast from the data, to check the declared convention.

A wrong contrast convention (e.g. a misread CryoSPARC ``blob/sign``) makes every class
average a negative. Stored images are read as the source declares (protein white after the
ParticleSet's ``contrast``); this module measures whether the centre of the particles is
brighter than their surroundings on average, which holds for protein-white cryo-EM images
whose CTF is positive at the lowest frequencies (any underfocus, amplitude contrast > 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from companion.particles import ParticleSet


@dataclass
class ContrastCheck:
    """Centre-minus-surround statistic over a sample of particles.

    ``z`` is a sign test over particles (robust to junk and outliers): the excess of
    particles whose centre is brighter than their surround, in standard deviations. Clearly
    positive means protein white as read, clearly negative means the images read dark.
    """

    n_sampled: int
    z: float

    @property
    def verdict(self) -> str:
        if self.z > 3:
            return "white"
        if self.z < -3:
            return "dark"
        return "undetermined"


def measure_contrast(particles: ParticleSet, n_sample: int = 500, seed: int = 0) -> ContrastCheck:
    """Sample up to ``n_sample`` particles and measure whether their centres read white."""
    n = len(particles)
    if n == 0:
        return ContrastCheck(0, 0.0)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n, n_sample), replace=False))
    images = particles.read_images(idx)
    box = particles.box
    yy, xx = np.mgrid[:box, :box] - box // 2
    r = np.hypot(xx, yy)
    centre = r < 0.1 * box
    surround = (r >= 0.3 * box) & (r < 0.45 * box)
    diff = images[:, centre].mean(axis=1) - images[:, surround].mean(axis=1)
    m = len(diff)
    z = float(((diff > 0).sum() - (diff < 0).sum()) / np.sqrt(m))
    return ContrastCheck(m, z)
