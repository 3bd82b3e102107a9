"""The simulator: reproducible, truth consistent with the files, RELION-like image statistics,
CTF really applied, requested populations, distinct views, RELION geometry."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from scipy import ndimage

from companion.classify.ctf import ctf_2d
from companion.cli import main as cli_main
from companion.simulate import (
    JUNK_KINDS,
    TRUTH_COLUMNS,
    load_truth,
    simulate,
    true_labels,
    true_projections,
)
from companion.simulate.micrographs import BG_RADIUS, Optics, Plan, Renderer

N, BOX = 600, 64


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "s"
    info = simulate(out, N, box=BOX, seed=3, per_micrograph=150, progress=False)
    return info


def _stack_images(out: Path) -> np.ndarray:
    files = sorted((out / "stacks").glob("*.mrcs"))
    return np.concatenate([mrcfile.read(f) for f in files])


def test_files_and_truth_match_stacks(sim):
    out = Path(sim.out_dir)
    truth = load_truth(out)
    assert list(truth.columns) == list(TRUTH_COLUMNS)
    assert len(truth) == N and truth["image_name"].is_unique
    assert (
        sim.n_micrographs == 4 and sim.counts["good"] + sum(sim.counts[k] for k in JUNK_KINDS) == N
    )
    star = starfile.read(out / "particles.star", always_dict=True)
    assert star["particles"]["rlnImageName"].tolist() == truth["image_name"].tolist()
    # every name points at an existing image, each image is named once
    counts = {}
    for name in truth["image_name"]:
        idx, path = name.split("@")
        with mrcfile.mmap(out / path, mode="r") as mrc:
            nz = mrc.data.shape[0]
            assert mrc.data.shape[1:] == (BOX, BOX)
            assert mrc.data.dtype == np.float32
            assert abs(float(mrc.voxel_size.x) - sim.psize) < 1e-4
        assert 1 <= int(idx) <= nz
        counts[path] = nz
    assert sum(counts.values()) == N
    # defocus in truth equals the STAR's CTF
    p = star["particles"]
    np.testing.assert_allclose(truth["defocus_u"], p["rlnDefocusU"], rtol=1e-5)
    np.testing.assert_allclose(truth["defocus"], 0.5 * (p["rlnDefocusU"] + p["rlnDefocusV"]), 1e-5)
    # one defocus per micrograph
    assert (truth.groupby("micrograph")["defocus"].nunique() == 1).all()
    assert truth["junk"].isin(("",) + JUNK_KINDS).all()
    assert ((truth["junk"] == "") == (truth["view"] >= 0)).all()


def test_reproducible_from_seed(sim, tmp_path):
    again = simulate(tmp_path / "a", N, box=BOX, seed=3, per_micrograph=150, formats=())
    other = simulate(tmp_path / "b", N, box=BOX, seed=4, per_micrograph=150, formats=())
    t0, t1, t2 = load_truth(sim.out_dir), load_truth(again.out_dir), load_truth(other.out_dir)
    assert t0.equals(t1)
    assert not t0["psi_deg"].equals(t2["psi_deg"])
    a, b = _stack_images(Path(sim.out_dir)), _stack_images(Path(again.out_dir))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, _stack_images(Path(other.out_dir)))


def test_rerun_replaces_simulation_but_protects_other_dirs(tmp_path):
    out = tmp_path / "s"
    simulate(out, 500, box=32, seed=1, formats=())
    simulate(out, 100, box=32, seed=1, per_micrograph=50, formats=())
    assert len(list((out / "stacks").glob("*.mrcs"))) == 2
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "data.txt").write_text("keep")
    from companion.errors import ParameterError

    with pytest.raises(ParameterError, match="not empty"):
        simulate(tmp_path / "user", 10, box=32, formats=())


def test_relion_normalisation_and_protein_white(sim):
    imgs = _stack_images(Path(sim.out_dir))
    yy, xx = np.mgrid[:BOX, :BOX] - BOX // 2
    r = np.hypot(xx, yy)
    bg = imgs[:, r > BG_RADIUS * BOX]
    np.testing.assert_allclose(bg.mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(bg.std(axis=1), 1.0, atol=1e-3)
    good = (load_truth(sim.out_dir)["junk"] == "").to_numpy()
    centre = imgs[good][:, r < 0.15 * BOX].mean()
    assert centre > 0.1  # protein white: the particle is brighter than the background


def test_junk_looks_like_junk(tmp_path):
    """Low-pass contrast: gold edges and contamination dominate, pure noise has no particle."""
    simulate(tmp_path / "s", 800, box=BOX, seed=0, junk_fraction=0.3, formats=())
    imgs = _stack_images(tmp_path / "s")
    kind = load_truth(tmp_path / "s")["junk"].to_numpy()
    sd = ndimage.gaussian_filter(imgs, (0, 3, 3)).std(axis=(1, 2))
    good = np.median(sd[kind == ""])
    assert np.median(sd[kind == "gold_edge"]) > 2.5 * good
    assert np.median(sd[kind == "contamination"]) > 2 * good
    assert np.median(sd[kind == "noise"]) < 0.9 * good


def test_snr_as_requested(tmp_path):
    info = simulate(tmp_path / "s", 800, box=BOX, snr=0.5, seed=0, junk_fraction=0, formats=())
    imgs = _stack_images(tmp_path / "s")
    yy, xx = np.mgrid[:BOX, :BOX] - BOX // 2
    r = np.hypot(xx, yy)
    inside = r < info.particle_diameter_A / 2 / info.psize
    var_in = imgs[:, inside].var(axis=1).mean()
    var_bg = imgs[:, r > BG_RADIUS * BOX].var(axis=1).mean()
    assert 0.3 < var_in / var_bg - 1 < 0.7  # (signal + noise) / noise - 1 ≈ SNR


def test_ctf_zeros_at_expected_thon_rings(tmp_path):
    """The radial power spectrum of one micrograph's particles dips at the CTF's zeros."""
    box, psize, df = 128, 1.0, 10000.0
    simulate(
        tmp_path / "s",
        200,
        box=box,
        psize=psize,
        snr=2.0,
        seed=5,
        junk_fraction=0,
        defocus_range=(df, df),
        max_astigmatism=0.0,
        formats=(),
    )
    imgs = _stack_images(tmp_path / "s").astype(np.float64)
    ps = (np.abs(np.fft.rfft2(imgs)) ** 2).mean(axis=0)
    fy = np.fft.fftfreq(box)[:, None]
    fx = np.fft.rfftfreq(box)[None, :]
    shell = np.rint(np.hypot(fx, fy) * box).astype(int).ravel()
    radial = np.bincount(shell, ps.ravel()) / np.bincount(shell)
    signal = radial[: box // 2] - np.median(radial[40 : box // 2])  # minus the white floor
    k = (np.arange(box // 2) / (box * psize)).astype(np.float32)
    ctf = np.abs(ctf_2d(k, np.zeros_like(k), df, df, 0.0, 300.0, 2.7, 0.1)[0])
    inner = range(2, box // 2 - 1)
    zeros = [i for i in inner if ctf[i] <= min(ctf[i - 1], ctf[i + 1]) and ctf[i] < 0.3]
    peaks = np.array([i for i in inner if ctf[i] >= max(ctf[i - 1], ctf[i + 1]) and ctf[i] > 0.8])
    checked = 0
    for z in zeros:
        before, after = peaks[peaks < z], peaks[peaks > z]
        if len(before) == 0 or len(after) == 0 or signal[after[0]] < 3 * signal[40:].std():
            continue
        ring = min(signal[before[-1]], signal[after[0]])
        assert signal[z] < 0.5 * ring, f"no Thon-ring minimum at shell {z}"
        checked += 1
    assert checked >= 3


def test_populations_follow_weights(tmp_path):
    n = 4000
    info = simulate(
        tmp_path / "s",
        n,
        box=32,
        seed=11,
        n_views=4,
        n_states=3,
        view_weights=[4, 3, 2, 1],
        state_weights=[1, 1, 2],
        junk_fraction=0.2,
        formats=(),
    )
    t = load_truth(info.out_dir)
    good = t[t["junk"] == ""]
    assert abs(len(good) / n - 0.8) < 0.005
    views = good["view"].value_counts(normalize=True).sort_index().to_numpy()
    np.testing.assert_allclose(views, [0.4, 0.3, 0.2, 0.1], atol=0.03)
    states = good["state"].value_counts(normalize=True).sort_index().to_numpy()
    np.testing.assert_allclose(states, [0.25, 0.25, 0.5], atol=0.03)
    junk = t.loc[t["junk"] != "", "junk"].value_counts(normalize=True)
    for kind, w in zip(JUNK_KINDS, [0.4, 0.3, 0.3], strict=True):
        assert abs(junk[kind] - w) < 0.06
    assert abs(t["psi_deg"].mean() - 180) < 10 and t["psi_deg"].between(0, 360).all()
    assert t["shift_x_px"].abs().max() <= info.max_shift + 1e-6
    labels = true_labels(t, 3)
    assert len(np.unique(labels)) == 4 * 3 + 3


def _rot_max_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Max over in-plane rotations and shifts of the normalised correlation of a and b."""
    a = a - a.mean()
    fa = np.fft.rfft2(a)
    best = 0.0
    for angle in range(0, 360, 4):
        rb = ndimage.rotate(b, angle, reshape=False, order=1)
        rb = rb - rb.mean()
        cc = np.fft.irfft2(fa * np.conj(np.fft.rfft2(rb)), s=a.shape)
        best = max(best, cc.max() / np.sqrt((a * a).sum() * (rb * rb).sum()))
    return float(best)


