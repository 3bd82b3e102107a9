"""Which classes hold particles: one class score and one ``--select auto`` rule for all hosts.

A class is judged by its members. Two per-particle features (below) are computed for every
image; the per-particle stage (robust outliers within each class) is applied to every
occupied class, and the class features are the medians over the members left, minus those of
the particle-weighted median class (junk is assumed to be a minority of the particles, so
that class is a particle class):

- ``lowres_power`` (class median, high side): gold edges and contamination put 3-30x the
  particles' low-resolution power into every member. Measured (``companion bench
  select``, 6 seeds, white and coloured noise): particle classes of ≥ 10 members within
  ±0.08 of the median class, junk classes 0.93-2.80 above it; junk above ``LOWRES_MAX``.
- ``loglik_gain`` (class median, low side): members of a pure-noise class are explained by
  their class hardly better than by noise alone. Particle classes of ≥ 10 members ≥ -0.63
  (log nats) from the median class, pure-noise classes ≤ -2.13; junk below
  ``-GAIN_DROP_MAX``.
- ``size``: members left over the mean class size (below ``SIZE_MIN``: too small to trust).

The score is the product of one soft step per feature (each in [0, 1], 0.5 at its
threshold), so any one junk trait pulls a class down. Outputs written before companion wrote
both per-particle features are scored from their averages instead (``rim``, ``contrast``,
``sharpness`` relative to the median class; :func:`class_features`); that rule was dropped
because it dropped particle classes with blurred averages (README, 'Class scores').
``select_auto`` keeps the non-empty classes scoring at least ``SELECT_THRESHOLD``; hosts only
convert class numbers (RELION 1-based, CryoSPARC 0-based).

Junk that the classifier put into a particle class (a particle next to a gold edge, a
contamination blob, pure noise) cannot be removed by any choice of whole classes, so
:func:`select_particles` — what every host's ``--select auto`` writes — leaves out, within
each kept class of at least ``MIN_MEMBERS`` particles, the members that are outliers (robust
z beyond ``PARTICLE_Z_MAX``: median and 1.4826 × MAD over the class's members) by either of

- ``lowres_power`` (high side): log of the image's low-resolution power (shells 1 up to
  ``LOWRES_A`` Å), each shell divided by that shell's median over the particle's micrograph group
  (all particles for groups under ``MIN_GROUP``), so that coloured noise is whitened.
  Rotation- and shift-invariant: no alignment needed. Particles of one class spread by
  ±0.2-0.5 in log.
- ``loglik_gain`` (low side): log of ``ClassResult.loglik_gain`` (floored at
  ``GAIN_FLOOR`` nats), the log-likelihood over that of the empty model — how much better
  the image is explained by the classes than by noise alone. Particles of a class: 20-70
  nats (box 64, SNR 0.08, white noise), pure noise 2-8; the log makes the spread (defocus,
  SNR) a ratio. On coloured noise (half of it CTF-modulated ice) the two overlap (~14 vs
  ~10 nats) and pure noise inside a particle class is not found per particle (README).

A ``--select`` LIST keeps its classes whole (the user chose them).

Every output carries both features per particle (``loglik_gain`` as the gain in nats,
``lowres_power`` as above; float32), so ``companion select --classes auto`` on a finished
output (:mod:`companion.pick`) keeps exactly the particles ``--select auto`` kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SELECT_THRESHOLD = 0.5
# each term is 0.5 at its threshold; all are relative to the particle-weighted median class
LOWRES_MAX = 0.5  # class median lowres_power above the median class's (log)
GAIN_DROP_MAX = 1.0  # class median log loglik_gain below the median class's
# the rule for outputs without per-particle features (class averages)
RIM_MAX = 1.8
CONTRAST_MAX_LOG = float(np.log(2.0))  # |log contrast|
SHARPNESS_MIN = 0.9
SIZE_MIN = 0.1  # fraction of the mean class size
# the per-particle stage of select_particles
PARTICLE_Z_MAX = 3.5  # robust z beyond which a particle of a kept class is left out
MIN_MEMBERS = 20  # smaller classes are kept whole (too few members for a median and a MAD)
LOWRES_A = 20.0  # lowres_power: shells from 1 up to this resolution (Å)
MAD_SD = 1.4826  # MAD → standard deviation for a normal distribution
MIN_GROUP = 50  # lowres_power: smaller groups use the reference of all particles
GAIN_FLOOR = 1.0  # loglik_gain (nats) below which an image holds no evidence of a particle


@dataclass
class ClassFeatures:
    """Per-class features behind the score (float64, length K; NaN for empty classes, whose
    ``size`` is 0, and where a feature is not available: ``rim``, ``contrast``,
    ``sharpness`` without averages or posteriors, ``lowres_power``, ``loglik_gain`` without
    the per-particle features)."""

    NAMES = ("lowres_power", "loglik_gain", "size", "rim", "contrast", "sharpness")

    lowres_power: np.ndarray
    loglik_gain: np.ndarray
    size: np.ndarray
    rim: np.ndarray
    contrast: np.ndarray
    sharpness: np.ndarray

    @property
    def by_members(self) -> bool:
        """Whether the classes are scored from their members (both features present)."""
        return bool(np.isfinite(self.lowres_power).any() and np.isfinite(self.loglik_gain).any())

    def as_dict(self) -> dict[str, list[float]]:
        return {k: getattr(self, k).tolist() for k in self.NAMES}


def _ring_rms(averages: np.ndarray, lo: float, hi: float) -> np.ndarray:
    box = averages.shape[-1]
    c = np.arange(box) - box // 2
    r = np.hypot(c[None, :], c[:, None]) / (box / 2)
    sel = (r >= lo) & (r < hi)
    return np.sqrt(np.mean(averages[:, sel].astype(np.float64) ** 2, axis=1))


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    ok = np.isfinite(values) & (weights > 0)
    if not ok.any():
        return float("nan")
    order = np.argsort(values[ok])
    cum = np.cumsum(weights[ok][order])
    return float(values[ok][order][np.searchsorted(cum, 0.5 * cum[-1])])


def class_medians(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class (K,): the median of the finite ``x`` of its members (NaN where none) and
    their count; ``labels`` -1 is no class. One sort for all classes (np.median's values)."""
    x = np.asarray(x, np.float64)
    labels = np.asarray(labels, np.int64)
    ok = np.isfinite(x) & (labels >= 0) & (labels < k)
    xs, ls = x[ok], labels[ok]
    order = np.lexsort((xs, ls))
    xs = xs[order]
    count = np.bincount(ls, minlength=k)
    start = np.concatenate(([0], np.cumsum(count)[:-1]))
    med = np.full(k, np.nan)
    has = count > 0
    lo = xs[(start + (count - 1) // 2)[has]]
    hi = xs[(start + count // 2)[has]]
    med[has] = (lo + hi) / 2
    return med, count


def _average_features(result: Any, sizes: np.ndarray) -> tuple[np.ndarray, ...]:
    """rim, contrast, sharpness (absolute; NaN where averages or posteriors are missing)."""
    k = sizes.size
    nan = np.full(k, np.nan)
    avg = getattr(result, "averages", None)
    if avg is None:
        rim = inner = nan
    else:
        avg = np.asarray(avg)
        inner = _ring_rms(avg, 0.0, 0.5)
        rim = _ring_rms(avg, 0.6, 0.85) / np.maximum(inner, 1e-30)
    prob = getattr(result, "class_prob", None)
    if prob is None:
        return rim, inner, nan
    labels = np.asarray(result.class_id, np.int64)
    seen = labels >= 0
    psum = np.bincount(labels[seen], weights=np.asarray(prob, np.float64)[seen], minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        sharp = psum / np.bincount(labels[seen], minlength=k)
    return rim, inner, sharp


def class_features(result: Any, features: ParticleFeatures | None = None) -> ClassFeatures:
    """The features of :func:`class_scores` for a ClassResult or a ``companion select``
    view (see the module doc); ``features``: :func:`particle_features` of ``result`` when
    already computed."""
    k = result.n_classes
    sizes = np.asarray(result.class_sizes, dtype=np.float64)
    labels = np.asarray(result.class_id, dtype=np.int64)
    occupied = sizes > 0
    f = particle_features(result) if features is None else features
    left = labels.copy()
    left[particle_outliers(result, occupied, f)] = -1  # the stage --select auto applies
    counts = np.bincount(left[left >= 0], minlength=k).astype(np.float64)

    def rel(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
        x = np.where(occupied, x, np.nan)
        return x - _weighted_median(x, weights)

    lp = rel(class_medians(f.lowres_power, left, k)[0], counts)
    gain = rel(class_medians(f.loglik_gain, left, k)[0], counts)
    size = counts / max(sizes.sum() / max(k, 1), 1e-30)
    rim, inner, sharp = _average_features(result, sizes)

    def ratio(x: np.ndarray) -> np.ndarray:
        x = np.where(occupied, x, np.nan)
        return x / max(_weighted_median(x, sizes), 1e-30)

    return ClassFeatures(lp, gain, size, ratio(rim), ratio(inner), ratio(sharp))


def _step(x: np.ndarray, at: float, width: float) -> np.ndarray:
    """Soft step 1 → 0 as ``x`` rises through ``at`` (0.5 there)."""
    z = np.clip((np.asarray(x, dtype=np.float64) - at) / width, -50, 50)
    return 1.0 / (1.0 + np.exp(z))


def class_scores(result: Any, features: ParticleFeatures | None = None) -> np.ndarray:
    """float32 (K,): how particle-like each class is, in [0, 1] (0 for empty classes);
    written as rlnClassScore (RELION 4's class ranker's label, also in [0, 1])."""
    return scores_from_features(class_features(result, features))


def scores_from_features(f: ClassFeatures) -> np.ndarray:
    """:func:`class_scores` from the class features (when they are needed too)."""
    s = _step(-f.size, -SIZE_MIN, 0.02)
    if f.by_members:
        s = s * _step(f.lowres_power, LOWRES_MAX, 0.05) * _step(-f.loglik_gain, GAIN_DROP_MAX, 0.1)
    else:
        s = (
            s
            * _step(f.rim, RIM_MAX, 0.15)
            * _step(np.abs(np.log(np.maximum(f.contrast, 1e-30))), CONTRAST_MAX_LOG, 0.1)
            * _step(-f.sharpness, -SHARPNESS_MIN, 0.02)
        )
    return np.nan_to_num(s, nan=0.0).astype(np.float32)


def select_auto(
    result: Any, threshold: float = SELECT_THRESHOLD, features: ParticleFeatures | None = None
) -> np.ndarray:
    """bool (K,): the classes ``--select auto`` keeps (non-empty, score ≥ ``threshold``)."""
    return (class_scores(result, features) >= threshold) & (np.asarray(result.class_sizes) > 0)


def parse_class_list(
    spec: str, n_classes: int, *, base: int, option: str = "--select"
) -> list[int]:
    """Class indices (0-based, sorted) from ``"1,4,7-9"`` / ``"1 4 7"`` written ``base``-based
    (RELION 1, CryoSPARC 0). Raises ParameterError naming ``option`` on a bad list."""
    from companion.errors import ParameterError

    out: set[int] = set()
    example = "1,4,7-9" if base else "0,3,7-9"
    for part in spec.replace(",", " ").split():
        try:
            a, sep, b = part.partition("-")
            lo = int(a)
            hi = int(b) if sep else lo
        except ValueError:
            raise ParameterError(
                f"{option} {spec!r}: give 'auto' or class numbers like {example}"
            ) from None
        if hi < lo:
            raise ParameterError(f"{option} {spec!r}: range {part} runs backwards")
        out.update(range(lo, hi + 1))
    last = n_classes - 1 + base
    bad = sorted(c for c in out if not base <= c <= last)
    if bad or not out:
        which = f"class {bad[-1]} does not exist" if bad else "no class given"
        raise ParameterError(
            f"{option} {spec!r}: {which} with --n-classes {n_classes} (classes {base} to {last})"
        )
    return sorted(c - base for c in out)


def selected_classes(
    result: Any,
    spec: str,
    *,
    base: int,
    option: str = "--select",
    features: ParticleFeatures | None = None,
) -> np.ndarray:
    """bool (K,) for ``--select auto|LIST`` (LIST ``base``-based)."""
    if spec.strip().lower() == "auto":
        return select_auto(result, features=features)
    keep = np.zeros(result.n_classes, dtype=bool)
    keep[parse_class_list(spec, result.n_classes, base=base, option=option)] = True
    return keep


# ------------------------------------------------------------------ per-particle stage


@dataclass
class ParticleFeatures:
    """Per-particle features of the selection's per-particle stage (float64, length N; NaN
    where not available: no images given, or a result without ``loglik_gain``)."""

    lowres_power: np.ndarray
    loglik_gain: np.ndarray  # log of ClassResult.loglik_gain (floored at GAIN_FLOOR)


@dataclass
class Selection:
    """What ``--select`` keeps: ``classes`` (bool, K), ``particles`` (bool, N: the rows the
    selection files hold) and ``removed`` (int64, K: particles of kept classes that the
    per-particle stage left out; zeros for a LIST)."""

    spec: str
    classes: np.ndarray
    particles: np.ndarray
    removed: np.ndarray

    def report(self) -> dict[str, Any]:
        """The ``selection`` entry of ``summary.json`` (class numbers 1-based)."""
        kept = np.flatnonzero(self.classes)
        return {
            "spec": self.spec,
            "classes": (kept + 1).tolist(),
            "n_particles": int(self.particles.sum()),
            "removed_per_class": {str(int(c) + 1): int(self.removed[c]) for c in kept},
            "removed_total": int(self.removed.sum()),
            "particle_stage": {
                "z_max": PARTICLE_Z_MAX,
                "min_members": MIN_MEMBERS,
                "lowres_A": LOWRES_A,
            },  # fmt: skip
        }


def lowres_power(particles: Any, batch_size: int = 1024, per_group: bool = True) -> np.ndarray:
    """float64 (N,): log of each image's power in shells 1 .. box·psize/``LOWRES_A``, each
    shell divided by its median over the particle's group (micrograph; over all particles
    for groups below ``MIN_GROUP``; see the module doc). Reads the images once,
    ``batch_size`` at a time."""
    n, box = len(particles), int(particles.box)
    s_hi = max(2, int(box * float(np.median(particles.psize)) / LOWRES_A))
    ky = np.fft.fftfreq(box, 1.0 / box)[:, None]
    kx = np.fft.rfftfreq(box, 1.0 / box)[None, :]
    shell = np.rint(np.hypot(kx, ky)).astype(np.int64)
    inside = (shell >= 1) & (shell <= s_hi)
    # rfft half plane: columns 1..box/2-1 stand for two coefficients each
    weight = np.broadcast_to(np.where((kx == 0) | (kx == box // 2), 1.0, 2.0), shell.shape)
    onehot = np.zeros((int(inside.sum()), s_hi), np.float64)
    onehot[np.arange(onehot.shape[0]), shell[inside] - 1] = weight[inside]
    onehot /= onehot.sum(axis=0, keepdims=True)
    power = np.empty((n, s_hi), np.float64)
    for idx, imgs in particles.iter_batches(batch_size):
        f = np.fft.rfft2(imgs)[:, inside]
        power[idx] = (f.real**2 + f.imag**2) @ onehot
    ref = np.broadcast_to(np.median(power, axis=0), power.shape).copy()
    if per_group:  # ice and CTF (so the ice noise) differ per micrograph: a reference each
        group = np.asarray(particles.group, np.int64)
        order = np.argsort(group, kind="stable")  # each group's rows once: O(N log N), not N·G
        starts = np.flatnonzero(np.r_[True, np.diff(group[order]) != 0])
        for rows in np.split(order, starts[1:]):
            if len(rows) >= MIN_GROUP:
                ref[rows] = np.median(power[rows], axis=0)
    return np.log(np.maximum((power / np.maximum(ref, 1e-30)).mean(axis=1), 1e-30))


def with_particle_features(result: Any, particles: Any) -> Any:
    """``result`` with ``lowres_power`` (float32) of ``particles`` set, so that the outputs
    carry both per-particle features and ``companion select --classes auto`` applies the
    per-particle stage offline as the run did (one more read of the images)."""
    from dataclasses import replace

    if getattr(result, "lowres_power", None) is not None:
        return result
    return replace(result, lowres_power=lowres_power(particles).astype(np.float32))


def _as_written(x: Any) -> np.ndarray:
    """float64 of the float32 value the outputs hold (a STAR column read back as float64 and
    a .cs field give the same numbers as the result in memory)."""
    return np.asarray(x, np.float64).astype(np.float32).astype(np.float64)


def particle_features(result: Any, particles: Any = None) -> ParticleFeatures:
    """The per-particle features of :func:`select_particles`, from ``result.lowres_power``
    and ``result.loglik_gain`` (a ClassResult, or a ``companion select`` view of the written
    columns); ``lowres_power`` from ``particles`` (the classified ParticleSet) when the
    result has none; NaN where neither is there. Both at float32, as written."""
    n = result.n_particles
    lp = getattr(result, "lowres_power", None)
    if lp is None and particles is not None:
        lp = lowres_power(particles)
    lp = np.full(n, np.nan) if lp is None else _as_written(lp)
    gain = getattr(result, "loglik_gain", None)
    if gain is None:
        g = np.full(n, np.nan)
    else:  # log: the gain scales with ‖CTF·A‖²/σ², which varies with defocus and SNR
        g = np.log(np.maximum(_as_written(gain), GAIN_FLOOR))
    return ParticleFeatures(lp, g)


def robust_z(x: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """float64 (N,): ``(x - median) / (1.4826 MAD)`` over the members of each class in
    ``classes`` (bool, K) with at least ``MIN_MEMBERS`` finite values; 0 elsewhere."""
    x = np.asarray(x, np.float64)
    labels = np.asarray(labels, np.int64)
    k = classes.size
    med, count = class_medians(x, labels, k)
    own = np.zeros(labels.shape, np.intp)  # each particle's class (0 for none: masked below)
    ok = (labels >= 0) & (labels < k)
    own[ok] = labels[ok]
    with np.errstate(invalid="ignore"):
        dev = np.abs(x - med[own])
    mad = MAD_SD * class_medians(np.where(ok, dev, np.nan), labels, k)[0]
    judged = classes & (count >= MIN_MEMBERS) & (mad > 0)
    use = ok & judged[own] & np.isfinite(x)
    z = np.zeros(x.shape, np.float64)
    z[use] = (x[use] - med[own[use]]) / mad[own[use]]
    return z


def particle_outliers(
    result: Any, classes: np.ndarray, features: ParticleFeatures, z_max: float = PARTICLE_Z_MAX
) -> np.ndarray:
    """bool (N,): members of ``classes`` that the per-particle stage leaves out."""
    labels = np.asarray(result.class_id, np.int64)
    out = robust_z(features.lowres_power, labels, classes) > z_max
    out |= robust_z(features.loglik_gain, labels, classes) < -z_max
    inside = np.zeros(labels.shape, bool)
    ok = labels >= 0
    inside[ok] = classes[labels[ok]]
    return out & inside


def select_particles(
    result: Any,
    spec: str = "auto",
    *,
    particles: Any = None,
    base: int = 1,
    option: str = "--select",
    z_max: float = PARTICLE_Z_MAX,
) -> Selection:
    """What ``--select auto|LIST`` keeps, for every host (RELION ``base`` 1, CryoSPARC 0).

    ``auto``: the classes of :func:`select_auto`, then the per-particle stage (module doc)
    within them, on ``result.lowres_power`` (else computed from ``particles``, the classified
    ParticleSet; without either only ``loglik_gain`` is used). A LIST keeps its classes
    whole. Raises ParameterError naming ``option`` on a bad LIST."""
    labels = np.asarray(result.class_id, np.int64)
    auto = spec.strip().lower() == "auto"
    features = particle_features(result, particles) if auto else None
    classes = selected_classes(result, spec, base=base, option=option, features=features)
    inside = np.zeros(labels.shape, bool)
    ok = labels >= 0
    inside[ok] = classes[labels[ok]]
    removed = np.zeros(result.n_classes, np.int64)
    if auto and classes.any():
        drop = particle_outliers(result, classes, features, z_max)
        inside &= ~drop
        removed = np.bincount(labels[drop], minlength=result.n_classes).astype(np.int64)
    return Selection(spec, classes, inside, removed)
