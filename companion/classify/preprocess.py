"""Streamed preprocessing: particle images → whitened-ready Fourier coefficients on disk.

Each batch of protein-white images is Fourier-cropped to the working box, normalised so the
background (outside the mask radius) has mean 0 and sd 1, multiplied by a soft circular
mask, transformed, and its kept coefficients written to a ``np.memmap`` of shape (N, F)
complex64 — a million particles never sit in RAM. The same pass accumulates, per optics
group, the noise power spectrum of the background (the image outside the particle mask,
windowed), robust to the few particles whose background holds junk (a per-shell median):
the initial noise estimate, free of the particles' and the junk's own power. Where the
background is too small to measure, the power of (particle − mean particle) is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from companion.classify import fourier as fo
from companion.classify.backend import batch_size, to_device, to_host, work_budget
from companion.classify.callbacks import call, stop_requested
from companion.classify.ctf import ctf_2d
from companion.classify.init import accumulate
from companion.errors import Aborted
from companion.particles import ParticleSet

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: initial noise from the background


@dataclass
class Prepared:
    """Preprocessed particles: coefficients on disk plus what the E-step needs per particle."""

    geom: fo.Geometry
    coeffs: np.ndarray  # (N, F) complex64 memmap
    group_index: np.ndarray  # int32[N] row of sigma2 for each particle
    groups: np.ndarray  # int32[G] optics-group ids
    sigma2_init: np.ndarray  # float64[G, S] initial noise power per shell (S = s_max + 1)
    seconds: float = 0.0
    # [Σ cy·X, Σ |cy|] over all particles: the initial reference (see init.py)
    average_sums: list | None = None
    # half the power of (particle − mean particle) per shell (G, S): RELION's initial
    # estimate, which holds the particles' and the junk's own power (see em.initial_state)
    sigma2_particles: np.ndarray | None = None


def ctf_terms(particles: ParticleSet, idx: np.ndarray, geom: fo.Geometry, xp: Any
              ) -> tuple[Any, Any, Any, Any]:  # fmt: skip
    """Per-particle CTF factors on the kept coefficients, each (B, F) float32 on ``xp``:

    - ``cy``: what multiplies the data in the likelihood's cross term (C; 1 for
      CTF-premultiplied images; |C| for phase-flipped ones),
    - ``c2``: C² (the quadratic term),
    - ``v``: noise variance factor (1; C² for premultiplied images, whose noise is C·n),
    - ``cm``: the model's CTF on the reference (C; C² premultiplied; |C| phase-flipped).
    """
    c = particles.ctf
    kx, ky = geom.freqs_A()
    ctf = ctf_2d(
        to_device(kx, xp), to_device(ky, xp),
        *(to_device(getattr(c, f)[idx], xp) for f in (
            "defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amp_contrast",
            "phase_shift", "bfactor", "scale")),
    )  # fmt: skip
    prem = to_device(particles.ctf_premultiplied[idx], xp)[:, None]
    flip = to_device(particles.phase_flipped[idx], xp)[:, None]
    c2 = ctf * ctf
    absc = xp.abs(ctf)
    cy = xp.where(prem, xp.float32(1.0), xp.where(flip, absc, ctf)).astype(xp.float32)
    cm = xp.where(prem, c2, xp.where(flip, absc, ctf)).astype(xp.float32)
    v = xp.where(prem, xp.maximum(c2, 1e-4), xp.float32(1.0)).astype(xp.float32)
    return cy, c2.astype(xp.float32), v, cm


def fingerprint(particles: ParticleSet, geom: fo.Geometry) -> str:
    h = hashlib.sha1()
    h.update(
        json.dumps(
            [
                CACHE_VERSION,
                len(particles),
                geom.box,
                geom.work_box,
                geom.s_max,
                round(geom.mask_radius, 4),
                str(particles.source_path),
            ]
        ).encode()
    )
    for a in (particles.stack_index, particles.image_index, particles.contrast, particles.psize):
        h.update(np.ascontiguousarray(a).tobytes())
    for p in particles.stack_paths:
        h.update(str(p).encode())
    return h.hexdigest()


def prepare(particles: ParticleSet, geom: fo.Geometry, cache_dir: Path, xp: Any, *,
            reuse: bool = True, callbacks: Any = None) -> Prepared:  # fmt: skip
    """Preprocess every particle into ``cache_dir`` (reused when it matches); also sums
    the phase-flipped average of all particles (the initial reference, see init.py)."""
    t0 = time.perf_counter()
    n, nf = len(particles), geom.n_coef
    cache_dir.mkdir(parents=True, exist_ok=True)
    data_path = cache_dir / "coeffs.c64"
    meta_path = cache_dir / "coeffs.json"
    groups, group_index = np.unique(particles.optics_group, return_inverse=True)
    groups = groups.astype(np.int32)
    group_index = group_index.astype(np.int32)
    fp = fingerprint(particles, geom)
    if reuse and meta_path.is_file() and data_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fp and meta.get("shape") == [n, nf]:
            coeffs = np.memmap(data_path, dtype=np.complex64, mode="r", shape=(n, nf))
            sigma2 = np.asarray(meta["sigma2_init"], dtype=np.float64)
            s2p = np.asarray(meta["sigma2_particles"], dtype=np.float64)
            log.info("reusing preprocessed particles in %s", cache_dir)
            return Prepared(geom, coeffs, group_index, groups, sigma2, 0.0, None, s2p)
    meta_path.unlink(missing_ok=True)
    coeffs = np.memmap(data_path, dtype=np.complex64, mode="w+", shape=(n, max(nf, 1)))
    average = [np.zeros(nf, np.complex128), np.zeros(nf, np.float64)]

    w = geom.work_box
    mask = fo.soft_mask(w, geom.mask_radius, xp=xp)
    background = fo.radial_mask(w, min(geom.mask_radius, 0.5 * w - 2), xp=xp)
    n_g = len(groups)
    bg_noise = BackgroundNoise(geom, mask, n_g, xp)
    sum_x = np.zeros((n_g, nf), np.complex128)
    sum_x2 = np.zeros((n_g, nf), np.float64)
    sum_v = np.zeros((n_g, nf), np.float64)
    count = np.zeros(n_g, np.int64)
    per_image = particles.box**2 * 4 * 12 + nf * 8 * 8
    bsz = batch_size(per_image, xp, budget=min(work_budget(xp), 512 << 20), most=4096)
    done = 0
    for idx, imgs in particles.iter_batches(bsz):
        if stop_requested(callbacks):
            raise Aborted("stopped during preprocessing; nothing to resume from yet")
        x = fo.fourier_crop(to_device(imgs, xp), w)
        bg = x[:, background]
        mean = bg.mean(axis=1)
        sd = xp.maximum(bg.std(axis=1), 1e-6)
        x = (x - mean[:, None, None]) / sd[:, None, None]
        cy, _, v, _ = ctf_terms(particles, idx, geom, xp)
        bg_noise.add(x, v, group_index[idx])
        x = x * mask
        coef = fo.to_kept(x, geom)
        accumulate(average, coef, cy)
        coef_h = to_host(coef)
        v_h = to_host(v).astype(np.float64)
        gi = group_index[idx]
        for g in np.unique(gi):
            sel = gi == g
            sum_x[g] += coef_h[sel].sum(axis=0)
            sum_x2[g] += (np.abs(coef_h[sel]) ** 2).sum(axis=0)
            sum_v[g] += v_h[sel].sum(axis=0)
            count[g] += int(sel.sum())
        coeffs[idx] = coef_h
        done += len(idx)
        call(callbacks, "progress", done, n, "preprocess")
    coeffs.flush()
    s2p = _initial_noise(geom, sum_x, sum_x2, sum_v, count)
    sigma2 = bg_noise.estimate(s2p)
    meta = {"fingerprint": fp, "shape": [n, nf], "sigma2_init": sigma2.tolist(),
            "sigma2_particles": s2p.tolist()}  # fmt: skip
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta))
    tmp.replace(meta_path)
    coeffs = np.memmap(data_path, dtype=np.complex64, mode="r", shape=(n, nf))
    secs = time.perf_counter() - t0
    log.info("preprocessed %d particles to box %d (%d coefficients) in %.1fs", n, w, nf, secs)
    return Prepared(geom, coeffs, group_index, groups, sigma2, secs, average, s2p)


def _initial_noise(geom: fo.Geometry, sum_x: np.ndarray, sum_x2: np.ndarray,
                   sum_v: np.ndarray, count: np.ndarray) -> np.ndarray:  # fmt: skip
    """sigma²(shell) per group: half the power of (particle − mean particle), per unit of
    noise variance factor; groups with few particles use the pooled estimate."""
    n_s = geom.s_max + 1

    def est(sx: np.ndarray, sx2: np.ndarray, sv: np.ndarray, c: float) -> np.ndarray:
        resid = np.maximum(sx2 - np.abs(sx) ** 2 / max(c, 1.0), 0.0)
        num = fo.shell_sums(resid[None], geom, n_s)[0]
        den = fo.shell_sums(sv[None], geom, n_s)[0] * 2.0
        s2 = num / np.maximum(den, 1e-30)
        good = s2 > 0
        if not good.any():
            return np.ones(n_s)
        s2[~good] = s2[good].mean()
        s2[0] = s2[1] if n_s > 1 else s2[0]
        return s2

    pooled = est(sum_x.sum(0), sum_x2.sum(0), sum_v.sum(0), float(count.sum()))
    out = np.empty((len(count), n_s))
    for g in range(len(count)):
        out[g] = pooled if count[g] < 50 else est(sum_x[g], sum_x2[g], sum_v[g], count[g])
    return out


class BackgroundNoise:
    """Initial noise power per shell and group from the background: each normalised image
    times the complement of the particle mask (widened by the mask's soft edge), Fourier
    transformed; per particle the mean power per shell over the noise variance factor,
    then per group the median over particles (Wilson-Hilferty: the median of a χ² with d
    degrees of freedom is (1 - 2/(9d))³ of its mean), scaled by Σmask² / Σwindow² to the
    masked particle images. Junk in a few particles' backgrounds (gold edges) moves a median
    little; junk inside the mask does not enter at all."""

    MIN_FRACTION = 0.05  # background window below this fraction of the box: not used

    def __init__(self, geom: fo.Geometry, mask: Any, n_groups: int, xp: Any) -> None:
        w = geom.work_box
        edge = max(2.0, w / 16)
        self.window = 1.0 - fo.soft_mask(w, geom.mask_radius + edge, edge, xp=xp)
        m2 = float(to_host((mask * mask).sum()))
        b2 = float(to_host((self.window * self.window).sum()))
        self.usable = b2 >= self.MIN_FRACTION * w * w
        self.ratio = m2 / max(b2, 1e-30)
        self.geom, self.xp = geom, xp
        n_s = geom.s_max + 1
        self.n_shell = np.maximum(fo.shell_sums(np.ones((1, geom.n_coef)), geom, n_s)[0], 1)
        self.sums = np.zeros((n_groups, n_s))
        self.weights = np.zeros(n_groups)

    def add(self, images: Any, v: Any, group_index: np.ndarray) -> None:
        """Accumulate the batch's per-group medians (``images`` normalised, unmasked)."""
        if not self.usable:
            return
        n_s = self.geom.s_max + 1
        coef = fo.to_kept(images * self.window, self.geom)
        p = self.xp.abs(coef) ** 2
        # per unit of noise variance factor: shell power over shell Σv (not Σ of ratios,
        # which C² near a CTF zero would blow up for premultiplied images)
        per = to_host(fo.shell_sums(p, self.geom, n_s)) / np.maximum(
            to_host(fo.shell_sums(v, self.geom, n_s)), 1e-30
        )  # (B, S) mean power per coefficient
        for g in np.unique(group_index):
            sel = group_index == g
            self.sums[g] += np.median(per[sel], axis=0) * sel.sum()
            self.weights[g] += sel.sum()

    def estimate(self, fallback: np.ndarray) -> np.ndarray:
        """sigma² (G, S) in the convention of :func:`_initial_noise` (half the power of a
        masked coefficient); ``fallback`` where the background could not be measured."""
        if not self.usable or not self.weights.any():
            return fallback
        dof = 2.0 * self.n_shell
        median_to_mean = (1.0 - 2.0 / (9.0 * dof)) ** 3
        pooled = self.sums.sum(0) / self.weights.sum()
        out = fallback.copy()
        for g in range(len(self.weights)):
            med = self.sums[g] / self.weights[g] if self.weights[g] >= 50 else pooled
            s2 = 0.5 * self.ratio * med / median_to_mean
            ok = np.isfinite(s2) & (s2 > 0)
            out[g, ok] = s2[ok]
        out[:, 0] = out[:, 1] if out.shape[1] > 1 else out[:, 0]
        return out
