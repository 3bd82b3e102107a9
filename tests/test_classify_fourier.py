"""Fourier-space operations of the classifier: boxes, kept coefficients, crop/pad, shifts,
rotations (projector and its back-rotation), shells and FRC."""

from __future__ import annotations

import numpy as np
import pytest
from classify_data import blob_image, rotate_shift

from companion.classify import fourier as fo
from companion.classify.backend import to_host
from companion.classify.ctf import ctf_2d


def geometry() -> fo.Geometry:
    return fo.Geometry.create(48, 3.0, 8.0, None)


def rotate_real(img: np.ndarray, deg: float) -> np.ndarray:
    """Content at p moves to R(deg) p about the centre (x = column, y = row), cubic."""
    return rotate_shift(img, deg, (0.0, 0.0))


def rel(a, b) -> float:
    a, b = to_host(a), to_host(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_working_box_reaches_the_resolution_and_never_grows():
    for box, psize, res in [(128, 1.5, 6.0), (64, 3.0, 8.0), (200, 1.0, 6.0), (64, 3.0, 2.0)]:
        w, s = fo.working_box(box, psize, res)
        assert w % 2 == 0 and w <= box
        assert s <= w // 2
        if 2 * box * psize / res <= box:  # the limit is inside the original Nyquist
            assert box * psize / s >= res - 1e-6  # kept shells are no finer than asked
            assert box * psize / (s + 1) < res  # and reach it
    geom = fo.Geometry.create(128, 1.5, 6.0, None)
    assert geom.work_box == 64 and geom.s_max == 32
    assert geom.work_psize == pytest.approx(3.0)


def test_kept_coefficients_are_sorted_non_redundant_and_prefix_closed():
    g = geometry()
    r = np.hypot(g.kx, g.ky)
    assert np.all(np.diff(r) >= -1e-6)  # sorted by radius
    assert np.all((g.kx > 0) | ((g.kx == 0) & (g.ky > 0)))  # one of each Hermitian pair
    assert r.max() <= g.s_max + 1e-6 and r.min() > 0
    assert len(np.unique(g.kept)) == g.n_coef
    for s in (3, 8, g.s_max):
        n = g.prefix(s)
        assert np.all(r[:n] <= s + 1e-6) and np.all(r[n:] > s)
    np.testing.assert_array_equal(fo.shell_counts(g)[1:], np.bincount(g.shell)[1:])


def test_kept_round_trip(xp):
    g = geometry()
    rng = np.random.default_rng(0)
    c = (rng.normal(size=(3, g.n_coef)) + 1j * rng.normal(size=(3, g.n_coef))).astype(np.complex64)
    c = xp.asarray(c)
    img = fo.from_kept(c, g)
    assert img.shape == (3, g.work_box, g.work_box)
    np.testing.assert_allclose(to_host(fo.to_kept(img, g)), to_host(c), atol=1e-5)


def test_pad_then_crop_is_identity_and_crop_keeps_pixel_values(xp):
    g = geometry()
    rng = np.random.default_rng(1)
    c = (rng.normal(size=(2, g.n_coef)) + 1j * rng.normal(size=(2, g.n_coef))).astype(np.complex64)
    small = fo.from_kept(xp.asarray(c), g)
    big = fo.fourier_pad(small, 48)
    np.testing.assert_allclose(to_host(fo.fourier_crop(big, g.work_box)), to_host(small), atol=1e-4)
    # a smooth image keeps its values (not sums) when resampled
    y, x = np.mgrid[0:64, 0:64] - 32
    img = np.exp(-(x**2 + y**2) / 50.0)[None].astype(np.float32)
    crop = to_host(fo.fourier_crop(xp.asarray(img), 32))
    yy, xx = np.mgrid[0:32, 0:32] - 16
    np.testing.assert_allclose(crop[0], np.exp(-((2 * xx) ** 2 + (2 * yy) ** 2) / 50.0), atol=2e-3)


def test_shift_phase_ramp_equals_real_space_shift(xp):
    g = geometry()
    img = blob_image(g.work_box)[None]
    coef = fo.to_kept(xp.asarray(img), g)
    shifted = fo.shift_images(coef, xp.asarray([[3.0, -2.0]]), g)
    rolled = np.roll(img, shift=(-2, 3), axis=(1, 2))  # content moves by +3 in x, -2 in y
    np.testing.assert_allclose(to_host(shifted), to_host(fo.to_kept(xp.asarray(rolled), g)),
                               atol=1e-4)  # fmt: skip
    ramps = fo.phase_ramps(np.array([[3.0, -2.0]]), g, xp=xp)
    np.testing.assert_allclose(to_host(coef * ramps), to_host(shifted), atol=1e-4)


def test_projector_rotates_like_real_space(xp):
    g = geometry()
    ref = blob_image(g.work_box)
    proj = fo.Projector(g, 60, xp=xp)
    a = proj.project(xp.asarray(ref[None]))
    assert a.shape == (1, 60, g.n_coef)
    assert rel(a[0, 0], fo.to_kept(xp.asarray(ref[None]), g)[0]) < 0.01
    for r in (1, 7, 15, 23, 44):
        direct = fo.to_kept(xp.asarray(rotate_real(ref, 6.0 * r)[None]), g)[0]
        assert rel(a[0, r], direct) < 0.01, r


def test_backprojection_undoes_rotation_with_ctf_weights(xp):
    """Rotated spectra times per-rotation CTF² weights, rotated back and divided by the
    rotated-back weights, give the reference back."""
    g = geometry()
    ref = blob_image(g.work_box)
    proj = fo.Projector(g, 60, xp=xp)
    a = proj.project(xp.asarray(ref[None]))
    kx, ky = g.freqs_A()
    rng = np.random.default_rng(2)
    df = rng.uniform(10000, 20000, 60)
    c = ctf_2d(kx, ky, df, df - 300, rng.uniform(0, 180, 60), 300.0, 2.7, 0.1)
    d = xp.asarray((c * c)[None].astype(np.float32))
    prof = to_host(fo.shell_sums(d.sum(axis=1), g))[0] / np.maximum(fo.shell_counts(g), 1)
    prof[0] = prof[1]
    radial = 1.0 / fo.radial_profile(prof, g, xp)
    num, den = proj.backproject(a * d, d, radial)
    direct = fo.to_kept(xp.asarray(ref[None]), g)[0]
    assert rel(num[0] / den[0], direct) < 0.03
    # uniform weights: the weight is the number of rotations everywhere
    ones = xp.ones((1, 60, g.n_coef), xp.float32)
    _, den1 = proj.backproject(a, ones)
    np.testing.assert_allclose(to_host(den1), 60.0, rtol=1e-3)


def test_shells_and_frc(xp):
    g = geometry()
    ones = xp.ones((2, g.n_coef), xp.float32)
    np.testing.assert_allclose(to_host(fo.shell_sums(ones, g))[0], fo.shell_counts(g))
    rng = np.random.default_rng(3)
    a = xp.asarray(rng.normal(size=(1, g.n_coef)) + 1j * rng.normal(size=(1, g.n_coef)))
    b = xp.asarray(rng.normal(size=(1, g.n_coef)) + 1j * rng.normal(size=(1, g.n_coef)))
    np.testing.assert_allclose(to_host(fo.frc(a, a, g))[0, 1:], 1.0, atol=1e-9)
    assert abs(float(to_host(fo.frc(a, b, g))[0, 1:].mean())) < 0.1
    res = g.shell_resolution()
    assert np.isinf(res[0]) and res[1] == pytest.approx(48 * 3.0)


def test_soft_mask_and_background(xp):
    m = to_host(fo.soft_mask(32, 12.0, xp=xp))
    assert m[16, 16] == pytest.approx(1.0) and m[0, 0] == pytest.approx(0.0)
    assert np.all((m >= 0) & (m <= 1))
    bg = to_host(fo.radial_mask(32, 12.0, xp=xp))
    assert bg[0, 0] and not bg[16, 16]
    img = xp.asarray(np.full((1, 32, 32), 5.0, np.float32))
    out = to_host(fo.apply_mask(img, xp.asarray(m), xp.asarray(bg)))
    np.testing.assert_allclose(out, 0.0, atol=1e-5)  # a flat image is all background


def test_projector_matches_per_class_reference():
    """The batched CSR projector equals the former per-class bincount/float64 path (outputs
    saved in tests/data/projector_golden.npz before it was replaced) to float32 rounding."""
    from pathlib import Path

    d = np.load(Path(__file__).parent / "data" / "projector_golden.npz")
    g = fo.Geometry.create(32, 3.0, 7.0, None)
    proj = fo.Projector(g, 24, xp=np)
    a = proj.project(d["imgs"])
    num, den = proj.backproject(d["sums"], d["w"], d["rad"])
    for got, want in [(proj.edge, d["edge"]), (a, d["a"]), (num, d["num"]), (den, d["den"])]:
        assert got.dtype in (np.float32, np.complex64)
        assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()
