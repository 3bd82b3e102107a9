"""The simulator's noise spectrum and the oracle likelihood ratio (companion.simulate.oracle)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import logsumexp

from companion import metrics
from companion.simulate import load_truth, simulate
from companion.simulate.oracle import _renderer, oracle_loglik_ratio
from companion.sources import open_particles
from companion.stacks import read_images

BOX = 32


def _noise_set(tmp_path, noise, seed, **kw):
    d = tmp_path / f"{noise}{seed}"
    opts = dict(box=BOX, psize=6.0, seed=seed, junk_weights=[0, 0, 1], noise=noise,
                progress=False, formats=("star",))  # fmt: skip
    simulate(d, **(opts | kw))
    return d


@pytest.mark.parametrize("noise", ["white", "coloured"])
def test_noise_power_is_the_spectrum_of_the_stored_noise_images(tmp_path, noise):
    """Renderer.noise_power / sd² is E|rfft2|² of the stored (normalised) pure-noise images,
    per shell, micrograph by micrograph: coloured noise includes each micrograph's CTF on the
    ice. Shells 0-2 are left out (the normalisation's plane fit removes power there)."""
    d = _noise_set(tmp_path, noise, 0, n=1200, snr=0.05, junk_fraction=0.99, per_micrograph=300)
    r = _renderer(json.loads((d / "simulation.json").read_text()))
    truth, parts = load_truth(d), open_particles(d / "particles.star", None)
    is_noise = truth["junk"].to_numpy() == "noise"
    ky, kx = np.fft.fftfreq(BOX)[:, None], np.fft.rfftfreq(BOX)[None, :]
    shell = np.minimum(np.rint(np.hypot(kx, ky) * BOX).astype(int), BOX // 2).ravel()
    ratios = []
    for m in np.unique(parts.stack_index):
        idx = np.flatnonzero((parts.stack_index == m) & is_noise)
        row = truth.iloc[idx[0]]
        power = r.noise_power((row.defocus_u, row.defocus_v, row.defocus_angle)) / r.noise_sd**2
        x = np.fft.rfft2(read_images(parts, idx).astype(np.float64))
        q = (np.abs(x) ** 2 / power).mean(axis=0).ravel()
        ratios.append(np.bincount(shell, q) / np.bincount(shell))
    ratios = np.array(ratios)[:, 3:]
    # measured (seeds 0, 1): per micrograph within 8%, over the 4 micrographs within 5%
    assert np.abs(ratios - 1).max() < 0.15, ratios.round(3)
    assert np.abs(ratios.mean(axis=0) - 1).max() < 0.08, ratios.mean(axis=0).round(3)


@pytest.mark.parametrize("noise", ["white", "coloured"])
def test_oracle_ratio_is_calibrated_and_separates(tmp_path, noise):
    """With the true model the likelihood ratio has E[LR] = 1 over pure-noise images and
    E[1/LR] = 1 over particles; pooled over 3 seeds (900 each) both logs lie near 0 (measured
    over seeds 0-4: |per seed| <= 0.17; a noise spectrum 30% off moves the noise side by 0.2
    or more). Separation at this low SNR: AUC 0.68-0.78 over seeds 0-4."""
    noise_l, good_l, aucs = [], [], []
    for seed in range(3):
        snr = 0.02 if noise == "coloured" else 0.01
        d = _noise_set(tmp_path, noise, seed, n=600, snr=snr, junk_fraction=0.5)
        lr = oracle_loglik_ratio(d)
        kind = load_truth(d)["junk"].to_numpy()
        noise_l.append(lr[kind == "noise"])
        good_l.append(lr[kind == ""])
        aucs.append(metrics.auc(good_l[-1], noise_l[-1]))
    n, g = np.concatenate(noise_l), np.concatenate(good_l)
    assert abs(logsumexp(n) - np.log(n.size)) < 0.12
    assert abs(logsumexp(-g) - np.log(g.size)) < 0.12
    assert min(aucs) > 0.62, aucs


def test_oracle_with_averages_uses_them(tmp_path):
    """Templates from averages: the true projections as 'averages' give the same separation
    as the built-in true templates, a wrong-contrast copy gives none."""
    from companion.simulate import true_projections

    d = _noise_set(tmp_path, "white", 1, n=400, snr=0.01, junk_fraction=0.5)
    kind = load_truth(d)["junk"].to_numpy()
    info = json.loads((d / "simulation.json").read_text())
    proj = true_projections(BOX).reshape(-1, BOX, BOX) / info["noise_sd"]
    a_true = metrics.auc(*_split(oracle_loglik_ratio(d), kind))
    a_avg = metrics.auc(*_split(oracle_loglik_ratio(d, proj), kind))
    a_neg = metrics.auc(*_split(oracle_loglik_ratio(d, -proj), kind))
    assert a_avg > a_true - 0.05 and a_avg > 0.65
    assert a_neg < 0.5


def _split(lr, kind):
    return lr[kind == ""], lr[kind == "noise"]


def test_oracle_template_accuracy(tmp_path):
    """The most likely true template is the particle's (view, state) far above chance (1/16):
    measured over seeds 0-2 at SNR 0.3, box 32: white 0.92-0.94, coloured 0.64-0.71."""
    from companion.simulate import true_labels
    from companion.simulate.oracle import oracle_scores

    for noise, floor in (("white", 0.85), ("coloured", 0.55)):
        d = _noise_set(tmp_path, noise, 0, n=400, snr=0.3, junk_fraction=0.1, junk_weights=None)
        truth = load_truth(d)
        sc = oracle_scores(d)
        assert sc.template_evidence.shape == (400, 16)
        good = truth["junk"].to_numpy() == ""
        assert sc.template_accuracy(true_labels(truth, 4), good) > floor


def test_bench_subclassify_oracle_row(tmp_path, capsys):
    """``bench subclassify --oracle``: each row carries the true model's purity and fell-off
    recall over its 16 template classes, and the table prints them once per data set."""
    from companion.cli import main

    args = ["bench", "subclassify", "--n-particles", "300", "--n-classes", "4", "3", "--box",
            "32", "--stability", "0", "--device", "cpu", "--oracle",
            "--table", str(tmp_path / "t.json")]  # fmt: skip
    assert main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and rows[0]["oracle"] == rows[1]["oracle"]
    o = rows[0]["oracle"]
    assert o["n_classes"] == 16 and 0.0 < o["state_purity"] <= 1.0
    assert 0.0 <= o["fell_off_recall"] <= 1.0
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.count("oracle (white, seed 0") == 1
    assert f"state purity {100 * o['state_purity']:.1f}%" in text


def test_oracle_frequency_limit_and_bad_input(tmp_path):
    """A limit at Nyquist keeps every coefficient the unlimited score uses (the mean stays
    out); a directory that is no simulated set and averages of another box are refused with
    one message naming them."""
    from companion.errors import ParameterError

    d = _noise_set(tmp_path, "coloured", 2, n=200, snr=0.05, junk_fraction=0.5)
    info = json.loads((d / "simulation.json").read_text())
    nyquist = 2.0 * info["psize"] / np.sqrt(2.0)  # the rfft grid's corner
    np.testing.assert_allclose(oracle_loglik_ratio(d, max_res_A=nyquist),
                               oracle_loglik_ratio(d), rtol=1e-10)  # fmt: skip
    with pytest.raises(ParameterError, match="simulation.json"):
        oracle_loglik_ratio(tmp_path)
    with pytest.raises(ParameterError, match=r"\(K, 32, 32\)"):
        oracle_loglik_ratio(d, np.zeros((3, 16, 16)))


def test_renderer_templates_are_the_true_projections():
    """Renderer.templates_rfft at psi 0 is true_projections' rfft; at 90° it is the
    projection turned counter-clockwise in (x=column, y=row) about box//2: the value at
    (x, y) is the unturned one at (y, -x)."""
    from companion.simulate import true_projections
    from companion.simulate.micrographs import Optics, Renderer

    r = Renderer(BOX, Optics(6.0), 4, 4)
    f = r.templates_rfft(np.array([0.0, 90.0])).reshape(16, 2, BOX, BOX // 2 + 1)
    ref = true_projections(BOX, fourier=True).reshape(16, BOX, BOX // 2 + 1)
    np.testing.assert_allclose(f[:, 0], ref, atol=1e-4 * np.abs(ref).max())
    img0 = true_projections(BOX).reshape(16, BOX, BOX)
    c = BOX // 2
    y, x = np.mgrid[:BOX, :BOX] - c
    turned = img0[:, (-x + c) % BOX, (y + c) % BOX]
    img90 = np.fft.irfft2(f[:, 1], s=(BOX, BOX))
    assert np.abs(img90 - turned).max() < 0.01 * np.abs(img0).max()
