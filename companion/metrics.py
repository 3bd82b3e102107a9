"""Quality of a classification against known truth: pure functions on label arrays.

Everything here is NumPy on the host; labels are integer (or any hashable) arrays of
length N. Definitions follow scikit-learn where one exists (NMI with the arithmetic-mean
normaliser, the Hubert-Arabie ARI) without depending on it.

Junk: a class is *junk-majority* when more than half of its particles are junk; the rest
are *good* classes. Junk recall = junk particles in junk-majority classes / all junk; junk
in good classes = junk particles inside good classes / all particles in good classes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def contingency(a: Any, b: Any) -> np.ndarray:
    """Counts ``n[i, j]`` of particles with the i-th distinct value of ``a`` and j-th of ``b``."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in length: {a.shape[0]} vs {b.shape[0]}")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    na = int(ia.max()) + 1 if ia.size else 0
    nb = int(ib.max()) + 1 if ib.size else 0
    flat = np.bincount(ia.ravel() * nb + ib.ravel(), minlength=na * nb)
    return flat.reshape(na, nb).astype(np.int64)


def _entropy(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_information(a: Any, b: Any) -> float:
    """Mutual information of two labelings (natural log)."""
    c = contingency(a, b).astype(np.float64)
    n = c.sum()
    if n == 0:
        return 0.0
    pi = c.sum(axis=1, keepdims=True) / n
    pj = c.sum(axis=0, keepdims=True) / n
    nz = c > 0
    pij = c / n
    mi = (pij[nz] * np.log(pij[nz] / (pi @ pj)[nz])).sum()
    return float(max(mi, 0.0))


def nmi(a: Any, b: Any) -> float:
    """Normalised mutual information, MI / mean(H(a), H(b)) (scikit-learn's default)."""
    c = contingency(a, b)
    if c.shape[0] == c.shape[1] and c.shape[0] <= 1:
        return 1.0  # both labelings put everything in one group (or are empty)
    mi = mutual_information(a, b)
    norm = 0.5 * (_entropy(c.sum(axis=1)) + _entropy(c.sum(axis=0)))
    if mi == 0.0 or norm == 0.0:
        return 0.0
    return float(min(mi / norm, 1.0))


def _comb2(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float((x * (x - 1.0) / 2.0).sum())


def ari(a: Any, b: Any) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985), 1 for identical partitions."""
    c = contingency(a, b)
    n = int(c.sum())
    if n < 2:
        return 1.0
    index = _comb2(c.ravel())
    sa, sb = _comb2(c.sum(axis=1)), _comb2(c.sum(axis=0))
    expected = sa * sb / (n * (n - 1) / 2.0)
    maximum = 0.5 * (sa + sb)
    if maximum == expected:
        return 1.0  # degenerate: both all-in-one or both all-singletons
    return float((index - expected) / (maximum - expected))


def class_sizes(labels: Any, n_classes: int | None = None) -> np.ndarray:
    """Particles per class for 0-based integer labels (length ``n_classes``)."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    k = n_classes if n_classes is not None else (int(labels.max()) + 1 if labels.size else 0)
    return np.bincount(labels, minlength=k).astype(np.int64)


def junk_classes(labels: Any, is_junk: Any, n_classes: int | None = None) -> np.ndarray:
    """bool[K]: classes where more than half of the particles are junk."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    is_junk = np.asarray(is_junk, dtype=bool).ravel()
    sizes = class_sizes(labels, n_classes)
    junk = np.bincount(labels[is_junk], minlength=sizes.size)
    return junk * 2 > sizes


def junk_recall(labels: Any, is_junk: Any, n_classes: int | None = None) -> float:
    """Junk particles in junk-majority classes / all junk particles (nan without junk)."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    is_junk = np.asarray(is_junk, dtype=bool).ravel()
    total = int(is_junk.sum())
    if total == 0:
        return float("nan")
    jc = junk_classes(labels, is_junk, n_classes)
    return float(jc[labels[is_junk]].sum() / total)


def junk_in_good_classes(labels: Any, is_junk: Any, n_classes: int | None = None) -> float:
    """Fraction of the particles in good (not junk-majority) classes that are junk."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    is_junk = np.asarray(is_junk, dtype=bool).ravel()
    good = ~junk_classes(labels, is_junk, n_classes)[labels]
    n_good = int(good.sum())
    if n_good == 0:
        return float("nan")
    return float((good & is_junk).sum() / n_good)


def small_classes(labels: Any, n_classes: int, fraction: float = 0.1) -> int:
    """Number of classes holding fewer than ``fraction`` × the mean class size (N / K)."""
    sizes = class_sizes(labels, n_classes)
    mean = sizes.sum() / n_classes
    return int((sizes < fraction * mean).sum())


def largest_class_fraction(labels: Any, n_classes: int | None = None) -> float:
    """Size of the largest class / N."""
    sizes = class_sizes(labels, n_classes)
    total = int(sizes.sum())
    return float(sizes.max() / total) if total else float("nan")


def purity(labels: Any, truth: Any, mask: Any = None) -> float:
    """Σ_k (count of class k's most common true value) / N, over particles in ``mask``.

    With ``truth`` the flexible-domain state and ``mask`` excluding junk this is the state
    purity: 1 when every class holds one state only.
    """
    labels, truth = np.asarray(labels).ravel(), np.asarray(truth).ravel()
    if mask is not None:
        mask = np.asarray(mask, dtype=bool).ravel()
        labels, truth = labels[mask], truth[mask]
    if labels.size == 0:
        return float("nan")
    c = contingency(labels, truth)
    return float(c.max(axis=1).sum() / labels.size)


def majority(labels: Any, truth: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: index into ``np.unique(truth)`` of its most common true value, and that
    value's share of the class (-1 and 0 for empty classes)."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    _, t = np.unique(np.asarray(truth).ravel(), return_inverse=True)
    nt = int(t.max()) + 1 if t.size else 0
    c = np.bincount(labels * nt + t.ravel(), minlength=n_classes * nt).reshape(n_classes, nt)
    sizes = c.sum(axis=1)
    best = np.where(sizes > 0, c.argmax(axis=1), -1) if nt else np.full(n_classes, -1)
    share = np.where(sizes > 0, c.max(axis=1) / np.maximum(sizes, 1), 0.0) if nt else 0.0 * sizes
    return best.astype(np.int64), np.asarray(share, dtype=np.float64)


def classes_per_value(labels: Any, truth: Any, n_classes: int, mask: Any = None) -> dict:
    """For each true value (e.g. a flexible-domain state): how many classes it is the
    majority of. Balanced classification should spread states over more classes."""
    labels, truth = np.asarray(labels).ravel(), np.asarray(truth).ravel()
    if mask is not None:
        mask = np.asarray(mask, dtype=bool).ravel()
        labels, truth = labels[mask], truth[mask]
    values = np.unique(truth)
    best, _ = majority(labels, truth, n_classes)
    return {_py(v): int((best == i).sum()) for i, v in enumerate(values)}


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random ``pos`` value > a random ``neg`` one), ties half (Mann-Whitney)."""
    from scipy.stats import rankdata

    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if not pos.size or not neg.size:
        return math.nan
    r = rankdata(np.concatenate([pos, neg]))
    return float((r[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


# ---------------------------------------------------------------- image similarity


def _rotate_stack(img: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """``img`` rotated counter-clockwise about (box//2, box//2), bilinear, one per angle."""
    box = img.shape[0]
    c = box // 2
    y, x = np.mgrid[0:box, 0:box].astype(np.float64)
    x, y = x - c, y - c
    th = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))[:, None, None]
    cos, sin = np.cos(th), np.sin(th)
    # inverse map: output pixel (x, y) samples the input at R(-theta)(x, y)
    xs = cos * x + sin * y + c
    ys = -sin * x + cos * y + c
    x0, y0 = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    fx, fy = xs - x0, ys - y0
    out = np.zeros(xs.shape, dtype=np.float64)
    corners = ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy))
    for dx, dy, w in (*corners, (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < box) & (yi >= 0) & (yi < box)
        out += np.where(ok, img[np.clip(yi, 0, box - 1), np.clip(xi, 0, box - 1)], 0.0) * w
    return out


def _lowpass(img: np.ndarray, psize: float, resolution_A: float) -> np.ndarray:
    box = img.shape[-1]
    fy = np.fft.fftfreq(box, d=psize)[:, None]
    fx = np.fft.rfftfreq(box, d=psize)[None, :]
    k = np.sqrt(fx**2 + fy**2)
    kc = 1.0 / resolution_A
    edge = 0.1 * kc
    w = np.clip((kc + edge - k) / (2 * edge), 0.0, 1.0)
    w = 0.5 - 0.5 * np.cos(np.pi * w)
    return np.fft.irfft2(np.fft.rfft2(img) * w, s=img.shape[-2:])


def best_correlation(
    average: Any,
    reference: Any,
    *,
    psi_step: float = 2.0,
    max_shift: int | None = None,
    mask_radius: float | None = None,
    psize: float | None = None,
    lowpass_A: float | None = None,
) -> float:
    """Largest Pearson correlation of ``average`` with ``reference`` over in-plane rotations
    (every ``psi_step`` degrees) and integer shifts up to ``max_shift`` pixels (default box/4)
    of the reference, both inside a circle of ``mask_radius`` pixels (default box/2).

    With ``psize`` and ``lowpass_A`` the reference is first low-pass filtered to that
    resolution (a fair target for an average limited to it).
    """
    a = np.asarray(average, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if a.shape != ref.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"need two square images of one size, got {a.shape} and {ref.shape}")
    box = a.shape[0]
    if lowpass_A is not None and psize is not None:
        ref = _lowpass(ref, psize, lowpass_A)
    max_shift = box // 4 if max_shift is None else int(max_shift)
    radius = box / 2 if mask_radius is None else float(mask_radius)
    yy, xx = np.mgrid[0:box, 0:box] - box // 2
    mask = (xx**2 + yy**2) <= radius**2
    refs = _rotate_stack(ref, np.arange(0.0, 360.0, psi_step))
    # correlations over circular shifts via FFT; masked, zero-mean, unit-norm images
    a = np.where(mask, a - a[mask].mean(), 0.0)
    na = np.linalg.norm(a)
    if na == 0:
        return 0.0
    fa = np.fft.rfft2(a / na)
    best = -1.0
    for chunk in np.array_split(refs, max(1, len(refs) // 32)):
        m = chunk * mask
        cnt = mask.sum()
        m = np.where(mask, m - (m.sum(axis=(1, 2)) / cnt)[:, None, None], 0.0)
        nm = np.linalg.norm(m.reshape(len(m), -1), axis=1)
        nm[nm == 0] = np.inf
        cc = np.fft.irfft2(fa[None] * np.conj(np.fft.rfft2(m)), s=(box, box))
        cc /= nm[:, None, None]
        # cc[:, dy, dx] = Σ a(x) m(x - d): keep |d| ≤ max_shift
        s = np.r_[0 : max_shift + 1, box - max_shift : box] if max_shift > 0 else np.r_[0:1]
        best = max(best, float(cc[:, s][:, :, s].max()))
    return best
