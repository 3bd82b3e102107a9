"""A small, self-consistent fake :class:`ClassResult` for testing sinks and reports.

``make_fake_result(n, k, box)`` fills every field of ClassResult with plausible values of the
documented shapes and dtypes: hard labels with every class used when n >= k, psi in
[-180, 180), shifts within ±box/10 px, probabilities in (0, 1], class sizes = bincount of the
labels, averages that differ per class (a Gaussian blob at a class-specific place, protein
white), spectra at the original box. Deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np

from companion.classify.result import ClassResult


def make_fake_result(
    n: int,
    k: int,
    box: int,
    *,
    seed: int = 0,
    psize: float = 1.0,
    optics_groups: tuple[int, ...] = (1,),
    iteration: int = 3,
    cap: int | None = None,
) -> ClassResult:
    """A ClassResult for ``n`` particles and ``k`` classes at box ``box`` (pixel ``psize``)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=n)
    if n >= k:
        labels[rng.permutation(n)[:k]] = np.arange(k)  # every class used at least once
    class_id = labels.astype(np.int32)
    sizes = np.bincount(class_id, minlength=k).astype(np.int64)
    class_prob = rng.uniform(0.3, 1.0, size=n).astype(np.float32)
    max_prob = (class_prob * rng.uniform(0.5, 1.0, size=n)).astype(np.float32)

    yy, xx = np.mgrid[0:box, 0:box].astype(np.float32) - box // 2
    angles = 2 * np.pi * np.arange(k) / max(k, 1)
    radius = box / 6
    sigma = box / 12
    cx = radius * np.cos(angles)[:, None, None]
    cy = radius * np.sin(angles)[:, None, None]
    averages = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)).astype(np.float32)
    averages += 0.5 * np.exp(-(xx**2 + yy**2) / (2 * (2 * sigma) ** 2)).astype(np.float32)

    shells = box // 2 + 1
    s = np.arange(shells, dtype=np.float64)
    with np.errstate(divide="ignore"):
        shell_res = np.where(s > 0, box * psize / np.maximum(s, 1), np.inf).astype(np.float32)
    frc = np.clip(1.0 - s / (0.7 * shells), 0, 1)[None, :].repeat(k, 0).astype(np.float32)
    g = len(optics_groups)
    return ClassResult(
        class_id=class_id,
        psi_deg=rng.uniform(-180, 180, size=n).astype(np.float32),
        shift_px=rng.uniform(-box / 10, box / 10, size=(n, 2)).astype(np.float32),
        max_prob=max_prob,
        class_prob=class_prob,
        loglik=rng.normal(-5000.0, 100.0, size=n).astype(np.float32),
        n_significant=rng.integers(1, 20, size=n).astype(np.int32),
        norm_correction=np.ones(n, dtype=np.float32),
        half_set=rng.integers(0, 2, size=n).astype(np.uint8),
        class_ess=rng.uniform(1.0, 2.0, size=n).astype(np.float32),
        averages=averages,
        class_sizes=sizes,
        class_distribution=(sizes / max(n, 1)).astype(np.float32),
        resolution_A=rng.uniform(2 * psize * 2, 30.0, size=k).astype(np.float32),
        accuracy_rot_deg=np.full(k, 3.0, dtype=np.float32),
        accuracy_trans_A=np.full(k, psize, dtype=np.float32),
        prior_offset_px=np.zeros((k, 2), dtype=np.float32),
        shell_resolution_A=shell_res,
        frc=frc,
        ssnr=(frc / np.maximum(1 - frc, 1e-3)).astype(np.float32),
        sigma2_ref=np.ones((k, shells), dtype=np.float32),
        tau2=np.ones((k, shells), dtype=np.float32),
        sigma2_noise=np.ones((g, shells), dtype=np.float32),
        optics_groups=np.asarray(optics_groups, dtype=np.int32),
        iteration=iteration,
        n_iterations=iteration,
        work_box=box,
        work_psize=psize,
        current_resolution_A=float(4 * psize),
        loglik_total=-5000.0 * n,
        avg_pmax=float(max_prob.mean()) if n else 0.0,
        sigma_offsets_A=float(box / 10 * psize / np.sqrt(3)),
        cap=cap,
        params={"n_classes": k, "seed": seed},
        device="cpu (fake)",
        timings={"total": 0.0},
        history=[{"iteration": i + 1, "class_sizes": sizes.tolist()} for i in range(iteration)],
    )


def set_particle_and_junk_averages(result: ClassResult, junk: list[int]) -> ClassResult:
    """Give every class a centred particle-like blob average, except classes ``junk`` (0-based),
    which get a gold-edge-like step across the box (what ``--select auto`` must drop)."""
    k, box = result.averages.shape[0], result.averages.shape[-1]
    yy, xx = np.mgrid[0:box, 0:box].astype(np.float32) - box // 2
    blob = np.exp(-(xx**2 + yy**2) / (2 * (box / 10) ** 2)).astype(np.float32)
    avg = np.repeat(blob[None], k, axis=0)
    for c in junk:
        avg[c] = 3.0 * (xx + 0.3 * yy > box / 8)
    result.averages = avg
    result.class_prob = np.ones_like(result.class_prob)
    return result
