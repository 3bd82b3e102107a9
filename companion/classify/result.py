"""What a classification run produces: host-neutral arrays that the sinks write out.

Geometry follows RELION's convention (x = column, y = row): aligning
particle i means shifting it by ``+shift_px[i]`` (original pixels) and then rotating it by
``psi_deg[i]``; the host writers convert (CryoSPARC: radians, pixels at ``alignments2D/psize_A``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

#: the per-particle fields of a ClassResult (length N in their first axis)
PER_PARTICLE = (
    "class_id", "psi_deg", "shift_px", "max_prob", "class_prob", "loglik", "n_significant",
    "norm_correction", "half_set", "class_ess", "scale", "post_class", "post_prob",
    "post_loglik", "image_pow", "cross_cor", "slice_pow", "stability", "loglik_gain",
    "lowres_power",
)  # fmt: skip


@dataclass
class ClassResult:
    """Result of a 2D classification of N particles into K classes.

    Per particle (length N, in the ParticleSet's order):
        class_id: int32, 0-based class index.
        psi_deg: float32, in-plane angle (RELION rlnAnglePsi convention, degrees).
        shift_px: float32[N, 2], (x, y) origin in original pixels (rlnOriginX/YAngst / psize).
        max_prob: float32, largest posterior over (class, pose) (rlnMaxValueProbDistribution).
        class_prob: float32, posterior probability of the assigned class (summed over poses).
        loglik: float32, log-likelihood contribution in RELION's sense
            (rlnLogLikeliContribution; see classify/particle_terms.py).
        n_significant: int32, (class, pose) samples holding 99.9% of the posterior
            (rlnNrOfSignificantSamples, RELION's count).
        norm_correction: float32 (rlnNormCorrection; 1: companion applies no per-image
            norm correction, what RELION writes without --norm).
        half_set: uint8, 0 or 1 (random half used for the per-class FRC).
        class_ess: float32, effective number of classes, 1 / Σ_k p_k² (CryoSPARC's
            alignments2D/class_ess, checked on a real export).
        scale: float32 or None, per-particle intensity scale (--scale-correction; 1 off).
        post_class, post_prob, post_loglik: (N, P) or None — the P = --posteriors most
            probable classes (int32, 0-based, most probable first), their posteriors and
            log-likelihoods log p(X | class) (float32); class -1 where not computed.
        image_pow, cross_cor, slice_pow: float32 or None — CryoSPARC's powers of the best
            pose in the assigned class (Σ|X|²/σ², 2 Re Σ X̄·S/σ², Σ|S|²/σ² for the model S
            the last E-step used, with its scale), over the E-step's coefficients.
        loglik_gain: float32, ``loglik`` minus the log-likelihood of the same image under
            the empty model (noise only): ``loglik + ½ Σ |x|² / σ²``. How much better the
            particle is explained by the classes than by no particle at all — about
            +½‖CTF·A‖²/σ² for a particle, −½‖CTF·A‖²/σ² (plus the best noise match) for
            pure noise. None for results made without it.
        lowres_power: float32 or None, :func:`companion.select.lowres_power` of the image
            (the per-particle stage of ``--select auto``); set by the run before writing
            (:func:`companion.select.with_particle_features`), None before.

    Per class (length K):
        averages: float32[K, box, box] at the ORIGINAL box and pixel size (Fourier-padded
            from the working box), protein white, not CTF-multiplied.
        class_sizes: int64, particles whose hard label is the class.
        class_distribution: float32, soft class occupancy (sums to 1; rlnClassDistribution).
        resolution_A: float32, FRC 0.143 between the particle half-sets' averages inside the
            particle mask (Å; inf if undetermined: too few particles per half, flat
            posterior or undetermined rotation — see classify/resolution.py).
        accuracy_rot_deg, accuracy_trans_A: float32 (rlnAccuracyRotations / ...TranslationsAngst).
        prior_offset_px: float32[K, 2] (rlnClassPriorOffsetX/Y in pixels; zeros if not used).

    Spectra (per Fourier shell of the ORIGINAL box, length box // 2 + 1; powers in RELION's
    normalisation — forward FFT divided by the pixel count — of the normalised particle
    images; sigma2 and tau2 are half the power per complex coefficient, as in RELION):
        shell_resolution_A: float32, resolution of each shell (Å; inf for shell 0).
        frc: float32[K, S], masked half-set FRC per class (0 beyond the working limit).
            Both halves are aligned against the same reference, so within the E-step
            resolution limit it is optimistic (reference bias), as for any 2D classification.
        ssnr: float32[K, S], spectral SNR per class (RELION's data-vs-prior ratio,
            rlnSsnrMap: mean Wiener weight × T × tau2).
        sigma2_ref: float32[K, S], reference power per shell.
        tau2: float32[K, S], signal power estimate per shell (the prior of the next
            M-step's Wiener filter: half the power spectrum of the reference).
        sigma2_noise: float32[G, S], noise power per shell per micrograph group (G groups
            in the order of ``ParticleSet.group_names``; groups too small for their own
            spectrum share their optics group's pooled one, see classify/groups.py), as
            used by the last E-step (beyond the working limit: the last working shell's).
        optics_groups: int32, the optics-group ids of the particles.
        group_scale: float32[G], per-group intensity scale correction (RELION --scale,
            rlnGroupScaleCorrection; particle-weighted mean 1; 1 when not estimated).

    Run:
        iteration: the last finished iteration (1-based).
        n_iterations: iterations planned.
        work_box, work_psize: the working (Fourier-cropped) box and its pixel size.
        current_resolution_A: E-step resolution limit of the last iteration (Å; the
            M-step always reaches --max-resolution).
        loglik_total: float, summed log-likelihood.
        avg_pmax: float, mean of max_prob.
        sigma_offsets_A: float, RMS of the shifts (Å).
        cap: int | None, the class-size cap in force (balanced mode).
        params: the resolved parameter dict (ClassifyParams.resolved()).
        device: e.g. "cpu (numpy, 2 threads)" or "gpu: NVIDIA H100 (cupy 14.2)".
        timings: seconds per stage and per iteration.
        history: per-iteration dicts (iteration, uncertainty, resolution, class sizes, ...).
    """

    class_id: np.ndarray
    psi_deg: np.ndarray
    shift_px: np.ndarray
    max_prob: np.ndarray
    class_prob: np.ndarray
    loglik: np.ndarray
    n_significant: np.ndarray
    norm_correction: np.ndarray
    half_set: np.ndarray
    class_ess: np.ndarray
    averages: np.ndarray
    class_sizes: np.ndarray
    class_distribution: np.ndarray
    resolution_A: np.ndarray
    accuracy_rot_deg: np.ndarray
    accuracy_trans_A: np.ndarray
    prior_offset_px: np.ndarray
    shell_resolution_A: np.ndarray
    frc: np.ndarray
    ssnr: np.ndarray
    sigma2_ref: np.ndarray
    tau2: np.ndarray
    sigma2_noise: np.ndarray
    optics_groups: np.ndarray
    iteration: int
    n_iterations: int
    work_box: int
    work_psize: float
    current_resolution_A: float
    loglik_total: float
    avg_pmax: float
    sigma_offsets_A: float
    cap: int | None
    params: dict[str, Any]
    device: str
    timings: dict[str, Any] = field(default_factory=dict)
    scale: np.ndarray | None = None  # float32 (N,) per-particle scale; 1 when not estimated
    history: list[dict[str, Any]] = field(default_factory=list)
    group_scale: np.ndarray = field(default_factory=lambda: np.ones(0, np.float32))
    post_class: np.ndarray | None = None
    post_prob: np.ndarray | None = None
    post_loglik: np.ndarray | None = None
    image_pow: np.ndarray | None = None
    cross_cor: np.ndarray | None = None
    slice_pow: np.ndarray | None = None
    loglik_gain: np.ndarray | None = None
    lowres_power: np.ndarray | None = None  # float32 (N,), companion.select.lowres_power
    # --subclassify (companion/subclassify.py): int64 (K,) 0-based main-run class of each
    # class (itself for a class that was not split); ``lineage`` the split's record
    parent_class: np.ndarray | None = None
    lineage: dict[str, Any] | None = None
    # --stability R (companion/stability.py): float32 (N,) fraction of the other runs in which
    # the particle landed in the matching class; float32 (K,) its class's mean
    stability: np.ndarray | None = None
    class_stability: np.ndarray | None = None
    stability_info: dict[str, Any] | None = None

    def take(self, idx: Any) -> ClassResult:
        """The result for the particles ``idx`` (indices or a bool mask, in the new order):
        every per-particle field subset, ``class_sizes`` recounted; per-class fields kept."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        fields = {
            name: np.asarray(getattr(self, name))[idx]
            for name in PER_PARTICLE
            if getattr(self, name) is not None
        }
        labels = np.asarray(fields["class_id"], dtype=np.int64)
        sizes = np.bincount(labels[labels >= 0], minlength=self.n_classes).astype(np.int64)
        return replace(self, class_sizes=sizes, **fields)

    @property
    def n_posteriors(self) -> int:
        """How many class posteriors per particle the result carries (--posteriors)."""
        return 0 if self.post_prob is None else int(np.asarray(self.post_prob).shape[1])

    @property
    def n_classes(self) -> int:
        return int(self.averages.shape[0])

    @property
    def n_particles(self) -> int:
        return int(self.class_id.shape[0])
