"""Per-class resolution from the half-set FRC: the last shell before the first drop below
0.143, checked against a direct per-class reading of that rule."""

from __future__ import annotations

import numpy as np

from companion.classify import fourier as fo
from companion.classify.mstep import FRC_THRESHOLD, resolution_from_frc


def one_class(frc: np.ndarray, d: float) -> float:
    for shell in range(1, frc.size):
        if frc[shell] < FRC_THRESHOLD:
            return np.inf if shell - 1 < 1 else d / (shell - 1)
    return d / (frc.size - 1)


def test_matches_the_rule_class_by_class():
    g = fo.Geometry.create(64, 3.0, 6.0, None)
    rng = np.random.default_rng(0)
    s = 20
    frc = np.sort(rng.uniform(-0.1, 1.0, (30, s)), axis=1)[:, ::-1].copy()
    frc[0] = 1.0  # never drops: the working limit
    frc[1, 1:] = 0.0  # drops at shell 1: undetermined (inf)
    frc[2, 5] = 0.0  # an isolated dip ends it at shell 4
    got = resolution_from_frc(frc, g)
    d = g.box * g.psize
    want = np.array([one_class(f, d) for f in frc], np.float32)
    assert got.dtype == np.float32 and got.shape == (30,)
    np.testing.assert_array_equal(got, want)
    assert got[0] == np.float32(d / (s - 1)) and np.isinf(got[1]) and got[2] == np.float32(d / 4)
    assert np.isinf(resolution_from_frc(np.ones((3, 1)), g)).all()
