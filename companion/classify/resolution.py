"""Per-class resolution that does not reward junk.

The FRC 0.143 resolution of a class is measured between the averages of its two random
half-sets of PARTICLES (``ClassResult.half_set``, fixed for the run), each multiplied by
the particle mask (background zero, soft edge), so that power the particle mask excludes — a
gold edge or contamination reaching into the box — does not correlate between the halves
(:func:`masked_frc`). A class is *undetermined* (resolution ``inf``, written as such
to RELION's rlnEstimatedResolution and as null in summary.json) when

- either half-set holds fewer than ``MIN_HALF_PARTICLES`` particles (an FRC of a handful of
  images aligned to the same reference measures the reference, not the data), or
- its posterior is flat: the mean class posterior of its members is below
  ``FLAT_POSTERIOR`` (the particles could as well be in another class — pure noise), or its
  rotational accuracy is worse than ``MAX_ACCURACY_ROT_DEG`` (the orientation of its members
  is not determined).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from companion.classify import fourier as fo
from companion.classify.backend import to_host

MIN_HALF_PARTICLES = 10
FLAT_POSTERIOR = 0.5
MAX_ACCURACY_ROT_DEG = 90.0
FRC_THRESHOLD = 0.143
REG = 0.01  # of the mean CTF² sum, added to it before dividing (CTF zeros)


def _frc(a: Any, b: Any, geom: fo.Geometry) -> np.ndarray:
    out = np.nan_to_num(np.asarray(to_host(fo.frc(a, b, geom)), dtype=np.float64))
    out[:, 0] = 1.0
    return out


def masked_frc(num: Any, den: Any, masked: Callable[[Any], Any],
               geom: fo.Geometry) -> np.ndarray:  # fmt: skip
    """FRC (K, S) of the two half-set averages ``num / den`` (each (2, K, F) kept
    coefficients: CTF-weighted sums and CTF² sums) inside the particle mask (``masked``:
    coefficients → masked working-box images).

    The averages are NOT Wiener-filtered: a filtered half has almost no power left at high
    frequency, so the soft mask edge, shared by both halves, would correlate them up to
    Nyquist (measured: FRC 0.5-0.9 at every shell). ``den`` gets ``REG`` × its mean per
    class added so CTF zeros do not blow up."""
    reg = REG * den.mean(axis=-1, keepdims=True) + 1e-30
    raw = num / (den + reg)
    return _frc(fo.to_kept(masked(raw[0]), geom), fo.to_kept(masked(raw[1]), geom), geom)


def frc_resolution(frc: np.ndarray, geom: fo.Geometry) -> np.ndarray:
    """Resolution (Å, float32 (K,)) of the last shell before the FRC first drops below 0.143
    (inf if that is shell 0; the last shell if it never does)."""
    k, s = frc.shape
    below = frc[:, 1:] < FRC_THRESHOLD
    first = np.where(below.any(axis=1), below.argmax(axis=1), s - 1)
    with np.errstate(divide="ignore"):
        res = np.where(first >= 1, geom.box * geom.psize / np.maximum(first, 1), np.inf)
    return res.astype(np.float32)


def undetermined(class_id: np.ndarray, half: np.ndarray, class_prob: np.ndarray,
                 accuracy_rot_deg: np.ndarray, k: int) -> np.ndarray:  # fmt: skip
    """bool (K,): classes whose resolution cannot be trusted (see the module doc)."""
    seen = class_id >= 0
    lab = class_id[seen].astype(np.int64)
    h = half[seen].astype(np.int64)
    per_half = np.stack([np.bincount(lab[h == i], minlength=k) for i in (0, 1)])
    n = per_half.sum(axis=0)
    psum = np.bincount(lab, weights=class_prob[seen].astype(np.float64), minlength=k)
    sharp = np.where(n > 0, psum / np.maximum(n, 1), 0.0)
    acc = np.asarray(accuracy_rot_deg, dtype=np.float64)
    return (
        (per_half.min(axis=0) < MIN_HALF_PARTICLES)
        | (sharp < FLAT_POSTERIOR)
        | (acc > MAX_ACCURACY_ROT_DEG)
    )


def class_resolution(num: Any, den: Any, masked: Callable[[Any], Any], geom: fo.Geometry,
                     class_id: np.ndarray, half: np.ndarray, class_prob: np.ndarray,
                     accuracy_rot_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(resolution Å (K,), FRC (K, S)) of the half-set sums ``num``/``den`` (2, K, F) inside
    the particle mask (:func:`masked_frc`); inf where undetermined (:func:`undetermined`)."""
    frc = masked_frc(num, den, masked, geom)
    res = frc_resolution(frc, geom)
    bad = undetermined(class_id, half, class_prob, accuracy_rot_deg, frc.shape[0])
    return np.where(bad, np.float32(np.inf), res).astype(np.float32), frc.astype(np.float32)
