"""Streamed preprocessing: particle images → whitened-ready Fourier coefficients on disk.

Each batch of protein-white images is Fourier-cropped to the working box, normalised so the
background (outside the mask radius) has mean 0 and sd 1, multiplied by a soft circular
mask, transformed, and its kept coefficients written to an (N, F) complex64 file
(:class:`diskcache.RowFile`, read and written by rows, never mapped) — a million particles
never sit in RAM. The same pass accumulates, per optics group, the noise power spectrum of
the background (the image outside the particle mask, windowed), robust to the few particles
whose background holds junk (a per-shell median): the initial noise estimate, free of the
particles' and the junk's own power. Where the background is too small to measure, the
power of (particle − mean particle) is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from companion.classify import diskcache
from companion.classify import fourier as fo
from companion.classify.backend import batch_size, to_device, to_host, work_budget
from companion.classify.callbacks import call, stop_requested
from companion.classify.ctf import ctf_terms
from companion.classify.groups import MIN_GROUP_PARTICLES, noise_rows
from companion.classify.init import accumulate
from companion.errors import Aborted, InputError
from companion.io.atomic import atomic_write_bytes, atomic_write_text
from companion.particles import ParticleSet
from companion.stacks import file_order, read_images

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: initial noise from the background


@dataclass
class Prepared:
    """Preprocessed particles: coefficients on disk plus what the E-step needs per particle."""

    geom: fo.Geometry
    coeffs: diskcache.RowFile  # (N, F) complex64 on disk: coeffs[idx] reads rows
    group_index: np.ndarray  # int32[N] noise row (sigma2, scale) of each particle
    groups: np.ndarray  # int32[G] noise row of each ParticleSet group (see groups.py)
    sigma2_init: np.ndarray  # float64[G, S] initial noise power per shell (S = s_max + 1)
    seconds: float = 0.0
    # [Σ cy·X, Σ |cy|] over all particles: the initial reference (see init.py)
    average_sums: list | None = None
    # half the power of (particle − mean particle) per shell (G, S): RELION's initial
    # estimate, which holds the particles' and the junk's own power (see em.initial_state)
    sigma2_particles: np.ndarray | None = None


def stack_stamps(particles: ParticleSet) -> list[list[int]]:
    """[size, mtime_ns] of every stack file (what the images are, cheaply); -1 if missing."""
    out = []
    for path in particles.stack_paths:
        try:
            st = Path(path).stat()
            out.append([int(st.st_size), int(st.st_mtime_ns)])
        except OSError:
            out.append([-1, -1])
    return out


def fingerprint(particles: ParticleSet, geom: fo.Geometry) -> str:
    """Key of the preprocessed particles: the geometry, the particle rows and the stack
    files' paths, sizes and modification times (replaced stacks give another key)."""
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
                stack_stamps(particles),
            ]
        ).encode()
    )
    for a in (particles.stack_index, particles.image_index, particles.contrast, particles.psize,
              particles.group, particles.optics_group):  # fmt: skip
        h.update(np.ascontiguousarray(a).tobytes())
    for p in particles.stack_paths:
        h.update(str(p).encode())
    return h.hexdigest()


class BadImages(InputError):
    """Images with non-finite pixels were found and --drop-bad-images is on: ``keep`` is
    the index of the particles to classify instead (the caller subsets and runs again)."""

    def __init__(self, bad: np.ndarray, n: int) -> None:
        self.bad = np.asarray(bad, np.int64)
        self.keep = np.setdiff1d(np.arange(n), self.bad)
        super().__init__(f"{len(self.bad)} of {n} images have NaN/Inf pixels")


def _image_name(particles: ParticleSet, i: int) -> str:
    path = particles.stack_paths[int(particles.stack_index[i])]
    return (
        f"{path}: image {int(particles.image_index[i]) + 1} (row "
        f"{int(particles.source_row[i]) + 1} of {particles.source_path})"
    )


def _check_pixels(particles: ParticleSet, idx: np.ndarray, imgs: np.ndarray, drop: bool,
                  constant: list[int]) -> np.ndarray:  # fmt: skip
    """Bool mask of the images with finite pixels; refuses (InputError) a non-finite one
    unless ``drop``; appends constant (e.g. all-zero) images to ``constant``."""
    flat = imgs.reshape(len(idx), -1)
    good = np.isfinite(flat).all(axis=1)
    if not good.all() and not drop:
        first = int(idx[np.flatnonzero(~good)[0]])
        raise InputError(
            f"{_image_name(particles, first)} has NaN/Inf pixels — remove the particle or "
            "rerun with --drop-bad-images to leave such images out"
        )
    with np.errstate(invalid="ignore"):
        flat_rows = (flat.max(axis=1) == flat.min(axis=1)) & good
    constant.extend(int(i) for i in idx[flat_rows])
    return good


