"""Which classes hold particles: one class score and one ``--select auto`` rule for all hosts.

A class is scored from what separates junk from particles in its average and its members;
``rim``, ``contrast`` and ``sharpness`` are divided by those of the particle-weighted median
class (junk is assumed to be a minority of the particles, so that class is a particle class):

- ``rim``: RMS of the average in the outer ring (60-85% of the half box) over its RMS in the
  inner disc (< 50%). A particle is compact and centred; a gold edge, an off-centre
  contamination blob or an average of noise reaches the rim. Measured on ``companion
  simulate`` data (``companion bench select``): particle classes 0.05-0.12, junk 0.18-1.07.
- ``contrast``: inner-disc RMS. Gold edges and contamination are 3-12x stronger than the
  particles, noise averages 4-15x weaker.
- ``sharpness``: mean class posterior over the members. Particle classes 0.93-0.98; pure-noise
  classes 0.52-0.84 (the members could as well be elsewhere).
- ``size``: class size over the mean class size (below 10% of the mean: too small to trust).

The score is the product of one soft step per feature (each in [0, 1], 0.5 at its threshold),
so any single junk trait pulls a class down. ``select_auto`` keeps the non-empty classes
scoring at least ``SELECT_THRESHOLD``; hosts only convert class numbers (RELION 1-based,
CryoSPARC 0-based).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SELECT_THRESHOLD = 0.5
# each term is 0.5 at its threshold; rim, contrast and sharpness are relative to the
# particle-weighted median class
RIM_MAX = 1.8
CONTRAST_MAX_LOG = float(np.log(2.0))  # |log contrast|
SHARPNESS_MIN = 0.9
SIZE_MIN = 0.1  # fraction of the mean class size


@dataclass
class ClassFeatures:
    """Per-class features behind the score (all float64, length K; NaN for empty classes)."""

    rim: np.ndarray
    contrast: np.ndarray
    sharpness: np.ndarray
    size: np.ndarray

    def as_dict(self) -> dict[str, list[float]]:
        return {k: getattr(self, k).tolist() for k in ("rim", "contrast", "sharpness", "size")}


def _ring_rms(averages: np.ndarray, lo: float, hi: float) -> np.ndarray:
    box = averages.shape[-1]
    c = np.arange(box) - box // 2
    r = np.hypot(c[None, :], c[:, None]) / (box / 2)
    sel = (r >= lo) & (r < hi)
    return np.sqrt(np.mean(averages[:, sel].astype(np.float64) ** 2, axis=1))


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    ok = np.isfinite(values) & (weights > 0)
    if not ok.any():
        return 1.0
    order = np.argsort(values[ok])
    cum = np.cumsum(weights[ok][order])
    return float(values[ok][order][np.searchsorted(cum, 0.5 * cum[-1])])


def class_features(result: Any) -> ClassFeatures:
    """The features of :func:`class_scores` for a ClassResult (see the module doc)."""
    k = result.n_classes
    sizes = np.asarray(result.class_sizes, dtype=np.float64)
    labels = np.asarray(result.class_id, dtype=np.int64)
    seen = labels >= 0
    avg = np.asarray(result.averages)
    inner = _ring_rms(avg, 0.0, 0.5)
    rim = _ring_rms(avg, 0.6, 0.85) / np.maximum(inner, 1e-30)
    occupied = sizes > 0
    nan = np.where(occupied, 1.0, np.nan)
    psum = np.bincount(labels[seen], weights=np.asarray(result.class_prob)[seen], minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        sharp = psum / np.bincount(labels[seen], minlength=k) * nan

    def rel(x: np.ndarray) -> np.ndarray:
        return x * nan / max(_weighted_median(x * nan, sizes), 1e-30)

    size = sizes / max(sizes.sum() / max(k, 1), 1e-30)
    return ClassFeatures(rel(rim), rel(inner), rel(sharp), size)


def _step(x: np.ndarray, at: float, width: float) -> np.ndarray:
    """Soft step 1 → 0 as ``x`` rises through ``at`` (0.5 there)."""
    z = np.clip((np.asarray(x, dtype=np.float64) - at) / width, -50, 50)
    return 1.0 / (1.0 + np.exp(z))


def class_scores(result: Any) -> np.ndarray:
    """float32 (K,): how particle-like each class is, in [0, 1] (0 for empty classes);
    written as rlnClassScore (RELION 4's class ranker's label, also in [0, 1])."""
    f = class_features(result)
    s = (
        _step(f.rim, RIM_MAX, 0.15)
        * _step(np.abs(np.log(np.maximum(f.contrast, 1e-30))), CONTRAST_MAX_LOG, 0.1)
        * _step(-f.sharpness, -SHARPNESS_MIN, 0.02)
        * _step(-f.size, -SIZE_MIN, 0.02)
    )
    return np.nan_to_num(s, nan=0.0).astype(np.float32)


def select_auto(result: Any, threshold: float = SELECT_THRESHOLD) -> np.ndarray:
    """bool (K,): the classes ``--select auto`` keeps (non-empty, score ≥ ``threshold``)."""
    return (class_scores(result) >= threshold) & (np.asarray(result.class_sizes) > 0)


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


def selected_classes(result: Any, spec: str, *, base: int, option: str = "--select") -> np.ndarray:
    """bool (K,) for ``--select auto|LIST`` (LIST ``base``-based)."""
    if spec.strip().lower() == "auto":
        return select_auto(result)
    keep = np.zeros(result.n_classes, dtype=bool)
    keep[parse_class_list(spec, result.n_classes, base=base, option=option)] = True
    return keep