def test_views_and_states_are_distinct_projections():
    p = true_projections(48, 4, 4)
    for v in range(4):
        for w in range(v + 1, 4):
            assert _rot_max_corr(p[v, 0], p[w, 0]) < 0.92, (v, w)
    for v in range(4):  # the flexible domain changes every view; missing domain too
        for s in range(3):
            assert _rot_max_corr(p[v, s], p[v, 3]) < 0.985, (v, s)
    # missing-domain state has less mass than the others
    assert p[0, 3].sum() < 0.85 * p[0, 0].sum()


def test_geometry_is_relions():
    """Particle = reference moved from r to R(psi) r + d, (x = column, y = row)."""
    box = 64
    n = 4
    plan = Plan(
        kind=np.zeros(n, np.int8),
        view=np.array([0, 1, 2, 3], np.int16),
        state=np.zeros(n, np.int16),
        psi_deg=np.array([30.0, 90.0, 200.0, 311.0], np.float32),
        shift=np.array([[2.5, -1.0], [0.0, 3.0], [-2.0, -2.0], [1.0, 0.5]], np.float32),
        micrograph=np.zeros(n, np.int32),
        junk_angle=np.zeros(n, np.float32),
        junk_dist=np.zeros(n, np.float32),
        junk_size=np.zeros(n, np.float32),
        defocus_u=np.ones(1, np.float32),
        defocus_v=np.ones(1, np.float32),
        defocus_angle=np.zeros(1, np.float32),
    )
    r = Renderer(box, Optics(psize=1.5), 4, 1)
    clean = r.clean_good(plan, np.arange(n), np.float32(1.0))  # no CTF
    ref = true_projections(box, 4, 1)[:, 0]
    c = box // 2
    yy, xx = np.mgrid[:box, :box].astype(np.float64)
    for i in range(n):
        a = np.deg2rad(plan.psi_deg[i])
        dx, dy = xx - c - plan.shift[i, 0], yy - c - plan.shift[i, 1]
        # source position r = R(-psi) (p - c - d) + c
        sx = np.cos(a) * dx + np.sin(a) * dy + c
        sy = -np.sin(a) * dx + np.cos(a) * dy + c
        expect = ndimage.map_coordinates(ref[plan.view[i]], [sy, sx], order=3)
        corr = np.corrcoef(expect.ravel(), clean[i].ravel())[0, 1]
        assert corr > 0.99, (i, corr)


