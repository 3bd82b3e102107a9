"""Streamed preprocessing: particle images → whitened-ready Fourier coefficients on disk.

Each batch of protein-white images is Fourier-cropped to the working box, normalised so the
background (outside the mask radius) has mean 0 and sd 1, multiplied by a soft circular
mask, transformed, and its kept coefficients written to a ``np.memmap`` of shape (N, F)
complex64 — a million particles never sit in RAM. The same pass accumulates, per optics
group, the power spectrum of the particles minus their mean: the initial noise estimate.
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

CACHE_VERSION = 1


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
    fields = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amp_contrast",
              "phase_shift", "bfactor", "scale")  # fmt: skip
    per = to_device(np.stack([np.asarray(getattr(c, f), np.float64)[idx] for f in fields]), xp)
    ctf = ctf_2d(geom.on("kx_A", xp), geom.on("ky_A", xp), *(per[i] for i in range(len(fields))))
    flags = to_device(np.stack([particles.ctf_premultiplied[idx],
                                particles.phase_flipped[idx]]), xp)  # fmt: skip
    prem, flip = flags[0][:, None], flags[1][:, None]
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
            log.info("reusing preprocessed particles in %s", cache_dir)
            return Prepared(geom, coeffs, group_index, groups, sigma2, 0.0)
    meta_path.unlink(missing_ok=True)
    coeffs = np.memmap(data_path, dtype=np.complex64, mode="w+", shape=(n, max(nf, 1)))
    average = [np.zeros(nf, np.complex128), np.zeros(nf, np.float64)]

    w = geom.work_box
    mask = fo.soft_mask(w, geom.mask_radius, xp=xp)
    background = fo.radial_mask(w, min(geom.mask_radius, 0.5 * w - 2), xp=xp)
    n_g = len(groups)
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
        x = (x - mean[:, None, None]) / sd[:, None, None] * mask
        coef = fo.to_kept(x, geom)
        cy, _, v, _ = ctf_terms(particles, idx, geom, xp)
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
    sigma2 = _initial_noise(geom, sum_x, sum_x2, sum_v, count)
    meta = {"fingerprint": fp, "shape": [n, nf], "sigma2_init": sigma2.tolist()}
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta))
    tmp.replace(meta_path)
    coeffs = np.memmap(data_path, dtype=np.complex64, mode="r", shape=(n, nf))
    secs = time.perf_counter() - t0
    log.info("preprocessed %d particles to box %d (%d coefficients) in %.1fs", n, w, nf, secs)
    return Prepared(geom, coeffs, group_index, groups, sigma2, secs, average)


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
