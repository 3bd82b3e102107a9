"""RELION's CTF model, vectorised over particles, on NumPy or CuPy.

Follows RELION's ``src/ctf.h``: with defocus ``df`` in Å (positive = underfocus),

    gamma = -pi*lambda*df(angle)*k^2 + pi/2*Cs*lambda^3*k^4 - phase_shift - atan(Q0/sqrt(1-Q0^2))
    CTF   = -sin(gamma) * exp(-B/4 * k^2) * scale

RELION stores ``deltaf = -df`` internally (``getDeltaF``); writing the defocus term without
that minus sign would add defocus and spherical aberration instead of opposing them. The
sign here gives CTF > 0 at low frequency (protein white).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from companion.classify.backend import get_array_module, is_cupy, to_device

if TYPE_CHECKING:
    from companion.classify.fourier import Geometry
    from companion.particles import ParticleSet


def electron_wavelength(voltage_kv: Any) -> Any:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    xp = get_array_module(voltage_kv)
    v = xp.asarray(voltage_kv, dtype=xp.float64) * 1e3
    return 12.2643247 / xp.sqrt(v * (1.0 + v * 0.978466e-6))


def rfft_freqs(box: int, psize: float, xp: Any = np) -> tuple[Any, Any]:
    """Spatial frequencies (1/Å) ``(kx, ky)`` of an rfft2 grid, each shaped (box, box//2+1)."""
    ky = xp.fft.fftfreq(box, d=psize).astype(xp.float32)
    kx = xp.fft.rfftfreq(box, d=psize).astype(xp.float32)
    return xp.broadcast_to(kx[None, :], (box, box // 2 + 1)), xp.broadcast_to(
        ky[:, None], (box, box // 2 + 1)
    )


def ctf_2d(
    kx: Any,
    ky: Any,
    defocus_u: Any,
    defocus_v: Any,
    defocus_angle: Any,
    voltage: Any,
    cs: Any,
    amp_contrast: Any,
    phase_shift: Any = 0.0,
    bfactor: Any = 0.0,
    scale: Any = 1.0,
) -> Any:
    """CTF values for every particle on the frequency grid ``(kx, ky)`` (1/Å).

    Per-particle parameters are arrays of length N (or scalars) in RELION units: defocus in
    Å, angles in degrees, voltage in kV, Cs in mm, B-factor in Å². The grid may have any
    shape (full image, rfft half-plane, or a flat list of kept coefficients); the result has
    shape ``(N, *grid.shape)`` and the grid's float precision (float32 for float32 grids).
    """
    xp = get_array_module(kx)
    dtype = kx.dtype if kx.dtype in (xp.float32, xp.float64) else xp.float32

    def col(a: Any) -> Any:
        arr = xp.asarray(a, dtype=xp.float64).reshape(-1)
        return arr.reshape((-1,) + (1,) * kx.ndim)

    # per-particle constants in float64, the (N, grid) work in the grid's precision:
    # df(angle) = mean + half_diff * (cos 2az cos 2ang + sin 2az sin 2ang), one sin per point
    du, dv, ang = col(defocus_u), col(defocus_v), xp.deg2rad(col(defocus_angle))
    lam = electron_wavelength(col(voltage))
    k1 = np.pi * lam
    k2 = np.pi / 2 * col(cs) * 1e7 * lam**3
    q0 = col(amp_contrast)
    k3 = xp.arctan(q0 / xp.sqrt(1.0 - q0 * q0))
    k5 = xp.deg2rad(col(phase_shift))
    k4 = -col(bfactor) / 4.0

    kx_ = xp.asarray(kx, dtype=xp.float64)
    ky_ = xp.asarray(ky, dtype=xp.float64)
    k2grid = (kx_ * kx_ + ky_ * ky_)[None]
    azimuth = xp.arctan2(ky_, kx_)
    c2az = xp.cos(2.0 * azimuth)[None].astype(dtype)
    s2az = xp.sin(2.0 * azimuth)[None].astype(dtype)
    k2g = k2grid.astype(dtype)
    a = (-k1 * 0.5 * (du + dv)).astype(dtype)
    b = (-k1 * 0.5 * (du - dv)).astype(dtype)
    ca, sa = (b * xp.cos(2.0 * ang)).astype(dtype), (b * xp.sin(2.0 * ang)).astype(dtype)
    gamma = (a + ca * c2az + sa * s2az) * k2g + k2.astype(dtype) * (k2g * k2g)
    gamma -= (k5 + k3).astype(dtype)
    out = -xp.sin(gamma)
    if is_cupy(xp) or bool(xp.any(k4 != 0)):  # no host sync on a device
        out *= xp.exp(k4.astype(dtype) * k2g)
    out *= col(scale).astype(dtype)
    return out.astype(dtype)


def ctf_terms(particles: ParticleSet, idx: np.ndarray, geom: Geometry, xp: Any
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