def test_cli_simulate(tmp_path, capsys):
    out = tmp_path / "s"
    rc = cli_main(
        ["simulate", str(out), "--n-particles", "250", "--box", "48", "--seed", "2", "--quiet"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "250 particles" in text and "particles/s" in text
    for name in ("particles.star", "particles.cs", "truth.csv", "simulation.json"):
        assert (out / name).is_file()
    assert len(load_truth(out)) == 250
    rc = cli_main(["simulate", str(tmp_path / "bad"), "--n-particles", "10", "--box", "33"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--box 33" in err and "Traceback" not in err


@pytest.mark.relion
def test_relion_reads_simulated_star(sim, tmp_path):
    src = Path(sim.out_dir)
    proj = tmp_path / "proj"
    shutil.copytree(src, proj)
    res = subprocess.run(
        ["relion_star_handler", "--i", "particles.star", "--o", "copy.star"],
        cwd=proj,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    back = starfile.read(proj / "copy.star", always_dict=True)
    assert len(back["particles"]) == N
    assert back["particles"]["rlnImageName"].tolist() == load_truth(src)["image_name"].tolist()
    # and its image reader opens every particle through the STAR file
    res = subprocess.run(
        ["relion_image_handler", "--i", "particles.star", "--stats"],
        cwd=proj,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert sum("@stacks/mic_" in line for line in res.stdout.splitlines()) == N


@pytest.mark.relion
def test_relion_normalisation_leaves_images_unchanged(sim, tmp_path):
    """relion_preprocess --norm (ramp on, RELION's extraction default) is a no-op on them."""
    stack = Path(sim.out_dir) / "stacks" / "mic_00001.mrcs"
    for extra in ([], ["--no_ramp"]):
        out = tmp_path / "normed.mrcs"
        res = subprocess.run(
            ["relion_preprocess", "--operate_on", str(stack), "--operate_out", str(out)]
            + ["--norm", "--bg_radius", str(int(BG_RADIUS * BOX))]
            + extra,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        np.testing.assert_allclose(mrcfile.read(out), mrcfile.read(stack), atol=1e-4)
