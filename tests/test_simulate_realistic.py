"""The simulator's closer-to-real options: coloured noise (MTF detector noise + CTF-modulated
ice), per-particle intensity scale, a less-ordered sub-population; the defaults stay the
original white-noise data set."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from companion.errors import ParameterError
from companion.simulate import load_truth, simulate
from companion.simulate.micrographs import BG_RADIUS, Optics, Renderer
from companion.simulate.micrographs import NoiseModel as Noise

BOX = 64


def _noise_profile(kind: str, ice_fraction: float = 0.5) -> np.ndarray:
    """Radial power of pure noise images (5 shells from 0 to Nyquist), normalised to mean 1."""
    r = Renderer(BOX, Optics(3.0), 4, 4, Noise(kind, ice_fraction))
    r.noise_sd = 2.0
    noise = r.draw_noise(400, np.random.default_rng(0), (15000.0, 15000.0, 0.0))
    assert abs(noise.var() / 4.0 - 1) < 0.03  # the total variance is the one asked for
    p = np.abs(np.fft.rfft2(noise)) ** 2
    f = np.hypot(*np.meshgrid(np.fft.rfftfreq(BOX), np.fft.fftfreq(BOX)))
    prof = np.array([p[:, (f >= a) & (f < a + 0.1)].mean() for a in np.arange(0, 0.5, 0.1)])
    return prof / prof.mean()


def test_white_noise_is_flat_and_coloured_rolls_off():
    white = _noise_profile("white")
    assert np.all(np.abs(white - 1) < 0.05)
    col = _noise_profile("coloured")
    assert col[0] > 3 * col[-1]  # ice at low resolution + MTF roll-off
    det = _noise_profile("coloured", ice_fraction=0.0)  # MTF only: monotone decrease
    assert np.all(np.diff(det) < 0) and det[-1] < 0.6 * det[0]


def test_ice_noise_follows_the_ctf():
    """Ice noise alone has Thon rings: its power at the CTF zeros is far below that at the
    maxima (the detector's noise has none)."""
    r = Renderer(BOX, Optics(3.0), 4, 4, Noise("coloured", 1.0, ice_resolution=8.0))
    args = (20000.0, 20000.0, 0.0)
    p = (np.abs(np.fft.rfft2(r.draw_noise(300, np.random.default_rng(1), args))) ** 2).mean(0)
    c2 = r.ctf(BOX, *args) ** 2
    f = np.hypot(*np.meshgrid(np.fft.rfftfreq(BOX), np.fft.fftfreq(BOX)))
    band = (f > 0.05) & (f < 0.25)
    lo = p[band & (c2 < 0.05)].mean()
    hi = p[band & (c2 > 0.8)].mean()
    assert lo < 0.2 * hi


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "s"
    simulate(out, 400, box=BOX, psize=3.0, seed=2, noise="coloured", scale_sd=0.25,
             disordered_fraction=0.3, progress=False)  # fmt: skip
    return out


def test_truth_records_scale_and_the_less_ordered_population(realistic):
    t = load_truth(realistic)
    s = t["intensity_scale"].to_numpy()
    assert abs(s.mean() - 1) < 0.05 and 0.18 < np.log(s).std() < 0.32
    dis = t["disordered"].to_numpy() == 1
    good_arm = (t["junk"] == "") & (t["state"] < 3)  # the last state has no arm
    assert not dis[~good_arm.to_numpy()].any()
    assert 0.2 < dis[good_arm.to_numpy()].mean() < 0.4
    hinge = t["hinge_deg"].to_numpy()
    assert np.isnan(hinge[~dis]).all() and (np.abs(hinge[dis]) <= 50).all()
    assert hinge[dis].std() > 20  # a wide spread, not the states' angles


def test_intensity_scale_is_in_the_images(realistic):
    """Brighter particles (larger scale) have more power inside the particle circle."""
    t = load_truth(realistic)
    imgs = np.concatenate([mrcfile.read(f) for f in sorted(Path(realistic, "stacks").glob("*"))])
    yy, xx = np.mgrid[:BOX, :BOX] - BOX // 2
    inside = np.hypot(xx, yy) < 0.8 * BG_RADIUS * BOX
    power = (imgs[:, inside] ** 2).mean(1)
    good = (t["junk"] == "").to_numpy()
    rho = np.corrcoef(power[good], t["intensity_scale"].to_numpy()[good])[0, 1]
    assert rho > 0.2


def test_defaults_are_the_original_white_set(tmp_path):
    a = simulate(tmp_path / "a", 200, box=32, seed=5, progress=False)
    b = simulate(tmp_path / "b", 200, box=32, seed=5, scale_sd=0.0, disordered_fraction=0.0,
                 noise="white", progress=False)  # fmt: skip
    assert a.noise == "white" and a.scale_sd == 0
    ia, ib = (mrcfile.read(Path(x.out_dir, "stacks", "mic_00001.mrcs")) for x in (a, b))
    assert np.array_equal(ia, ib)
    t = load_truth(a.out_dir)
    assert (t["intensity_scale"] == 1).all() and (t["disordered"] == 0).all()


def test_bad_noise_options_are_one_line_errors(tmp_path):
    with pytest.raises(ParameterError, match="--noise"):
        simulate(tmp_path / "x", 10, box=32, noise="pink", progress=False)
    with pytest.raises(ParameterError, match="--ice-fraction"):
        simulate(tmp_path / "y", 10, box=32, noise="coloured", ice_fraction=2, progress=False)
