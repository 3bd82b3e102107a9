"""The likelihood ratio "particle vs empty image" a classifier that knew the truth would use.

For a simulated set, :func:`oracle_loglik_ratio` scores every stored image against the
simulator's own model: the true noise spectrum of its micrograph (white, or the detector +
CTF-modulated ice spectrum, :meth:`Renderer.noise_power`), templates times the micrograph's
CTF, and a pose prior that is uniform over templates, in-plane angles (``psi_step``) and
the simulator's square of shifts (``shift_step``). It returns, per image,

    log [ mean over poses of p(image | template at pose) / p(image | noise alone) ],

the Neyman–Pearson statistic for "particle or pure noise" when the model is true. Its AUC
(good particles vs pure-noise images) then bounds any per-particle rule on the same images,
up to the approximations below.
With ``averages`` (a run's class averages instead of the true projections) they are taken
as the true signal; being Wiener-shrunk they are not, so that is no bound for the run's
references. It is the benches' yardstick, not part of classification.

Approximations: the stored images were normalised (plane fit and background sd, ~the noise
sd), which is taken as a division by the noise sd; the less-ordered population and
per-particle scales, where simulated, are scored against the ordered templates at scale 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import fft as _fft
from scipy.special import logsumexp

from companion.errors import ParameterError
from companion.simulate.micrographs import NoiseModel, Optics, Renderer

TILE_BYTES = 64 << 20  # per block of (template × shift) rows


def _renderer(info: dict) -> Renderer:
    optics = Optics(info["psize"], info["voltage"], info["cs"], info["amp_contrast"])
    # white-noise sets store ice_resolution 0 (unused); the model's default stands in
    ice_res = info["ice_resolution"] or NoiseModel.ice_resolution
    colour = NoiseModel(info["noise"], info["ice_fraction"], ice_res)
    r = Renderer(info["box"], optics, info["n_views"], info["n_states"], colour)
    r.noise_sd = float(info["noise_sd"])
    return r


def rotated_averages(averages: np.ndarray, psi_deg: np.ndarray) -> np.ndarray:
    """rfft2 of each non-empty average (K, box, box; centred on box//2, stored units) rotated
    by every angle in ``psi_deg`` (cubic interpolation), complex128."""
    from scipy import ndimage

    avg = np.asarray(averages, np.float64)
    avg = avg[np.abs(avg).sum(axis=(1, 2)) > 0]
    rot = np.stack([ndimage.rotate(a, p, reshape=False, order=3, mode="constant")
                    for a in avg for p in psi_deg])  # fmt: skip
    return _fft.rfft2(rot).astype(np.complex128)


def shift_grid(max_shift: float, step: float) -> np.ndarray:
    """(S, 2) shifts (x, y) in px on a ``step`` grid covering the square ±max_shift."""
    n = int(np.floor(max_shift / step + 1e-9))
    d = np.arange(-n, n + 1) * step
    yy, xx = np.meshgrid(d, d, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


@dataclass
class OracleScores:
    """Per image (particle-file order): ``loglik_ratio`` (N,), the log likelihood ratio of
    the model over noise alone (nats); ``template_evidence`` (N, T), the same for each
    template alone (poses marginalised), T = n_views · n_states in ``view * n_states +
    state`` order (the truth's labels) or the non-empty averages in order."""

    loglik_ratio: np.ndarray
    template_evidence: np.ndarray

    def template_accuracy(self, labels: np.ndarray, mask: np.ndarray) -> float:
        """Fraction of ``mask``'s images whose most likely template is their label."""
        best = self.template_evidence[mask].argmax(axis=1)
        return float(np.mean(best == np.asarray(labels)[mask])) if mask.any() else float("nan")


def oracle_loglik_ratio(data_dir: str | Path, averages: np.ndarray | None = None,
                        **kw: float) -> np.ndarray:  # fmt: skip
    """:func:`oracle_scores`' per-image log likelihood ratio."""
    return oracle_scores(data_dir, averages, **kw).loglik_ratio


def oracle_scores(
    data_dir: str | Path,
    averages: np.ndarray | None = None,
    *,
    psi_step: float = 6.0,
    shift_step: float = 0.5,
    max_res_A: float | None = None,
) -> OracleScores:
    """Score every image of the simulated set in ``data_dir`` against the simulator's model
    (see the module docstring).

    ``averages`` (K, box, box): a run's class averages as templates (stored units; the
    true projections when None). ``max_res_A``: only frequencies up to it (e.g. a run's
    E-step limit)."""
    from companion.simulate import load_truth
    from companion.sources import open_particles
    from companion.stacks import read_images

    data = Path(data_dir)
    if not (data / "simulation.json").is_file():
        raise ParameterError(f"{data}: no simulation.json — the oracle needs a set written by "
                             "companion simulate (its truth and noise model)")  # fmt: skip
    info = json.loads((data / "simulation.json").read_text())
    truth = load_truth(data)
    particles = open_particles(data / "particles.star", None)
    r = _renderer(info)
    box, sd = r.box, r.noise_sd
    psi = np.arange(0.0, 360.0 - 1e-9, psi_step)
    if averages is None:
        templates = r.templates_rfft(psi).astype(np.complex128) / sd
    else:
        if np.ndim(averages) != 3 or np.shape(averages)[1:] != (box, box):
            raise ParameterError(f"oracle: averages of shape {np.shape(averages)}; the set in "
                                 f"{data} needs (K, {box}, {box})")  # fmt: skip
        templates = rotated_averages(averages, psi)
    shifts = shift_grid(float(info["max_shift"]), shift_step)
    w = np.full(box // 2 + 1, 2.0)
    w[0] = w[-1] = 1.0  # rfft columns 0 and Nyquist stand for one coefficient, others two
    ky, kx = np.fft.fftfreq(box)[:, None], np.fft.rfftfreq(box)[None, :]
    keep = np.ones((box, box // 2 + 1), bool)
    keep[0, 0] = False  # the stored images' mean is set by their normalisation, not the model
    if max_res_A:
        keep &= np.hypot(kx, ky) / float(info["psize"]) <= 1.0 / float(max_res_A)
    # exp(+2πi k·s): a template moved by +s is S·exp(−2πi k·s), and Re Σ X̄ S e^{-iφ}
    # = Re Σ X conj(S) e^{+iφ}
    ramps = np.exp(2j * np.pi * (kx[None] * shifts[:, 0, None, None]
                                 + ky[None] * shifts[:, 1, None, None]))[:, keep]  # fmt: skip
    n_s, n_psi = len(shifts), len(psi)
    n_base = len(templates) // n_psi  # templates are (base template, psi) in that order
    # whole base templates per block, so that each block's evidence is per template
    per_b = max(1, TILE_BYTES // (n_psi * n_s * int(keep.sum()) * 16))
    evidence = np.empty((len(truth), n_base))
    mic = particles.stack_index  # the simulator writes one stack per micrograph (one CTF)
    for m in np.unique(mic):
        idx = np.flatnonzero(mic == m)
        row = truth.iloc[idx[0]]
        args = (float(row.defocus_u), float(row.defocus_v), float(row.defocus_angle))
        power = r.noise_power(args) / sd**2  # stored images: noise of sd ~1
        ctf = r.ctf(box, *args).astype(np.float64)
        x = _fft.rfft2(read_images(particles, idx).astype(np.float64))
        xw = (x * (w / power))[:, keep]  # (n, F): whitened, weighted
        for b0 in range(0, n_base, per_b):
            b1 = min(b0 + per_b, n_base)
            s = (templates[b0 * n_psi : b1 * n_psi] * ctf)[:, keep]  # (t, F)
            energy = (np.abs(s) ** 2 * (w / power)[keep]).sum(axis=1)  # (t,)
            b = np.conj(s)[:, None, :] * ramps[None]  # (t, S, F)
            corr = (xw @ b.reshape(-1, b.shape[-1]).T).real  # (n, t·S)
            corr -= np.repeat(energy / 2, n_s)[None]
            ev = logsumexp(corr.reshape(len(idx), b1 - b0, n_psi * n_s), axis=2)
            evidence[idx, b0:b1] = ev - np.log(n_psi * n_s)
    ratio = logsumexp(evidence, axis=1) - np.log(n_base)
    return OracleScores(ratio, evidence)
