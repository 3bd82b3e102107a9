"""Fourier-space geometry of the classifier: working box, kept coefficients, shells,
masks, shifts and in-plane rotations.

Conventions (all arrays on NumPy or CuPy, module taken from the inputs):

- An image's centre is pixel ``(box//2, box//2)``; transforms are ``rfft2(ifftshift(img),
  norm="ortho")`` so rotations and phase ramps act about that centre.
- ``(x, y) = (column, row)``. Rotating an image by ``phi`` moves the content at ``p`` to
  ``R(phi) p`` with ``R = [[cos, -sin], [sin, cos]]``; shifting by ``t`` moves it to ``p + t``.
  In Fourier space: rotation ``F'(k) = F(R(-phi) k)``, shift ``F'(k) = F(k) exp(-2πi k·t/box)``.
- The classifier keeps a flat list of non-redundant rfft coefficients (``kx > 0`` or
  ``kx == 0, ky > 0``) inside the resolution limit, sorted by radius so that every lower
  resolution limit is a prefix of the list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from companion.classify.backend import csr_matrix, get_array_module, to_device


def working_box(box: int, psize: float, max_resolution: float) -> tuple[int, int]:
    """``(work_box, s_max)``: an even box whose Nyquist reaches ``max_resolution`` (never
    larger than ``box``), and the last Fourier shell no finer than ``max_resolution``."""
    s_max = max(2, math.floor(box * psize / max_resolution + 1e-6))
    work = min(2 * s_max, box - box % 2)
    work = max(work, 8)
    return work, min(s_max, work // 2)


@dataclass
class Geometry:
    """Boxes, pixel sizes and the kept Fourier coefficients of one classification."""

    box: int  # original box (px)
    psize: float  # original pixel size (Å)
    work_box: int
    s_max: int  # last kept shell (working-grid units, same as original-grid units)
    mask_radius: float  # working px
    kept: np.ndarray  # int64[F] flat index into the (work_box, work_box//2+1) rfft grid
    kx: np.ndarray  # float32[F] frequency index along x (cycles per box)
    ky: np.ndarray  # float32[F]
    shell: np.ndarray  # int32[F] rounded radius, 1..s_max
    _device: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def create(cls, box: int, psize: float, max_resolution: float,
               particle_diameter: float | None) -> Geometry:  # fmt: skip
        work, s_max = working_box(box, psize, max_resolution)
        work_psize = box * psize / work
        if particle_diameter is None:
            radius = 0.45 * work
        else:
            radius = min(0.5 * particle_diameter / work_psize, 0.5 * work - 1)
        ky = np.fft.fftfreq(work, 1.0 / work)
        kx = np.arange(work // 2 + 1, dtype=np.float64)
        gy, gx = np.meshgrid(ky, kx, indexing="ij")
        r = np.sqrt(gx * gx + gy * gy)
        inside = (r <= s_max + 1e-9) & (r > 0) & (2 * gx < work) & (2 * np.abs(gy) < work)
        keep = inside & ((gx > 0) | (gy > 0))
        flat = np.flatnonzero(keep.ravel())
        order = np.lexsort((flat, r.ravel()[flat]))
        flat = flat[order]
        return cls(
            box=int(box),
            psize=float(psize),
            work_box=int(work),
            s_max=int(s_max),
            mask_radius=float(radius),
            kept=flat.astype(np.int64),
            kx=gx.ravel()[flat].astype(np.float32),
            ky=gy.ravel()[flat].astype(np.float32),
            shell=np.rint(r.ravel()[flat]).astype(np.int32),
        )

    def on(self, name: str, xp: Any) -> Any:
        """Table ``name`` (``kept``, ``kx``, ``ky``, ``shell``; ``kx_A``/``ky_A``: the
        frequencies in 1/Å) on the device of ``xp``, uploaded once per geometry."""
        key = (name, getattr(xp, "__name__", "numpy"))
        if key not in self._device:
            host = dict(zip(("kx_A", "ky_A"), self.freqs_A(), strict=True)).get(name)
            self._device[key] = to_device(getattr(self, name) if host is None else host, xp)
        return self._device[key]

    @property
    def n_coef(self) -> int:
        return int(self.kept.size)

    @property
    def work_psize(self) -> float:
        return self.box * self.psize / self.work_box

    def prefix(self, shell: int) -> int:
        """Number of kept coefficients with radius ≤ ``shell`` (a prefix of the list)."""
        r = np.sqrt(self.kx.astype(np.float64) ** 2 + self.ky.astype(np.float64) ** 2)
        return int(np.searchsorted(r, shell + 1e-9, side="right"))

    def freqs_A(self) -> tuple[np.ndarray, np.ndarray]:
        """Spatial frequencies (1/Å) of the kept coefficients."""
        d = self.box * self.psize
        return (self.kx / d).astype(np.float32), (self.ky / d).astype(np.float32)

    def shell_resolution(self, n_shells: int | None = None) -> np.ndarray:
        """Resolution (Å) of shells 0..n-1 of the ORIGINAL box (inf for shell 0)."""
        n = self.box // 2 + 1 if n_shells is None else n_shells
        s = np.arange(n, dtype=np.float64)
        with np.errstate(divide="ignore"):
            res = np.where(s > 0, self.box * self.psize / np.maximum(s, 1e-30), np.inf)
        return res.astype(np.float32)


# ------------------------------------------------------------------ real-space helpers


def soft_mask(box: int, radius: float, edge: float | None = None, xp: Any = np) -> Any:
    """Circular mask centred on ``box//2``: 1 inside ``radius - edge/2``, raised-cosine to 0
    at ``radius + edge/2`` (clipped to the box)."""
    edge = max(2.0, box / 16) if edge is None else edge
    c = box // 2
    y, x = np.mgrid[0:box, 0:box]
    r = np.hypot(x - c, y - c)
    lo, hi = radius - edge / 2, min(radius + edge / 2, box / 2)
    lo = min(lo, hi - 1.0)
    t = np.clip((r - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    m = 0.5 * (1.0 + np.cos(np.pi * t))
    return to_device(m.astype(np.float32), xp)


def apply_mask(images: Any, mask: Any, background: Any) -> Any:
    """Set each image's mean over ``background`` (bool, outside the particle) to 0, then
    multiply by the soft ``mask``. The kept coefficients exclude the DC term, so an image
    rebuilt from them has mean 0 and a negative background under a positive particle; this
    restores the zero background the particles were normalised to."""
    bg = images[..., background].mean(axis=-1)
    return (images - bg[..., None, None]) * mask


def radial_mask(box: int, radius: float, xp: Any = np) -> Any:
    """Boolean mask of pixels farther than ``radius`` from the centre (the background)."""
    c = box // 2
    y, x = np.mgrid[0:box, 0:box]
    return to_device(np.hypot(x - c, y - c) > radius, xp)


def fourier_resample(images: Any, size: int) -> Any:
    """Images (B, n, n) resampled to (B, size, size) by cropping or zero-padding the spectrum.

    The centre pixel ``n//2`` maps to ``size//2``; pixel values (not sums) are preserved.
    """
    xp = get_array_module(images)
    n = images.shape[-1]
    if size == n:
        return images.astype(xp.float32, copy=False)
    f = xp.fft.rfft2(xp.fft.ifftshift(images, axes=(-2, -1)), norm="ortho")
    m = min(n, size)  # the band both grids share
    lo, h, cols = (m + 1) // 2, m // 2, m // 2 + 1  # rows ky >= 0: 0..lo-1; ky < 0: last h
    out = xp.zeros(images.shape[:-2] + (size, size // 2 + 1), dtype=f.dtype)
    out[..., :lo, :cols] = f[..., :lo, :cols]
    out[..., size - h :, :cols] = f[..., n - h :, :cols]
    img = xp.fft.irfft2(out * (size / n), s=(size, size), norm="ortho")
    return xp.fft.fftshift(img, axes=(-2, -1)).astype(xp.float32)


def fourier_crop(images: Any, size: int) -> Any:
    """Downsample (B, n, n) images to (B, size, size), size ≤ n, by cropping the spectrum."""
    return fourier_resample(images, size)


def fourier_pad(images: Any, size: int) -> Any:
    """Upsample (B, n, n) images to (B, size, size), size ≥ n, by zero-padding the spectrum."""
    return fourier_resample(images, size)


# ------------------------------------------------------------------ kept coefficients


def to_kept(images: Any, geom: Geometry) -> Any:
    """Working-box images (B, w, w) → kept coefficients (B, F) complex64."""
    xp = get_array_module(images)
    f = xp.fft.rfft2(xp.fft.ifftshift(images, axes=(-2, -1)), norm="ortho")
    f = f.reshape(f.shape[:-2] + (-1,))
    return f[..., geom.on("kept", xp)].astype(xp.complex64)


def kept_to_grid(coef: Any, geom: Geometry) -> Any:
    """Kept coefficients (B, F) → full Hermitian rfft grid (B, w, w//2+1) complex."""
    xp = get_array_module(coef)
    w = geom.work_box
    grid = xp.zeros(coef.shape[:-1] + (w * (w // 2 + 1),), dtype=xp.complex64)
    grid[..., geom.on("kept", xp)] = coef
    grid = grid.reshape(coef.shape[:-1] + (w, w // 2 + 1))
    # column kx = 0: fill ky < 0 from the kept ky > 0 (Hermitian)
    col = grid[..., :, 0]
    ky = np.arange(1, (w + 1) // 2)
    idx_pos, idx_neg = to_device(ky, xp), to_device((w - ky) % w, xp)
    col[..., idx_neg] = xp.conj(col[..., idx_pos])
    return grid


def from_kept(coef: Any, geom: Geometry) -> Any:
    """Kept coefficients (B, F) → working-box real images (B, w, w)."""
    xp = get_array_module(coef)
    w = geom.work_box
    img = xp.fft.irfft2(kept_to_grid(coef, geom), s=(w, w), norm="ortho")
    return xp.fft.fftshift(img, axes=(-2, -1)).astype(xp.float32)


def shell_sums(values: Any, geom: Geometry, n_shells: int | None = None) -> Any:
    """Sum of ``values`` (..., F) over each shell → (..., n_shells) (float64).

    One float64 GEMM against a shell-membership table (kept on the device): a fixed
    summation order, unlike a weighted ``bincount`` (atomics on a GPU)."""
    xp = get_array_module(values)
    n = geom.s_max + 1 if n_shells is None else n_shells
    key = ("shell_table", n, getattr(xp, "__name__", "numpy"))
    if key not in geom._device:
        table = np.zeros((geom.n_coef, n), np.float64)
        ok = geom.shell < n
        table[np.flatnonzero(ok), geom.shell[ok]] = 1.0
        geom._device[key] = to_device(table, xp)
    lead = values.shape[:-1]
    v = values.reshape(-1, values.shape[-1]).astype(xp.float64)
    return (v @ geom._device[key]).reshape(lead + (n,))


def radial_profile(per_shell: np.ndarray, geom: Geometry, xp: Any = np) -> Any:
    """Per-shell functions (S,) or (M, S) interpolated linearly at each kept coefficient's
    exact radius → (F,) or (M, F) float32 (smooth in |k|, so they commute with rotations)."""
    p = np.asarray(per_shell, np.float64)
    r = np.hypot(geom.kx.astype(np.float64), geom.ky.astype(np.float64))
    last = p.shape[-1] - 1
    i0 = np.clip(np.floor(r), 0, last).astype(np.int64)
    i1 = np.minimum(i0 + 1, last)
    frac = np.clip(r - i0, 0.0, 1.0)
    vals = p[..., i0] * (1 - frac) + p[..., i1] * frac
    return to_device(vals.astype(np.float32), xp)


def shell_counts(geom: Geometry) -> np.ndarray:
    """Number of kept coefficients per shell 0..s_max."""
    return np.bincount(geom.shell, minlength=geom.s_max + 1).astype(np.float64)


def frc(a: Any, b: Any, geom: Geometry) -> Any:
    """Fourier ring correlation per shell between coefficient sets (..., F) → (..., S)."""
    xp = get_array_module(a)
    num = shell_sums(xp.real(a * xp.conj(b)), geom)
    da = shell_sums(xp.abs(a) ** 2, geom)
    db = shell_sums(xp.abs(b) ** 2, geom)
    return num / xp.sqrt(xp.maximum(da * db, 1e-300))


# ------------------------------------------------------------------ shifts


def shift_grid(radius: float, step: float) -> np.ndarray:
    """Integer shift grid (T, 2) of (ix, iy) with ``step·|(ix, iy)| ≤ radius``; (0, 0) first."""
    n = int(math.floor(radius / step + 1e-9))
    iy, ix = np.mgrid[-n : n + 1, -n : n + 1]
    ok = np.hypot(ix, iy) * step <= radius + 1e-9
    pts = np.stack([ix[ok], iy[ok]], axis=1)
    order = np.lexsort((pts[:, 0], pts[:, 1], np.hypot(pts[:, 0], pts[:, 1])))
    return pts[order].astype(np.int32)


def phase_ramps(shifts: Any, geom: Geometry, n_coef: int | None = None, xp: Any = np) -> Any:
    """``exp(-2πi k·t / w)`` for shifts ``t`` (T, 2) in working px → (T, F) complex64.

    Multiplying a particle's coefficients by row ``t`` shifts its content by ``+t``.
    """
    n = geom.n_coef if n_coef is None else n_coef
    t = np.asarray(to_host_np(shifts), dtype=np.float64)
    ang = -2.0 * np.pi * (t[:, :1] * geom.kx[None, :n] + t[:, 1:2] * geom.ky[None, :n])
    return to_device(np.exp(1j * ang / geom.work_box).astype(np.complex64), xp)


def to_host_np(a: Any) -> np.ndarray:
    from companion.classify.backend import to_host

    return to_host(a)


def shift_images(coef: Any, shift: Any, geom: Geometry) -> Any:
    """Shift (B, F) coefficients by per-row shifts (B, 2) in working px (content moves +t)."""
    xp = get_array_module(coef)
    t = xp.asarray(shift, dtype=xp.float32)
    kx, ky = geom.on("kx", xp), geom.on("ky", xp)
    ang = (-2.0 * np.pi / geom.work_box) * (t[:, :1] * kx[None] + t[:, 1:2] * ky[None])
    return (coef * xp.exp(1j * ang.astype(xp.float32))).astype(xp.complex64)


# ------------------------------------------------------------------ rotations


class Projector:
    """In-plane rotations of working-box images, evaluated at the kept coefficients.

    ``project`` gives ``A[k, r] = F(rotate(img_k, phi_r))`` by bilinear interpolation on a
    ``pad``-times oversampled spectrum with gridding correction (as RELION's projector).
    ``backproject`` rotates per-rotation sums back into the class frame and adds them up:
    complex sums ``S[k, r]`` by the adjoint of ``project`` (push onto the oversampled grid,
    back to real space, crop to the working box, gridding correction, forward transform),
    corrected for the weight that leaks across the edge of the kept disc; real weights
    ``D[k, r]`` by normalised bilinear interpolation on the working grid (non-negative, no
    ringing where the CTF² / sigma² weights vary fast).

    Every interpolation is one sparse (CSR) matrix built once on the device and applied to all
    classes (and half-sets) at once: complex values ride as interleaved float32 columns, so
    one real SpMM does them all, and a CSR product sums in a fixed order (deterministic on
    both backends, unlike scatter-adds with atomics). FFTs are batched complex64.
    """

    CHUNK_ELEMS = 1 << 25  # oversampled-grid elements per FFT batch (fixed: results and
    # memory do not depend on free memory)

    def __init__(self, geom: Geometry, n_rot: int, *, pad: int = 4,
                 xp: Any = np, n_coef: int | None = None) -> None:  # fmt: skip
        self.geom = geom
        self.n_rot = int(n_rot)
        self.xp = xp
        self.n_coef = geom.n_coef if n_coef is None else int(n_coef)
        self.fwd = _Table(geom, self.n_rot, pad, self.n_coef, xp)
        self.weight = _Table(geom, self.n_rot, 1, self.n_coef, xp, reverse=True, valid=True)
        self.kept = to_device(geom.kept[: self.n_coef], xp)
        pb = self.fwd.pbox
        self.mirror_rows = to_device((-np.arange(pb)) % pb, xp)
        # push + crop leaks weight across the edge of the kept disc: measure it once
        ones = xp.ones((1, self.n_rot, self.n_coef), xp.complex64)
        self.edge = xp.maximum(xp.real(self._push(ones)[0]) / np.float32(self.n_rot), 0.05)
        self.edge = self.edge.astype(xp.float32)

    def angles_deg(self) -> np.ndarray:
        return np.arange(self.n_rot) * (360.0 / self.n_rot)

    def _chunk(self) -> int:
        return max(1, self.CHUNK_ELEMS // (self.fwd.pbox * self.fwd.pbox))

    def project(self, images: Any) -> Any:
        """Rotated spectra (K, R, F) complex64 of working-box images (K, w, w)."""
        xp = self.xp
        images = xp.asarray(images, dtype=xp.float32)
        k = images.shape[0]
        out = xp.empty((k, self.n_rot, self.n_coef), dtype=xp.complex64)
        c = self._chunk()
        for s in range(0, k, c):  # fixed-size class chunks bound the oversampled spectra
            spec = self.fwd.spectrum(images[s : s + c])  # (c, P) complex64
            out[s : s + c] = self.fwd.gather_all(spec)
        return out

    def backproject(self, sums: Any, weights: Any | None = None,
                    radial: Any | None = None) -> tuple[Any, Any]:  # fmt: skip
        """(K, R, F) complex sums (and real weights) in the rotated frames → class frame,
        summed over rotations: ((K, F) complex64, (K, F) float32). K may stack classes of
        several half-sets: every row is independent.

        ``radial`` (F,) or (K, F): a smooth function of |k| the sums are multiplied by before
        the interpolation and divided by after (rotation keeps |k|). Pass the inverse of the
        weights' radial profile, so the interpolation never mixes values orders of magnitude
        apart (whitening, the CTF's rise from its low-frequency minimum).
        """
        xp = self.xp
        k = sums.shape[0]
        rad = xp.ones((1, self.n_coef), xp.float32) if radial is None else radial
        rad = xp.asarray(rad, xp.float32).reshape(-1, self.n_coef)
        rad = xp.broadcast_to(rad, (k, self.n_coef))
        num = self._push(sums * rad[:, None, :]) / (rad * self.edge[None])
        den = None
        if weights is not None:
            w = (weights * rad[:, None, :]).reshape(k, -1)  # (K, R*F)
            den = spmm(self.weight.back, w.T).T / rad  # (K, F)
            den = den.astype(xp.float32)
        return num.astype(xp.complex64), den

    def _push(self, vals: Any) -> Any:
        """Adjoint of ``project`` for (K, R, F) complex values → (K, F) complex64."""
        xp, t, geom = self.xp, self.fwd, self.geom
        pb, pc, w = t.pbox, t.pcols, geom.work_box
        k = vals.shape[0]
        out = xp.empty((k, self.n_coef), xp.complex64)
        o = pb // 2 - w // 2
        c = self._chunk()
        for s in range(0, k, c):
            v = vals[s : s + c].astype(xp.complex64)
            n = v.shape[0]
            v = xp.where(t.conj[None], xp.conj(v), v).reshape(n, -1)  # (n, R*F)
            cols = xp.ascontiguousarray(v.T).view(xp.float32)  # (R*F, 2n) interleaved
            grid = xp.ascontiguousarray(spmm(t.push, cols).view(xp.complex64).T)  # (n, G)
            grid = grid.reshape(n, pb, pc)
            col = grid[:, :, 0].copy()  # a sample's mirror on column 0 lands on column 0 too
            grid[:, :, 0] = col + xp.conj(col[:, self.mirror_rows])
            img = xp.fft.fftshift(xp.fft.irfft2(grid, s=(pb, pb), norm="ortho"), axes=(-2, -1))
            crop = img[:, o : o + w, o : o + w] / t.gridding
            f = xp.fft.rfft2(xp.fft.ifftshift(crop, axes=(-2, -1)), norm="ortho").reshape(n, -1)
            out[s : s + n] = f[:, self.kept] * np.float32(t.pad)
        return out


def spmm(mat: Any, dense: Any) -> Any:
    """Sparse (CSR, from :func:`companion.classify.backend.csr_matrix`) × dense float32,
    C-ordered (cuSPARSE may hand back a column-major result; callers view rows as complex)."""
    return get_array_module(dense).ascontiguousarray(mat @ dense)


def _col0_mirror(geom: Geometry, n_coef: int) -> np.ndarray:
    """(2, M) flat grid indices: kept column-0 points and their mirrors (ky -> -ky)."""
    w = geom.work_box
    kx, ky = geom.kx[:n_coef], geom.ky[:n_coef]
    sel = np.flatnonzero(kx == 0)
    src = geom.kept[:n_coef][sel]
    dst = ((-ky[sel].astype(np.int64)) % w) * (w // 2 + 1)
    return np.stack([src, dst])


def _known_grid(geom: Geometry, n_coef: int) -> np.ndarray:
    w = geom.work_box
    known = np.zeros(w * (w // 2 + 1), bool)
    known[geom.kept[:n_coef]] = True
    known[_col0_mirror(geom, n_coef)[1]] = True
    return known


class _Table:
    """Bilinear gather positions of the kept coefficients rotated by each angle, on a grid
    oversampled ``pad`` times (``reverse``: angle -phi_r, i.e. rotating back)."""

    def __init__(self, geom: Geometry, n_rot: int, pad: int, n_coef: int, xp: Any,
                 reverse: bool = False, valid: bool = False) -> None:  # fmt: skip
        self.geom, self.pad, self.xp = geom, int(pad), xp
        w = geom.work_box
        self.pbox = w * self.pad
        self.pcols = self.pbox // 2 + 1
        sign = -1.0 if reverse else 1.0
        phi = sign * np.deg2rad(np.arange(n_rot) * (360.0 / n_rot))
        kx = geom.kx[:n_coef].astype(np.float64)
        ky = geom.ky[:n_coef].astype(np.float64)
        c, s = np.cos(phi)[:, None], np.sin(phi)[:, None]
        # F'(k) = F(R(-phi) k): R(-phi) = [[c, s], [-s, c]]
        qx = self.pad * (c * kx + s * ky)
        qy = self.pad * (-s * kx + c * ky)
        flip = qx < 0
        qx = np.where(flip, -qx, qx)
        qy = np.where(flip, -qy, qy)
        x0, y0 = np.floor(qx), np.floor(qy)
        fx, fy = qx - x0, qy - y0
        x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
        x1 = np.minimum(x0 + 1, self.pcols - 1)
        r0, r1 = y0 % self.pbox, (y0 + 1) % self.pbox
        idx = np.stack([r0 * self.pcols + x0, r0 * self.pcols + x1,
                        r1 * self.pcols + x0, r1 * self.pcols + x1], axis=-1)  # fmt: skip
        wts = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=-1)
        if valid:  # only grid points whose value is known count (normalised interpolation)
            wts = wts * _known_grid(geom, n_coef)[idx]
        self.conj = to_device(flip, xp)  # (R, F)
        n_rows = n_rot * n_coef
        rows = np.repeat(np.arange(n_rows), 4)
        g_size = self.pbox * self.pcols
        if valid:  # back-rotation of real weights: (F, R*F), normalised over known points
            src = np.full(w * (w // 2 + 1), -1, np.int64)
            src[geom.kept[:n_coef]] = np.arange(n_coef)
            mirror = _col0_mirror(geom, n_coef)
            src[mirror[1]] = src[mirror[0]]
            norm = wts.sum(axis=-1)
            wn = np.where(norm[..., None] > 0, wts / np.maximum(norm, 1e-12)[..., None], 0)
            col = src[idx.reshape(-1)]
            r_of = np.repeat(np.arange(n_rot), n_coef * 4)
            f_of = np.tile(np.repeat(np.arange(n_coef), 4), n_rot)
            ok = (col >= 0) & (wn.reshape(-1) != 0)
            self.back = csr_matrix(wn.reshape(-1)[ok].astype(np.float32), f_of[ok],
                                   (r_of * n_coef + col)[ok], (n_coef, n_rows), xp)  # fmt: skip
        else:  # gather (R*F, G) and its adjoint, the push (G, R*F)
            data, cols = wts.reshape(-1).astype(np.float32), idx.reshape(-1)
            self.gather = csr_matrix(data, rows, cols, (n_rows, g_size), xp)
            self.push = csr_matrix(data, cols, rows, (g_size, n_rows), xp)
        self.n_rot, self.n_coef = n_rot, n_coef
        r = (np.arange(w) - w // 2) / self.pbox
        g1 = np.sinc(r) ** 2  # gridding correction of linear interpolation
        self.gridding = to_device((g1[:, None] * g1[None, :]).astype(np.float32), xp)

    def spectrum(self, images: Any) -> Any:
        """Oversampled, gridding-corrected spectra (B, P) of working-box images (B, w, w)."""
        xp = self.xp
        w, pb = self.geom.work_box, self.pbox
        b = images.shape[0]
        big = xp.zeros((b, pb, pb), dtype=xp.float32)
        o = pb // 2 - w // 2
        big[:, o : o + w, o : o + w] = images / self.gridding
        f = xp.fft.rfft2(xp.fft.ifftshift(big, axes=(-2, -1)), norm="ortho")
        return (f * np.float32(self.pad)).reshape(b, -1).astype(xp.complex64)

    def gather_all(self, spec: Any) -> Any:
        """Spectra (B, P) at every rotation → (B, R, F) complex64 (one SpMM for all B)."""
        xp = self.xp
        b = spec.shape[0]
        cols = xp.ascontiguousarray(spec.T).view(xp.float32)  # (P, 2B)
        v = xp.ascontiguousarray(spmm(self.gather, cols).view(xp.complex64).T)  # (B, R*F)
        v = v.reshape(b, self.n_rot, self.n_coef)
        return xp.where(self.conj[None], xp.conj(v), v)
