"""Per-particle terms of an E-step in the hosts' sense (NumPy/CuPy, no per-particle loops).

- ``rlnLogLikeliContribution`` (RELION's ``dLL``, ml_optimiser.cpp ``storeWeightedSums``):
  ``log Σ_samples prior · exp(−diff2) − Σ_f log(2π σ²_f)`` with ``diff2 = Σ_f |X − C·A|² /
  (2σ²_f)`` over the Fourier coefficients the E-step used (origin excluded) and σ² in
  RELION's normalisation (forward FFT / pixel count). Companion's pose prior is uniform over
  its grid, so the sum over poses is a mean; in ``--pose-mode max`` it is the best pose of
  each class (what that mode scores), an upper bound of the pose average.
- ``rlnNrOfSignificantSamples``: RELION sorts a particle's (class, pose) weights and counts
  the largest ones until their sum exceeds ``adaptive_fraction`` (0.999) of the total. Here
  the samples are the ones companion's posterior has: (class, pose) in marginal mode (the
  fine windows of the fast search), classes in max mode (one pose per class).
- Per-class log-likelihoods ``log p(X | k)`` (the same normalisation, without the class
  prior) for the top-n posteriors (``--posteriors``).
"""

from __future__ import annotations

from typing import Any

from companion.classify.backend import get_array_module

TWO_PI = 6.283185307179586
BISECTIONS = 24  # threshold halvings (log domain, range 80): relative resolution 5e-6


def data_terms(x: Any, v: Any, is2: Any, work_box: int) -> tuple[Any, Any]:
    """``(½ Σ |x|²/(v σ²), Σ log(2π v σ²_RELION))`` per particle over the given coefficients
    (``is2 = 1/σ²`` in companion's orthonormal FFT; σ²_RELION = σ² / work_box²)."""
    xp = get_array_module(x)
    data = 0.5 * ((x.real * x.real + x.imag * x.imag) * is2 / v).sum(axis=1)
    lognorm = xp.log((TWO_PI / float(work_box) ** 2) * v / is2).sum(axis=1)
    return data, lognorm


def significant_rows(w: Any, fraction: float) -> Any:
    """int (B,): how many of the largest entries of each row of ``w`` (B, M) ≥ 0 it takes
    for their sum to exceed ``fraction`` of the row's sum (RELION's count; at least 1)."""
    xp = get_array_module(w)
    s = -xp.sort(-w, axis=1)
    c = xp.cumsum(s, axis=1)
    count = (c <= fraction * c[:, -1:]).sum(axis=1) + 1
    return xp.minimum(count, w.shape[1])


def _bisect(total: Any, mass_above: Any, fraction: float) -> Any:
    """The largest threshold t (per row) with mass_above(t) > fraction · total, by bisection
    in the log domain between total (no sample is above it) and exp(-80) · total."""
    xp = get_array_module(total)
    target = fraction * total
    hi = xp.log(xp.maximum(total, 1e-38)) + 1e-4
    lo = hi - 80.0
    for _ in range(BISECTIONS):
        mid = 0.5 * (lo + hi)
        good = mass_above(xp.exp(mid)) > target
        lo = xp.where(good, mid, lo)
        hi = xp.where(good, hi, mid)
    return xp.exp(lo)


def significant_dense(w: Any, post: Any, fraction: float) -> Any:
    """:func:`significant_rows` over (class, pose) of the joint posterior ``post[b, k] ·
    w[b, t, k, r]`` (exhaustive marginal search; ``w`` normalised within each class)."""
    joint = w * post[:, None, :, None]
    axes = (1, 2, 3)
    total = joint.sum(axis=axes)

    def mass(t: Any) -> Any:
        tt = t[:, None, None, None]
        return (joint * (joint >= tt)).sum(axis=axes)

    t = _bisect(total, mass, fraction)
    return (joint >= t[:, None, None, None]).sum(axis=axes)


def significant_pairs(w: Any, post_pairs: Any, pb: Any, b: int, fraction: float) -> Any:
    """The same for the fast search's fine windows: ``w`` (P, J, D) per (particle, class)
    pair ``pb`` (P,) with the pairs' class posteriors ``post_pairs`` (P,)."""
    xp = get_array_module(w)
    joint = w * post_pairs[:, None, None]

    def per_particle(values: Any) -> Any:
        return xp.bincount(pb, weights=values.astype(xp.float64), minlength=b)

    total = per_particle(joint.sum(axis=(1, 2)))

    def mass(t: Any) -> Any:
        tt = t[pb][:, None, None]
        return per_particle((joint * (joint >= tt)).sum(axis=(1, 2)))

    t = _bisect(total, mass, fraction)
    count = per_particle((joint >= t[pb][:, None, None]).sum(axis=(1, 2)))
    return xp.maximum(xp.rint(count), 1).astype(xp.int64)


def top_classes(post: Any, class_ll: Any, n: int) -> tuple[Any, Any, Any]:
    """The ``n`` most probable classes of each particle, most probable first: (class (B, n),
    posterior (B, n), log-likelihood (B, n)) from ``post`` (B, K) and ``class_ll`` (B, K)."""
    xp = get_array_module(post)
    order = xp.argsort(-post, axis=1)[:, :n]
    return (
        order,
        xp.take_along_axis(post, order, axis=1),
        xp.take_along_axis(class_ll, order, axis=1),
    )
