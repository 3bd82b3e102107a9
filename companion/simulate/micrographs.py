"""Particle images of one micrograph: clean signal, junk, CTF, noise, normalisation.

All particles of a micrograph share its CTF, so a micrograph is one vectorised batch:
good particles are rendered analytically in Fourier space at the box size (one inverse FFT
each); junk is rendered on a grid padded to twice the box (so a gold edge or contamination
does not wrap around) and cropped. Dense objects (gold, contamination) also absorb: besides
their CTF-modulated phase contrast they add an unmodulated amplitude term.

Noise (:class:`NoiseModel`) is white (``kind="white"``, the original behaviour) or coloured:
detector noise shaped by an MTF roll-off plus structural noise from the ice, a low-pass
random field modulated by the micrograph's CTF like the particle; ``ice_fraction`` of the
noise variance is ice. The total noise variance is the same for both kinds (it sets --snr).

Stored images have protein WHITE (RELION's convention) and are normalised as RELION's
extraction does (:class:`Normaliser`): a plane fitted to the pixels outside the background
circle (radius 0.375 box, RELION's default) is subtracted, then the background has mean 0,
sd 1 — ``relion_preprocess --norm`` leaves the stored images unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from companion.classify.ctf import ctf_2d, rfft_freqs
from companion.simulate.phantom import (
    N_BLOBS,
    arm_blobs_2d,
    blobs_2d,
    particle_radius,
    render_rfft,
    sigmas_px,
)

try:  # scipy's FFT is ~3x faster than numpy's for float32 batches; same results
    from scipy import fft as _fft
except ImportError:  # pragma: no cover - scipy is a test dependency
    _fft = np.fft

JUNK_KINDS = ("gold_edge", "contamination", "noise")
GOOD, GOLD, CONTAM, NOISE = 0, 1, 2, 3
BG_RADIUS = 0.375  # RELION's default background circle: 75% of the box diameter
GOLD_DENSITY = 0.08  # projected density per px² of gold, relative to blob masses
ABSORPTION = 0.5  # amplitude (unmodulated) contrast of dense objects
NOISE_KINDS = ("white", "coloured")
DISORDER_BLUR = 1.6  # blob width factor of the flexible arm in the less-ordered population
DISORDER_HINGE = 50.0  # its hinge angle is uniform in ±DISORDER_HINGE degrees


@dataclass
class NoiseModel:
    """What the noise looks like. ``white``: i.i.d. Gaussian pixels. ``coloured``: a
    fraction ``ice_fraction`` of the variance is ice (white noise low-passed at
    ``ice_resolution`` Å, times the CTF and the MTF), the rest detector noise through the MTF
    (sinc(f) × (0.5 + 0.5 / (1 + (f / 0.2)²)), f in cycles/pixel: 0.36 at Nyquist)."""

    kind: str = "white"
    ice_fraction: float = 0.5
    ice_resolution: float = 20.0


@dataclass
class Optics:
    """Microscope settings shared by all micrographs."""

    psize: float
    voltage: float = 300.0
    cs: float = 2.7
    amp_contrast: float = 0.1


@dataclass
class Plan:
    """Every random draw of a simulation, one entry per particle (or per micrograph)."""

    kind: np.ndarray  # int8: GOOD, GOLD, CONTAM, NOISE
    view: np.ndarray  # int16, the (embedded) particle's view
    state: np.ndarray  # int16
    psi_deg: np.ndarray  # float32, in-plane angle applied (counter-clockwise)
    shift: np.ndarray  # float32 (N, 2), pixels (x, y)
    micrograph: np.ndarray  # int32, 0-based micrograph of each particle
    junk_angle: np.ndarray  # float32, gold edge normal / contamination direction (rad)
    junk_dist: np.ndarray  # float32, box units from the particle centre
    junk_size: np.ndarray  # float32, contamination sigma (box units)
    defocus_u: np.ndarray  # float32 per micrograph, Å
    defocus_v: np.ndarray
    defocus_angle: np.ndarray  # degrees
    # per particle: intensity scale of the signal (ice thickness; 1 = none), whether the
    # particle belongs to the less-ordered population, and then its hinge angle (else NaN)
    scale: np.ndarray | None = None
    disordered: np.ndarray | None = None
    hinge_deg: np.ndarray | None = None


def draw_extras(rng: np.random.Generator, plan: Plan, *, scale_sd: float,
                disordered_fraction: float, states_with_arm: np.ndarray) -> None:  # fmt: skip
    """Per-particle intensity scale (log-normal, mean 1, log-sd ``scale_sd``) and the
    less-ordered population (a fraction of good particles whose state has the arm: hinge
    uniform in ±DISORDER_HINGE°, arm blurred). Drawn from their own stream, so a plan with
    both off is the original one."""
    n = len(plan.kind)
    s = rng.normal(0.0, scale_sd, n) if scale_sd > 0 else np.zeros(n)
    plan.scale = np.exp(s - 0.5 * scale_sd**2).astype(np.float32)
    eligible = (plan.kind == GOOD) & states_with_arm[plan.state]
    plan.disordered = eligible & (rng.random(n) < disordered_fraction)
    plan.hinge_deg = np.where(
        plan.disordered, rng.uniform(-DISORDER_HINGE, DISORDER_HINGE, n), np.nan
    ).astype(np.float32)


def draw_plan(
    rng: np.random.Generator,
    n: int,
    *,
    view_weights: np.ndarray,
    state_weights: np.ndarray,
    junk_fraction: float,
    junk_weights: np.ndarray,
    max_shift: float,
    per_micrograph: int,
    defocus_range: tuple[float, float],
    max_astigmatism: float,
) -> Plan:
    """Draw labels, poses, junk geometry and per-micrograph CTFs for ``n`` particles."""
    n_junk = int(round(junk_fraction * n))
    kind = np.zeros(n, dtype=np.int8)
    kind[:n_junk] = 1 + rng.choice(len(JUNK_KINDS), size=n_junk, p=junk_weights)
    kind = rng.permutation(kind)
    view = rng.choice(len(view_weights), size=n, p=view_weights).astype(np.int16)
    state = rng.choice(len(state_weights), size=n, p=state_weights).astype(np.int16)
    psi = rng.uniform(0.0, 360.0, n).astype(np.float32)
    shift = rng.uniform(-max_shift, max_shift, (n, 2)).astype(np.float32)
    micrograph = (np.arange(n) // per_micrograph).astype(np.int32)
    n_mic = int(micrograph[-1]) + 1 if n else 0
    mean_df = rng.uniform(*defocus_range, n_mic)
    astig = rng.uniform(0.0, max_astigmatism, n_mic)
    return Plan(
        kind=kind,
        view=view,
        state=state,
        psi_deg=psi,
        shift=shift,
        micrograph=micrograph,
        junk_angle=rng.uniform(0, 2 * np.pi, n).astype(np.float32),
        junk_dist=rng.uniform(0.08, 0.3, n).astype(np.float32),
        junk_size=rng.uniform(0.06, 0.14, n).astype(np.float32),
        defocus_u=(mean_df + astig / 2).astype(np.float32),
        defocus_v=(mean_df - astig / 2).astype(np.float32),
        defocus_angle=rng.uniform(0.0, 180.0, n_mic).astype(np.float32),
    )


class Renderer:
    """Renders particle images for a phantom with ``n_views`` views and ``n_states`` states."""

    def __init__(self, box: int, optics: Optics, n_views: int, n_states: int,
                 noise: NoiseModel | None = None) -> None:  # fmt: skip
        self.box = box
        self.optics = optics
        self.noise = noise or NoiseModel()
        self.n_views, self.n_states = n_views, n_states
        self.centres, self.masses, sigmas = blobs_2d(n_views, n_states)
        self.sigmas_px = sigmas_px(sigmas, box)
        self.radius = particle_radius(n_states)
        yy, xx = np.mgrid[:box, :box] - box // 2
        r = np.hypot(xx, yy)
        self.normalise = Normaliser(box)
        self.inside = (r < self.radius * box).reshape(-1)
        self.noise_sd = 1.0

    # -- signal -----------------------------------------------------------------------------
    def _blob_positions(self, plan: Plan, idx: np.ndarray, centre: float) -> np.ndarray:
        """(len(idx), N_BLOBS, 2) pixel positions of each particle's blobs."""
        p = self.centres[plan.view[idx], plan.state[idx]] * self.box  # (n, B, 2)
        return _place(p, plan.psi_deg[idx], plan.shift[idx], centre)

    def templates_rfft(self, psi_deg: np.ndarray) -> np.ndarray:
        """rfft2 (box grid, complex64) of every (view, state) projection — ordered, scale 1,
        no CTF, centred on box//2 — at every angle in ``psi_deg``:
        (n_views · n_states · n_psi, box, box//2+1), view outermost, angle innermost."""
        psi = np.asarray(psi_deg, np.float32)
        n_t, n_psi = self.n_views * self.n_states, len(psi)
        p = np.repeat(self.centres.reshape(n_t, N_BLOBS, 2) * self.box, n_psi, axis=0)
        pos = _place(p, np.tile(psi, n_t), np.zeros((n_t * n_psi, 2)), self.box // 2)
        masses = np.repeat(self.masses.reshape(n_t, N_BLOBS), n_psi, axis=0)
        return render_rfft(pos, masses, self.sigmas_px, self.box)

    def ctf(self, n: int, du: float, dv: float, angle: float) -> np.ndarray:
        """The micrograph's CTF on an n-pixel rfft2 grid (defocus U, V in Å, angle in °)."""
        kx, ky = rfft_freqs(n, self.optics.psize)
        o = self.optics
        return ctf_2d(kx, ky, du, dv, angle, o.voltage, o.cs, o.amp_contrast)[0]

    def _particles_rfft(self, plan: Plan, idx: np.ndarray) -> np.ndarray:
        """rfft2 (box grid) of the clean particles ``idx`` at their pose (the less-ordered
        ones with their own hinge angle and a blurred arm)."""
        pos = self._blob_positions(plan, idx, self.box // 2)
        masses = self.masses[plan.view[idx], plan.state[idx]]
        sig: np.ndarray = self.sigmas_px
        if plan.disordered is not None and plan.disordered[idx].any():
            d = np.flatnonzero(plan.disordered[idx])
            arm = arm_blobs_2d(plan.view[idx[d]], plan.hinge_deg[idx[d]], self.n_views,
                               self.n_states) * self.box  # fmt: skip
            nb = N_BLOBS - arm.shape[1]
            pos[d, nb:] = _place(arm, plan.psi_deg[idx[d]], plan.shift[idx[d]], self.box // 2)
            sig = np.broadcast_to(self.sigmas_px, (len(idx), N_BLOBS)).copy()
            sig[d, nb:] *= np.float32(DISORDER_BLUR)
        f = render_rfft(pos, masses, sig, self.box)
        if plan.scale is not None:
            f *= plan.scale[idx][:, None, None]
        return f

    def clean_good(self, plan: Plan, idx: np.ndarray, ctf: np.ndarray) -> np.ndarray:
        """CTF-modulated, noise-free images of good particles ``idx``."""
        f = self._particles_rfft(plan, idx)
        f *= ctf
        return _fft.irfft2(f, s=(self.box, self.box), workers=1).astype(np.float32)

    def clean_junk(self, plan: Plan, idx: np.ndarray, ctf2: np.ndarray) -> np.ndarray:
        """CTF-modulated, noise-free junk images (padded 2x, cropped); zero for pure noise.

        Gold edges and contamination carry a partial/overlapped particle; the dense object
        adds phase contrast (through the CTF) and unmodulated absorption contrast.
        """
        box, n2 = self.box, 2 * self.box
        lo = n2 // 2 - box // 2
        kind = plan.kind[idx]
        out = np.zeros((len(idx), box, box), dtype=np.float32)
        has = np.flatnonzero(kind != NOISE)
        if len(has) == 0:
            return out
        j = idx[has]
        dense = np.empty((len(j), n2, n2), dtype=np.float32)
        gold = kind[has] == GOLD
        if gold.any():
            dense[gold] = self._gold(plan, j[gold])
        if (~gold).any():
            dense[~gold] = self._contamination(plan, j[~gold])
        canvas = dense.copy()
        part = _fft.irfft2(self._particles_rfft(plan, j), s=(box, box), workers=1)
        canvas[:, lo : lo + box, lo : lo + box] += part
        f = _fft.rfft2(canvas, workers=1)
        f *= ctf2
        img = _fft.irfft2(f, s=(n2, n2), workers=1)[:, lo : lo + box, lo : lo + box]
        out[has] = img + np.float32(ABSORPTION) * dense[:, lo : lo + box, lo : lo + box]
        return out

    def _axis2(self) -> np.ndarray:
        return np.arange(2 * self.box, dtype=np.float32) - self.box

    def _gold(self, plan: Plan, idx: np.ndarray) -> np.ndarray:
        """Half-plane of dense gold/carbon with a sharp edge near the particle (2x grid)."""
        box = self.box
        ax = self._axis2()
        a = plan.junk_angle[idx][:, None, None]
        cx = plan.shift[idx, 0][:, None, None]
        cy = plan.shift[idx, 1][:, None, None]
        t = (ax[None, None, :] - cx) * np.cos(a) + (ax[None, :, None] - cy) * np.sin(a)
        t -= (plan.junk_dist[idx] * box)[:, None, None]
        dens = np.float32(0.5) * (1 + np.tanh(t / np.float32(1.5)))
        # taper to zero at the padded border so the half-plane does not wrap around
        w = np.clip((box - np.abs(ax)) / np.float32(0.25 * box), 0, 1)
        taper = np.sin(np.float32(0.5 * np.pi) * w) ** 2
        dens *= taper[None, :, None] * taper[None, None, :] * np.float32(GOLD_DENSITY)
        return dens

    def _contamination(self, plan: Plan, idx: np.ndarray) -> np.ndarray:
        """A dense contamination blob (two Gaussians) overlapping the particle (2x grid)."""
        box = self.box
        ax = self._axis2()
        a = plan.junk_angle[idx]
        sig = (plan.junk_size[idx] * box)[:, None]
        d = (plan.junk_dist[idx] * box)[:, None] + sig
        cx = plan.shift[idx, 0:1] + d * np.cos(a)[:, None]
        cy = plan.shift[idx, 1:2] + d * np.sin(a)[:, None]
        dens = np.zeros((len(idx), 2 * box, 2 * box), dtype=np.float32)
        for ox, oy, k, h in ((0.0, 0.0, 1.0, 1.0), (0.6, -0.4, 0.7, 0.8)):
            s2 = 2 * (k * sig) ** 2
            gx = np.exp(-((ax - cx - ox * sig) ** 2) / s2)
            gy = np.exp(-((ax - cy - oy * sig) ** 2) / s2)
            dens += np.float32(h * GOLD_DENSITY) * gy[:, :, None] * gx[:, None, :]
        return dens

    # -- noise and normalisation -----------------------------------------------------------
    def calibrate_noise(self, snr: float, weights: np.ndarray, mean_defocus: float) -> float:
        """Noise sd giving ``snr`` = signal variance / noise variance inside the particle.

        Signal variance is that of the centred clean projections with the CTF at
        ``mean_defocus`` (no astigmatism), averaged over (view, state) with ``weights``.
        """
        nv, ns = self.masses.shape[:2]
        pos = self.centres.reshape(-1, N_BLOBS, 2) * self.box + self.box // 2
        f = render_rfft(pos, self.masses.reshape(-1, N_BLOBS), self.sigmas_px, self.box)
        f *= self.ctf(self.box, mean_defocus, mean_defocus, 0.0)
        img = _fft.irfft2(f, s=(self.box, self.box)).reshape(nv * ns, -1)[:, self.inside]
        var = float((img.var(axis=1) * weights.reshape(-1)).sum() / weights.sum())
        self.noise_sd = float(np.sqrt(var / snr))
        return self.noise_sd

    def micrograph(self, plan: Plan, idx: np.ndarray, m: int, rng: np.random.Generator):
        """Final float32 images (protein white, normalised) of particles ``idx`` on micrograph m."""
        box = self.box
        args = (float(plan.defocus_u[m]), float(plan.defocus_v[m]), float(plan.defocus_angle[m]))
        kind = plan.kind[idx]
        out = np.empty((len(idx), box, box), dtype=np.float32)
        good = np.flatnonzero(kind == GOOD)
        if len(good):
            out[good] = self.clean_good(plan, idx[good], self.ctf(box, *args))
        junk = np.flatnonzero(kind != GOOD)
        if len(junk):
            out[junk] = self.clean_junk(plan, idx[junk], self.ctf(2 * box, *args))
        out += self.draw_noise(len(idx), rng, args)
        return self.normalise(out)

    def draw_noise(self, n: int, rng: np.random.Generator, ctf_args: tuple) -> np.ndarray:
        """(n, box, box) float32 noise of variance noise_sd² (see :class:`NoiseModel`)."""
        noise = rng.standard_normal((n, self.box, self.box), dtype=np.float32)
        if self.noise.kind == "white":
            noise *= np.float32(self.noise_sd)
            return noise
        (h_det, sd_det), ice = self._noise_filters(ctf_args)
        det = _filtered(noise, h_det, sd_det)
        if ice is None:
            return det
        h_ice, sd_ice = ice
        white = rng.standard_normal((n, self.box, self.box), dtype=np.float32)
        return det + _filtered(white, h_ice, sd_ice)

    def noise_power(self, ctf_args: tuple) -> np.ndarray:
        """Expected |rfft2|² of :meth:`draw_noise`'s noise, per coefficient (box, box//2+1),
        float64: the exact noise spectrum of a micrograph with CTF ``ctf_args``."""
        box = self.box
        if self.noise.kind == "white":
            return np.full((box, box // 2 + 1), float(box * box) * self.noise_sd**2)
        power = np.zeros((box, box // 2 + 1))
        for parts in self._noise_filters(ctf_args):
            if parts is not None:
                h, sd = parts
                h = h.astype(np.float64)
                power += box * box * sd**2 * h**2 / _unit_variance(h)
        return power

    def _noise_filters(self, ctf_args: tuple) -> tuple:
        """Coloured noise as ((detector filter, sd), (ice filter, sd) or None)."""
        mtf = self._mtf()
        ice_f = float(self.noise.ice_fraction)
        det = (mtf, np.sqrt(1.0 - ice_f) * self.noise_sd)
        if ice_f <= 0:
            return det, None
        kx, ky = rfft_freqs(self.box, self.optics.psize)
        low = np.exp(-0.5 * (np.hypot(kx, ky) * self.noise.ice_resolution) ** 2)
        h = (low * self.ctf(self.box, *ctf_args) * mtf).astype(np.float32)
        return det, (h, np.sqrt(ice_f) * self.noise_sd)

    def _mtf(self) -> np.ndarray:
        kx, ky = rfft_freqs(self.box, 1.0)  # cycles per pixel
        f = np.hypot(kx, ky)
        return (np.sinc(f) * (0.5 + 0.5 / (1.0 + (f / 0.2) ** 2))).astype(np.float32)


def _place(points: np.ndarray, psi_deg: np.ndarray, shift: np.ndarray,
           centre: float) -> np.ndarray:  # fmt: skip
    """(n, B, 2) pixel positions of ``points`` (n, B, 2; px about the centre) rotated by
    ``psi_deg`` (n,; counter-clockwise in (x=column, y=row)), moved by ``shift`` (n, 2)."""
    a = np.deg2rad(np.asarray(psi_deg).astype(np.float64))[:, None]
    c, s = np.cos(a), np.sin(a)
    x = c * points[..., 0] - s * points[..., 1] + shift[:, 0:1] + centre
    y = s * points[..., 0] + c * points[..., 1] + shift[:, 1:2] + centre
    return np.stack([x, y], axis=-1)


def _unit_variance(h: np.ndarray) -> float:
    """Pixel variance of unit white noise filtered by the rfft-grid amplitude ``h``."""
    box = h.shape[0]
    w = np.full(h.shape[-1], 2.0)
    w[0] = 1.0
    w[-1] = 1.0  # even box: columns 0 and Nyquist appear once in the full grid
    return max(float((w * h.astype(np.float64) ** 2).sum() / box**2), 1e-30)


def _filtered(white: np.ndarray, h: np.ndarray, sd: float) -> np.ndarray:
    """White noise (n, box, box) filtered by the rfft-grid amplitude ``h``, scaled to sd."""
    box = white.shape[-1]
    f = _fft.rfft2(white, workers=1)
    f *= h
    out = _fft.irfft2(f, s=(box, box), workers=1).astype(np.float32)
    out *= np.float32(sd / np.sqrt(_unit_variance(h)))
    return out


class Normaliser:
    """RELION's particle normalisation (``relion_preprocess --norm``, its extraction default).

    Pixels farther than ``BG_RADIUS * box`` from the centre pixel are the background: a
    plane fitted to them by least squares is subtracted from the whole image (RELION's
    background ramp), then the image is scaled so the background has mean 0 and sd 1.
    ``ramp=False`` is ``--no_ramp`` (mean subtraction only).
    """

    def __init__(self, box: int, ramp: bool = True) -> None:
        yy, xx = np.mgrid[:box, :box] - box // 2
        bg = (np.hypot(xx, yy) > BG_RADIUS * box).reshape(-1)
        self.mask = bg.astype(np.float32)
        self.n_bg = float(bg.sum())
        self.ramp = ramp
        basis = np.stack([np.ones(box * box), xx.reshape(-1), yy.reshape(-1)]).astype(np.float64)
        self.basis = basis.astype(np.float32)  # (3, npix): 1, x, y
        gram = (basis[:, bg] @ basis[:, bg].T) if ramp else np.eye(3)
        self.weights = (basis * self.mask).astype(np.float32)  # (3, npix)
        self.gram_inv = np.linalg.inv(gram).astype(np.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Normalise float32 images (N, box, box) in place and return them."""
        flat = images.reshape(len(images), -1)
        # einsum, not BLAS: multi-threaded BLAS is ~10x slower than this on small batches
        if self.ramp:
            rhs = np.stack([np.einsum("ij,j->i", flat, w) for w in self.weights], axis=1)
            coef = rhs @ self.gram_inv  # (N, 3): plane offset, x and y slopes
            flat -= coef[:, 0:1]
            flat -= coef[:, 1:2] * self.basis[1]
            flat -= coef[:, 2:3] * self.basis[2]
        mean = np.einsum("ij,j->i", flat, self.mask) / self.n_bg
        sq = np.einsum("ij,ij,j->i", flat, flat, self.mask) / self.n_bg
        sd = np.sqrt(np.maximum(sq - mean * mean, 1e-12))
        flat -= mean[:, None]
        flat /= sd[:, None]
        return images