def _progress_path(cache_dir: Path) -> Path:
    return cache_dir / "progress.npz"


def _save_progress(cache_dir: Path, coeffs: diskcache.RowFile, state: dict[str, Any]) -> None:
    """Flush the coefficients written so far, then record how far (atomically)."""
    coeffs.flush()
    buf = BytesIO()
    np.savez(buf, **state)
    atomic_write_bytes(_progress_path(cache_dir), buf.getbuffer(), fsync=True)


def _load_progress(cache_dir: Path, fp: str) -> dict[str, Any] | None:
    path = _progress_path(cache_dir)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return None
    if str(state.get("fingerprint")) != fp or "bg_sums" not in state:
        return None
    return state


SAVE_EVERY_S = 5.0  # preprocessing progress is recorded at most this often
PREPROCESS_MOST = 4096  # most images per preprocessing batch


def prepare(particles: ParticleSet, geom: fo.Geometry, cache_dir: Path, xp: Any, *,
            reuse: bool = True, drop_bad: bool = False,
            callbacks: Any = None) -> Prepared:  # fmt: skip
    """Preprocess every particle into ``cache_dir``; also sums the phase-flipped average of
    all particles (the initial reference, see init.py).

    ``reuse`` (``--continue``): a finished cache with the same key is used as it is and an
    interrupted one is continued where it stopped (same result as an uninterrupted run);
    without it any earlier cache is discarded. Every image is checked for non-finite pixels
    (InputError naming it, or :class:`BadImages` after the pass with ``drop_bad``);
    constant images are warned about.
    """
    t0 = time.perf_counter()
    n, nf = len(particles), geom.n_coef
    cache_dir.mkdir(parents=True, exist_ok=True)
    data_path = cache_dir / "coeffs.c64"
    meta_path = cache_dir / "coeffs.json"
    group_index, groups = noise_rows(
        particles.group, particles.optics_group, len(particles.group_names)
    )
    fp = fingerprint(particles, geom)
    bad_path = cache_dir / "bad_images.json"  # kept beside the subset's cache
    if reuse and bad_path.is_file():
        known = json.loads(bad_path.read_text())
        if known.get("fingerprint") == fp:
            raise BadImages(np.asarray(known["bad"], np.int64), n)
    if reuse and meta_path.is_file() and data_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fp and meta.get("shape") == [n, nf]:
            coeffs = diskcache.open_rows(data_path, (n, nf), np.complex64)
            sigma2 = np.asarray(meta["sigma2_init"], dtype=np.float64)
            s2p = np.asarray(meta["sigma2_particles"], dtype=np.float64)
            average = None  # a cache without it: init.py sums it again from the rows
            if "average_num" in meta:
                num = np.asarray(meta["average_num"], dtype=np.float64)
                average = [num[0] + 1j * num[1], np.asarray(meta["average_den"], np.float64)]
            log.info("reusing preprocessed particles in %s", cache_dir)
            return Prepared(geom, coeffs, group_index, groups, sigma2, 0.0, average, s2p)
    meta_path.unlink(missing_ok=True)
    prog = _load_progress(cache_dir, fp) if reuse else None
    if prog is None:
        _progress_path(cache_dir).unlink(missing_ok=True)
    coeffs = diskcache.open_array(data_path, (n, max(nf, 1)), np.complex64,
                                  what="the preprocessed-particle cache",
                                  keep=prog is not None)  # fmt: skip

    w = geom.work_box
    mask = fo.soft_mask(w, geom.mask_radius, xp=xp)
    background = fo.radial_mask(w, min(geom.mask_radius, 0.5 * w - 2), xp=xp)
    # the initial spectrum is estimated per optics group (per-coefficient sums: memory
    # O(optics groups)) and copied to its noise rows; the M-step refines each row
    optics_ids, optics_index = np.unique(particles.optics_group, return_inverse=True)
    n_g = len(optics_ids)
    bg_noise = BackgroundNoise(geom, mask, n_g, xp)
    per_image = particles.box**2 * 4 * 12 + nf * 8 * 8
    bsz = batch_size(per_image, xp, budget=min(work_budget(xp), 512 << 20), most=PREPROCESS_MOST)
    if prog is not None:
        bsz = int(prog["batch"])  # the same batches as before the interruption
        state = {k: prog[k] for k in prog}
        bg_noise.sums, bg_noise.weights = state["bg_sums"], state["bg_weights"]
        log.info("continuing preprocessing after %d of %d particles", int(prog["done"]), n)
    else:
        state = {
            "fingerprint": np.asarray(fp),
            "batch": np.asarray(bsz),
            "next_batch": np.asarray(0),
            "done": np.asarray(0),
            "sum_x": np.zeros((n_g, nf), np.complex128),
            "sum_x2": np.zeros((n_g, nf), np.float64),
            "sum_v": np.zeros((n_g, nf), np.float64),
            "count": np.zeros(n_g, np.int64),
            "avg_num": np.zeros(nf, np.complex128),
            "avg_den": np.zeros(nf, np.float64),
            "bad": np.zeros(0, np.int64),
            "constant": np.zeros(0, np.int64),
            "bg_sums": bg_noise.sums,
            "bg_weights": bg_noise.weights,
        }
    log.info("preprocessing %d particles in batches of %d (cache %s)", n, bsz, data_path)
    ordered = file_order(particles)
    n_batches = -(-n // bsz)
    bad = list(state["bad"].tolist())
    constant = list(state["constant"].tolist())
    average = [state["avg_num"], state["avg_den"]]
    last_save = time.perf_counter()
    for b in range(int(state["next_batch"]), n_batches):
        if stop_requested(callbacks):
            state.update(bad=np.asarray(bad, np.int64), constant=np.asarray(constant, np.int64))
            _save_progress(cache_dir, coeffs, state)
            raise Aborted("stopped during preprocessing (--continue goes on from here)")
        idx = ordered[b * bsz : (b + 1) * bsz]
        imgs = read_images(particles, idx)
        good = _check_pixels(particles, idx, imgs, drop_bad, constant)
        if not good.all():
            bad.extend(int(i) for i in idx[~good])
            imgs = np.where(good[:, None, None], imgs, np.float32(0))
        x = fo.fourier_crop(to_device(imgs, xp), w)
        bg = x[:, background]
        mean = bg.mean(axis=1)
        sd = xp.maximum(bg.std(axis=1), 1e-6)
        x = (x - mean[:, None, None]) / sd[:, None, None]
        cy, _, v, _ = ctf_terms(particles, idx, geom, xp)
        keep = good if good.all() else np.flatnonzero(good)
        keep_d = slice(None) if good.all() else to_device(keep, xp)
        bg_noise.add(x[keep_d], v[keep_d], optics_index[idx][keep])
        x = x * mask
        coef = fo.to_kept(x, geom)
        accumulate(average, coef[keep_d], cy[keep_d])
        coef_h = to_host(coef)
        v_h = to_host(v).astype(np.float64)
        gi = np.where(good, optics_index[idx], -1)
        for g in np.unique(gi[gi >= 0]):
            sel = gi == g
            state["sum_x"][g] += coef_h[sel].sum(axis=0)
            state["sum_x2"][g] += (np.abs(coef_h[sel]) ** 2).sum(axis=0)
            state["sum_v"][g] += v_h[sel].sum(axis=0)
            state["count"][g] += int(sel.sum())
        coeffs[idx] = coef_h
        state["next_batch"] = np.asarray(b + 1)
        state["done"] = np.asarray(int(state["done"]) + len(idx))
        if time.perf_counter() - last_save >= SAVE_EVERY_S and b + 1 < n_batches:
            state.update(bad=np.asarray(bad, np.int64), constant=np.asarray(constant, np.int64))
            _save_progress(cache_dir, coeffs, state)
            last_save = time.perf_counter()
        call(callbacks, "progress", int(state["done"]), n, "preprocess")
    coeffs.flush()
    if constant:
        names = "; ".join(_image_name(particles, i) for i in constant[:3])
        log.warning(
            "%d image(s) are constant (e.g. all zero), which carry no signal: %s%s",
            len(constant), names, " ..." if len(constant) > 3 else "",
        )  # fmt: skip
    row_optics = np.zeros(int(group_index.max()) + 1 if n else 1, np.int64)
    row_optics[group_index] = optics_index
    s2p_optics = _initial_noise(geom, state["sum_x"], state["sum_x2"], state["sum_v"],
                                state["count"])  # fmt: skip
    s2p = s2p_optics[row_optics]
    sigma2 = bg_noise.estimate(s2p_optics)[row_optics]
    meta = {"fingerprint": fp, "shape": [n, nf], "sigma2_init": sigma2.tolist(),
            "sigma2_particles": s2p.tolist(), "bad": sorted(bad),
            # the initial reference's sums (exact in JSON): a reused cache starts the same
            "average_num": [average[0].real.tolist(), average[0].imag.tolist()],
            "average_den": average[1].tolist()}  # fmt: skip
    atomic_write_text(meta_path, json.dumps(meta))
    _progress_path(cache_dir).unlink(missing_ok=True)
    if bad:
        atomic_write_text(bad_path, json.dumps({"fingerprint": fp, "bad": sorted(bad)}))
        raise BadImages(np.asarray(sorted(bad)), n)
    coeffs.close()
    coeffs = diskcache.open_rows(data_path, (n, nf), np.complex64)
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
        out[g] = (
            pooled
            if count[g] < MIN_GROUP_PARTICLES
            else est(sum_x[g], sum_x2[g], sum_v[g], count[g])
        )
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
