"""End-to-end geometry: poses written to run_itNNN_data.star follow RELION's convention.

Simulated particles are the reference rotated counter-clockwise by theta and shifted by d
(truth.csv: psi_deg, shift_x/y_px). RELION.md: a correct 2D classification recovers
rlnAnglePsi = -theta + c_k and rlnOriginX/YAngst / psize = -d + R(-psi) s_k, with a
per-class constant rotation c_k and shift s_k.
"""

from __future__ import annotations

import numpy as np
import pytest

from companion.params import ClassifyParams
from companion.relion.star import read_star
from companion.run import run_classification
from companion.simulate import load_truth, simulate
from companion.sources import open_particles

PSIZE = 3.0


@pytest.fixture(scope="module")
def classified(tmp_path_factory):
    root = tmp_path_factory.mktemp("geometry")
    sim = root / "sim"
    simulate(
        sim,
        300,
        box=64,
        psize=PSIZE,
        snr=1.0,
        seed=5,
        n_views=2,
        n_states=1,
        junk_fraction=0.0,
        progress=False,
    )
    params = ClassifyParams(n_classes=2, online_iters=0, full_iters=6, max_resolution=8.0, seed=1)
    out = run_classification(open_particles(sim / "particles.star"), params, root / "c2d")
    table = read_star(out.paths["data"])["particles"]
    return table, load_truth(sim)


def test_psi_is_minus_the_applied_rotation(classified):
    table, truth = classified
    psi = table["rlnAnglePsi"].astype(float).to_numpy()
    cls = table["rlnClassNumber"].astype(int).to_numpy()
    theta = truth["psi_deg"].to_numpy()
    for k in np.unique(cls):
        m = cls == k
        assert m.sum() >= 30
        # psi + theta is one constant per class (circular concentration near 1) ...
        same = np.abs(np.exp(1j * np.deg2rad(psi[m] + theta[m])).mean())
        # ... whereas psi - theta (the wrong sign) is spread over the circle
        wrong = np.abs(np.exp(1j * np.deg2rad(psi[m] - theta[m])).mean())
        assert same > 0.95, (k, same)
        assert wrong < 0.5, (k, wrong)


def test_origin_is_minus_the_applied_shift(classified):
    table, truth = classified
    psi = np.deg2rad(table["rlnAnglePsi"].astype(float).to_numpy())
    cls = table["rlnClassNumber"].astype(int).to_numpy()
    ox = table["rlnOriginXAngst"].astype(float).to_numpy() / PSIZE
    oy = table["rlnOriginYAngst"].astype(float).to_numpy() / PSIZE
    dx, dy = truth["shift_x_px"].to_numpy(), truth["shift_y_px"].to_numpy()

    def residual(sign: float, m: np.ndarray) -> float:
        vx, vy = ox[m] + sign * dx[m], oy[m] + sign * dy[m]
        cx = np.cos(psi[m]) * vx - np.sin(psi[m]) * vy
        cy = np.sin(psi[m]) * vx + np.cos(psi[m]) * vy
        return float(np.median(np.hypot(cx - np.median(cx), cy - np.median(cy))))

    for k in np.unique(cls):
        m = cls == k
        assert residual(+1.0, m) < 1.0  # origin = -d up to the class's own shift
        assert residual(-1.0, m) > 2.0  # the wrong sign leaves the shifts scattered
