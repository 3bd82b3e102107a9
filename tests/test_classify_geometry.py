"""Pose conventions of ClassResult (RELION's: x = column, y = row).

A particle made by rotating a reference counter-clockwise by theta and shifting it by d
pixels must come back with psi = -theta + c and origin = -d + R(-psi) s, with one rotation
c and one shift s per class (the class average's own frame).
"""

from __future__ import annotations

import numpy as np
import pytest
from classify_data import make_particles

from companion.classify import classify
from companion.params import ClassifyParams


def wrap(deg: np.ndarray) -> np.ndarray:
    return (deg + 180.0) % 360.0 - 180.0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    sim = make_particles(tmp_path_factory.mktemp("geometry"), n=120, n_classes=1, box=48,
                         psize=3.0, snr=20.0, seed=3, max_shift=3.0)  # fmt: skip
    params = ClassifyParams(n_classes=1, max_resolution=8.0, online_iters=0, full_iters=4,
                            recenter=False, device="cpu", seed=1)  # fmt: skip
    return sim, classify(sim.particles, params)


def test_psi_is_minus_theta_plus_a_class_constant(result):
    sim, r = result
    c = wrap(r.psi_deg + sim.theta)  # should be one constant
    c0 = np.angle(np.exp(1j * np.deg2rad(c)).mean(), deg=True)
    spread = np.abs(wrap(c - c0))
    assert np.median(spread) < 4.0  # psi step 6°
    assert np.mean(spread < 6.0) > 0.9


def test_origin_is_minus_d_plus_rotated_class_shift(result):
    sim, r = result
    psi = np.deg2rad(r.psi_deg.astype(np.float64))
    # origin + d = R(-psi) s for one s: least squares over all particles
    c, s = np.cos(psi), np.sin(psi)
    rows = np.concatenate(
        [np.stack([c, s], 1), np.stack([-s, c], 1)]
    )  # R(-psi) = [[c, s], [-s, c]]
    rhs = np.concatenate([r.shift_px[:, 0] + sim.shift[:, 0], r.shift_px[:, 1] + sim.shift[:, 1]])
    cls_shift, *_ = np.linalg.lstsq(rows, rhs, rcond=None)
    resid = np.abs(rhs - rows @ cls_shift).reshape(2, -1).max(axis=0)
    # working pixels are 48/36 original pixels: the grid alone errs by up to ~0.7 px
    assert np.median(resid) < 0.8
    assert np.mean(resid < 1.5) > 0.9
    # the wrong sign convention would not fit at all
    bad = np.concatenate([r.shift_px[:, 0] - sim.shift[:, 0], r.shift_px[:, 1] - sim.shift[:, 1]])
    fit_bad, *_ = np.linalg.lstsq(rows, bad, rcond=None)
    assert np.median(np.abs(bad - rows @ fit_bad)) > 1.5


def test_result_fields_are_complete_and_consistent(result):
    sim, r = result
    n, k, box = len(sim.particles), 1, 48
    s = box // 2 + 1
    assert r.class_id.shape == (n,) and r.class_id.dtype == np.int32
    assert r.shift_px.shape == (n, 2) and r.averages.shape == (k, box, box)
    for name in ("psi_deg", "max_prob", "class_prob", "loglik", "norm_correction", "class_ess"):
        arr = getattr(r, name)
        assert arr.shape == (n,) and arr.dtype == np.float32 and np.all(np.isfinite(arr)), name
    assert np.all((r.psi_deg > -180.0) & (r.psi_deg <= 180.0))
    assert np.all((r.max_prob > 0) & (r.max_prob <= 1.0 + 1e-6))
    assert set(np.unique(r.half_set)) <= {0, 1}
    assert r.n_significant.dtype == np.int32 and np.all(r.n_significant >= 1)
    for name in ("frc", "ssnr", "sigma2_ref", "tau2"):
        assert getattr(r, name).shape == (k, s), name
    assert r.sigma2_noise.shape == (1, s) and np.all(r.sigma2_noise > 0)
    assert r.shell_resolution_A.shape == (s,) and np.isinf(r.shell_resolution_A[0])
    assert r.class_sizes.tolist() == [n] and r.class_distribution.sum() == pytest.approx(1.0)
    assert r.iteration == r.n_iterations == 4 and len(r.history) == 4
    assert r.work_box == 36 and r.work_psize == pytest.approx(4.0)
    assert np.isfinite(r.resolution_A[0]) and r.resolution_A[0] < 40.0  # smooth blob images
    assert r.params["noise_model"] == "estimated" and r.device.startswith("cpu")
    assert r.cap is None and r.timings["iterations_s"]
    # the class average looks like the reference (up to its own rotation)
    from classify_data import rotate_shift

    ref = sim.refs[0]
    best = max(np.corrcoef(rotate_shift(ref, a, (0, 0)).ravel(), r.averages[0].ravel())[0, 1]
               for a in range(0, 360, 3))  # fmt: skip
    assert best > 0.9
