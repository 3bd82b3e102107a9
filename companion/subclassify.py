"""``--subclassify``: every big class classified again, all of them in ONE run.

After the main run, each class holding more than ``--subclassify-above`` particles (default:
2 × the mean class size) gets ``k_c`` sub-classes (``--subclassify-k``, default
``ceil(N_c / mean)``, so each holds about the mean size). One classification over the big
classes' particles has ``Σ k_c`` classes and a per-particle allowed-class mask
(:class:`Allowed`): a particle of parent ``c`` may only go to ``c``'s sub-classes (its
log-posterior for every other class is ``-inf``), the seeding iteration deals each parent's
particles over its own sub-classes, and every sub-class starts from its parent's average
(low-passed to the initial resolution), so the alignment is redone inside the class, in the
parent's frame (re-centring off). It is balanced (``--balance cap`` at about the mean size,
never above the main run's cap; in each batch a parent's caps are raised where they cannot
hold its particles, :func:`companion.classify.balance.sinkhorn_capped_blocks`), and its
schedule is shorter (``--subclassify-iters`` online iterations, default three quarters of
the main run's), as it starts from the parents' averages.

Merging back (:func:`merge_test`): two sub-classes of one parent are merged when their
averages are not significantly less correlated than two independent averages of one and the
same signal would be. Each class's half-set FRC gives its spectral SNR per shell,
``SNR = 2 FRC / (1 − FRC)``; for one shared signal the expected FRC between the two averages
is ``sqrt(SNR_a SNR_b / ((1 + SNR_a)(1 + SNR_b)))``. Per shell s with ``n_s`` complex
coefficients, ``z_s = (atanh(expected_s) − atanh(observed_s)) · sqrt((2 n_s − 3) / 2)``
(Fisher's z; the expected value is itself estimated, hence half the usual weight); over the
shells where both half-set FRCs exceed SIGNAL_FRC (0.143) and chance (3 / sqrt(2 n_s)),
``z = Σ z_s / sqrt(#shells)``; ``z < MERGE_Z`` (3) merges. (Half-set FRCs inside the
alignment limit are optimistic, which makes the test split rather than merge when in
doubt.) A parent whose sub-classes all merge into one keeps its
main-run class unchanged.

The result is one flat set of classes — each main class in order, a split one replaced by
its sub-classes — with ``ClassResult.parent_class`` (the main-run class of every class) and
``ClassResult.lineage`` (parents, sub-classes, merges, time), which the writers record
(companionParentClass, lineage/parent_class) and the summary and gallery show.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from companion.classify.result import PER_PARTICLE, ClassResult
from companion.params import ClassifyParams, validate_params, without_subclassify
from companion.particles import ParticleSet

log = logging.getLogger("companion.subclassify")

MERGE_Z = 3.0  # z-score above which two sub-classes count as different
SIGNAL_FRC = 0.143  # shells where both half-set FRCs exceed this (and chance) are tested
MIN_PER_SUBCLASS = 20  # no sub-class is planned with fewer particles than this
CAP_SLACK = 1.25  # sub-class cap = ceil(slack × the largest planned N_c / k_c)


@dataclass
class Allowed:
    """Which classes each particle may go to in a sub-classification run.

    ``particle_parent`` (N,): the parent (0..P-1) of every particle of the run;
    ``class_parent`` (K,): the parent of every sub-class; ``averages`` (P, box, box): the
    parents' main-run averages (original box), the sub-classes' starting references.
    """

    particle_parent: np.ndarray
    class_parent: np.ndarray
    averages: np.ndarray | None = None

    def seed_owner(self, seed: int) -> np.ndarray:
        """The class each particle is aligned against in the seeding iteration: each
        parent's particles dealt in a random order over its own sub-classes."""
        pp = np.asarray(self.particle_parent, np.int64)
        cp = np.asarray(self.class_parent, np.int64)
        n = len(pp)
        perm = np.random.default_rng([seed, 0x5C1A]).permutation(n)
        owner = np.empty(n, np.int64)
        by_parent = perm[np.argsort(pp[perm], kind="stable")]  # each parent's, in perm order
        starts = np.flatnonzero(np.r_[True, np.diff(pp[by_parent]) != 0])
        for idx in np.split(by_parent, starts[1:]):  # a loop over parents, not particles
            if len(idx):
                subs = np.flatnonzero(cp == pp[idx[0]])
                owner[idx] = subs[np.arange(len(idx)) % len(subs)]
        return owner

    def initial_refs(self, geom: Any, xp: Any) -> np.ndarray:
        """(K, w, w) working-box references: each sub-class its parent's average, low-passed
        to the initial resolution and masked as companion.classify.init does."""
        from companion.classify import fourier as fo
        from companion.classify.backend import to_device, to_host
        from companion.classify.init import lowpass_shell

        assert self.averages is not None
        avg = fo.fourier_crop(np.asarray(self.averages, np.float32), geom.work_box)
        coef = to_host(fo.to_kept(to_device(avg, xp), geom))
        r = np.hypot(geom.kx.astype(np.float64), geom.ky.astype(np.float64))
        t = np.clip((r - lowpass_shell(geom) + 1.0) / 2.0, 0.0, 1.0)
        coef = (coef * (0.5 * (1.0 + np.cos(math.pi * t)))).astype(np.complex64)
        coef = coef[np.asarray(self.class_parent, np.int64)]
        mask = fo.soft_mask(geom.work_box, geom.mask_radius, xp=xp)
        background = fo.radial_mask(geom.work_box, geom.mask_radius, xp=xp)
        refs = fo.apply_mask(fo.from_kept(to_device(coef, xp), geom), mask, background)
        return to_host(refs).astype(np.float32)

    def segments(self, chunk: np.ndarray, xp: Any) -> list[tuple[Any, int, int]]:
        """The batch ``chunk``'s particles (its indices) by parent, each with its parent's
        sub-classes as one range: ``[(rows on the device, k0, k1), …]``, the classes they
        may go to (:func:`companion.classify.score.score`'s ``segments``)."""
        from companion.classify.backend import to_device

        cp = np.asarray(self.class_parent, np.int64)
        if np.any(np.diff(cp) < 0):
            raise ValueError("Allowed: each parent's sub-classes must be contiguous (sorted "
                             f"class_parent), got {cp.tolist()}")  # fmt: skip
        pp = np.asarray(self.particle_parent, np.int64)[chunk]
        order = np.argsort(pp, kind="stable")
        cuts = np.flatnonzero(np.diff(pp[order])) + 1
        out = []
        for rows in np.split(order, cuts):  # a loop over parents, not particles
            if len(rows):
                lo, hi = (
                    np.searchsorted(cp, pp[rows[0]], "left"),
                    np.searchsorted(cp, pp[rows[0]], "right"),
                )
                out.append((to_device(rows.astype(np.int64), xp), int(lo), int(hi)))
        return out


# ------------------------------------------------------------------ plan


def plan_split(sizes: np.ndarray, above: int | None = None, k: int | None = None,
               cap: int | None = None) -> dict[int, int]:  # fmt: skip
    """``{main class: number of sub-classes}`` for the classes to split (0-based).

    A class is split when it holds more than ``above`` particles (default 2 × the mean
    size); into ``k`` sub-classes (default ``ceil(N_c / target)``, target = the mean size,
    or the cap if smaller), never so many that one would hold fewer than MIN_PER_SUBCLASS.
    """
    sizes = np.asarray(sizes, np.int64)
    mean = sizes.sum() / max(len(sizes), 1)
    threshold = 2.0 * mean if above is None else float(above)
    target = mean if cap is None else min(mean, float(cap))
    out: dict[int, int] = {}
    for c in np.flatnonzero(sizes > threshold).tolist():
        kc = int(k) if k is not None else int(math.ceil(sizes[c] / max(target, 1.0)))
        kc = min(kc, int(sizes[c]) // MIN_PER_SUBCLASS)
        if kc >= 2:
            out[int(c)] = kc
    return out


def sub_params(params: ClassifyParams, n_sub: int, plan: dict[int, int], sizes: np.ndarray,
               main_cap: int | None) -> ClassifyParams:  # fmt: skip
    """The sub-run's parameters: the main run's, with Σ k_c classes, balanced (cap about
    the mean sub-class size with CAP_SLACK, never above the main cap, always feasible per
    parent), no re-centring (the parent's frame), no re-seeding, another seed, a shorter
    schedule (:func:`sub_schedule`)."""
    per = max(int(math.ceil(sizes[c] / kc)) for c, kc in plan.items())
    cap = int(math.ceil(CAP_SLACK * per))
    if main_cap is not None:
        cap = max(per, min(cap, int(main_cap)))
    values = params.model_dump()
    values.update(
        n_classes=int(sum(plan.values())),
        balance="cap",
        max_per_class=cap,
        class_priors=None,
        recenter=False,
        reseed_empty=0.0,
        seed=int(params.seed) + 7919,
        stability=0,
        **without_subclassify(),
        **sub_schedule(params),
    )
    return validate_params(values)


def sub_schedule(params: ClassifyParams) -> dict[str, int]:
    """The sub-run's online iterations (``--subclassify-iters``, default three quarters of
    the main run's: it starts from the parents' averages, not from scratch) and its
    annealing, shortened in proportion; the full passes stay."""
    main = int(params.online_iters)
    o = params.subclassify_iters
    o = (3 * main) // 4 if o is None else int(o)
    if main == 0 or o == main:
        return {"online_iters": o}
    return {"online_iters": o,
            "anneal_iters": max(1, round(params.anneal_iters * o / main))}  # fmt: skip


# ------------------------------------------------------------------ merge test


def _shells(box: int) -> np.ndarray:
    ky = np.fft.fftfreq(box, 1.0 / box)
    kx = np.arange(box // 2 + 1, dtype=np.float64)
    return np.rint(np.hypot(*np.meshgrid(ky, kx, indexing="ij"))).astype(np.int64)


def cross_frc(a: np.ndarray, b: np.ndarray, radius: float | None = None) -> np.ndarray:
    """FRC per shell (0..box//2) of two images inside a soft circle of ``radius`` px."""
    box = a.shape[-1]
    radius = 0.45 * box if radius is None else float(radius)
    yy, xx = np.mgrid[0:box, 0:box] - box // 2
    r = np.hypot(xx, yy)
    m = np.clip((radius + 2.0 - r) / 4.0, 0.0, 1.0)
    fa = np.fft.rfft2(np.asarray(a, np.float64) * m)
    fb = np.fft.rfft2(np.asarray(b, np.float64) * m)
    sh = _shells(box).ravel()
    n_s = box // 2 + 1
    keep = sh < n_s
    num = np.bincount(sh[keep], (fa * np.conj(fb)).real.ravel()[keep], n_s)
    pa = np.bincount(sh[keep], (np.abs(fa) ** 2).ravel()[keep], n_s)
    pb = np.bincount(sh[keep], (np.abs(fb) ** 2).ravel()[keep], n_s)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / np.sqrt(pa * pb)
    return np.nan_to_num(out)


def merge_test(a: np.ndarray, b: np.ndarray, frc_a: np.ndarray, frc_b: np.ndarray,
               radius: float | None = None) -> float:  # fmt: skip
    """z-score of "the averages ``a`` and ``b`` differ" (see the module doc): large when
    their FRC falls short of what their half-set FRCs ``frc_a``/``frc_b`` (per shell of the
    original box) predict for one shared signal; ``< MERGE_Z``: merge. 0 when no shell holds
    signal (nothing to tell them apart)."""
    box = a.shape[-1]
    n_s = box // 2 + 1
    obs = np.clip(cross_frc(a, b, radius), -0.999, 0.999)
    fa = np.clip(np.asarray(frc_a, np.float64)[:n_s], 0.0, 0.999)
    fb = np.clip(np.asarray(frc_b, np.float64)[:n_s], 0.0, 0.999)
    sa, sb = 2 * fa / (1 - fa), 2 * fb / (1 - fb)
    exp = np.clip(np.sqrt(sa * sb / ((1 + sa) * (1 + sb))), 0.0, 0.999)
    counts = np.bincount(_shells(box).ravel(), minlength=n_s)[:n_s]
    # shells with signal: both half-set FRCs above SIGNAL_FRC and chance (3 / sqrt(2 n_s))
    floor = np.maximum(SIGNAL_FRC, 3.0 / np.sqrt(np.maximum(2 * counts, 1)))
    use = (np.minimum(fa, fb) > floor) & (np.arange(n_s) >= 1)
    if not use.any():
        return 0.0
    # Fisher z per shell; the expected value is itself estimated (from half-sets): twice the
    # variance of one correlation over the shell's 2 n_s real values
    zs = (np.arctanh(exp) - np.arctanh(obs)) * np.sqrt(np.maximum(2 * counts - 3, 1) / 2.0)
    z = zs[use].sum() / math.sqrt(int(use.sum()))
    return float(z)


def merge_groups(averages: np.ndarray, frc: np.ndarray, sizes: np.ndarray,
                 class_parent: np.ndarray, radius: float | None = None,
                 z_merge: float = MERGE_Z) -> tuple[np.ndarray, list[dict[str, Any]]]:  # fmt: skip
    """Merge siblings not significantly different (single linkage within a parent).

    Returns ``group`` (K,): each sub-class's representative (the largest of its merged
    group), and one record per tested pair (sub-classes, z, merged)."""
    k = len(sizes)
    group = np.arange(k)

    def find(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = int(group[i])
        return i

    tests = []
    for p in np.unique(class_parent):
        subs = [int(s) for s in np.flatnonzero(class_parent == p) if sizes[s] > 0]
        for ii, i in enumerate(subs):
            for j in subs[ii + 1 :]:
                z = merge_test(averages[i], averages[j], frc[i], frc[j], radius)
                merged = z < z_merge
                tests.append({"a": i, "b": j, "z": round(z, 2), "merged": bool(merged)})
                if merged:
                    ri, rj = find(i), find(j)
                    if ri != rj:
                        big, small = (ri, rj) if sizes[ri] >= sizes[rj] else (rj, ri)
                        group[small] = big
    reps = np.array([find(i) for i in range(k)])
    # the representative is the largest member of its group
    for r in np.unique(reps):
        members = np.flatnonzero(reps == r)
        reps[members] = members[np.argmax(sizes[members])]
    return reps, tests


# ------------------------------------------------------------------ the run


# the top-n class posteriors are not carried over from either run when classes are split:
# their class numbers are the runs' own
POSTERIOR_FIELDS = ("post_class", "post_prob", "post_loglik")
PER_CLASS = ("accuracy_rot_deg", "accuracy_trans_A", "prior_offset_px", "frc", "ssnr",
             "sigma2_ref", "tau2", "resolution_A")  # fmt: skip


def subclassify(particles: ParticleSet, params: ClassifyParams, result: ClassResult,
                work_dir: Path | None = None, *, classifier: Any = None,
                callbacks: Any = None) -> ClassResult:  # fmt: skip
    """The flat result of ``--subclassify`` after the main ``result`` (see the module doc);
    ``result`` itself (with a trivial lineage) when no class is big enough."""
    t0 = time.perf_counter()
    sizes = np.asarray(result.class_sizes, np.int64)
    plan = plan_split(sizes, params.subclassify_above, params.subclassify_k, result.cap)
    k_main = result.n_classes
    if not plan:
        log.info("--subclassify: no class above the threshold; nothing split")
        return replace(result, parent_class=np.arange(k_main),
                       lineage={"split": {}, "tested": [], "seconds": 0.0})  # fmt: skip
    if classifier is None:
        from companion.classify import classify as classifier
    labels = np.asarray(result.class_id, np.int64)
    parents = np.array(sorted(plan), np.int64)
    idx = np.flatnonzero(np.isin(labels, parents))
    pindex = np.full(k_main, -1, np.int64)
    pindex[parents] = np.arange(len(parents))
    class_parent = np.repeat(np.arange(len(parents)), [plan[int(c)] for c in parents])
    allowed = Allowed(pindex[labels[idx]], class_parent, np.asarray(result.averages)[parents])
    sp = sub_params(params, len(idx), plan, sizes, result.cap)
    log.info("--subclassify: %d classes (%s particles) into %d sub-classes in one run (cap %s)",
             len(parents), len(idx), sp.n_classes, sp.max_per_class)  # fmt: skip
    wd = None if work_dir is None else Path(work_dir) / "subclassify"
    sub = classifier(particles.subset(idx), sp, work_dir=wd, callbacks=callbacks, allowed=allowed)
    if wd is not None:  # its checkpoint is of no further use
        shutil.rmtree(wd, ignore_errors=True)
    sub_sizes = np.asarray(sub.class_sizes, np.int64)
    radius = None
    if params.particle_diameter:
        radius = min(0.5 * params.particle_diameter / particles.pixel_size, 0.5 * particles.box)
    reps, tests = merge_groups(np.asarray(sub.averages), np.asarray(sub.frc), sub_sizes,
                               class_parent, radius)  # fmt: skip
    flat = _flatten(result, sub, idx, parents, class_parent, reps)
    secs = time.perf_counter() - t0
    flat.lineage["tested"] = [t | {"a": int(t["a"]), "b": int(t["b"])} for t in tests]
    flat.lineage["seconds"] = secs
    flat.lineage["sub_run"] = {"n_particles": len(idx), "n_classes": sp.n_classes,
                               "cap": sp.max_per_class}  # fmt: skip
    flat.timings = dict(result.timings) | {"subclassify_s": secs}
    log.info("--subclassify: %d → %d classes (%d merges) in %.1f s", k_main, flat.n_classes,
             sum(t["merged"] for t in tests), secs)  # fmt: skip
    return flat


def _flatten(main: ClassResult, sub: ClassResult, idx: np.ndarray, parents: np.ndarray,
             class_parent: np.ndarray, reps: np.ndarray) -> ClassResult:  # fmt: skip
    """One flat ClassResult: main classes in order, a split one replaced by its (merged)
    sub-classes; a parent left with one group keeps its main-run class and particles."""
    k_main = main.n_classes
    sub_lab = np.asarray(sub.class_id, np.int64)
    sub_sizes = np.bincount(sub_lab, minlength=sub.n_classes)
    pindex = {int(c): i for i, c in enumerate(parents)}
    sources: list[tuple[str, int]] = []  # ("main", c) or ("sub", representative)
    parent_of: list[int] = []
    new_of_rep: dict[int, int] = {}
    split: dict[str, list[int]] = {}
    kept_whole: list[int] = []
    for c in range(k_main):
        if c not in pindex:
            sources.append(("main", c))
            parent_of.append(c)
            continue
        subs = np.flatnonzero(class_parent == pindex[c])
        groups = [int(r) for r in np.unique(reps[subs]) if sub_sizes[reps == r].sum() > 0]
        if len(groups) < 2:
            kept_whole.append(c)
            sources.append(("main", c))
            parent_of.append(c)
            continue
        split[str(c + 1)] = []
        for r in groups:
            new_of_rep[r] = len(sources)
            split[str(c + 1)].append(len(sources) + 1)
            sources.append(("sub", r))
            parent_of.append(c)
    # per particle: the main run's values, replaced by the sub-run's for split parents
    main_new = {c: i for i, (kind, c) in enumerate(sources) if kind == "main"}
    lab = np.asarray(main.class_id, np.int64)
    moved = np.isin(reps[sub_lab], list(new_of_rep))
    rows = idx[moved]
    out: dict[str, Any] = {}
    for f in PER_PARTICLE:  # every per-particle field of ClassResult the main run has
        m, s_ = getattr(main, f), getattr(sub, f)
        if m is None or f == "class_id":
            continue
        if f in POSTERIOR_FIELDS and new_of_rep:
            out[f] = None
            continue
        out[f] = np.array(m, copy=True)
        if s_ is not None:
            out[f][rows] = np.asarray(s_)[moved]
    if new_of_rep and main.post_prob is not None:
        log.warning(
            "--subclassify split classes: the top-%d class posteriors "
            "(--posteriors) are left out of the outputs",
            main.post_prob.shape[1],
        )
    lut = np.full(sub.n_classes, -1, np.int64)
    for r, new in new_of_rep.items():
        lut[r] = new
    out["class_id"] = np.array([main_new.get(int(c), -1) for c in range(k_main)])[lab]
    out["class_id"][rows] = lut[reps[sub_lab[moved]]]
    out["class_id"] = out["class_id"].astype(np.int32)
    k = len(sources)
    sizes = np.bincount(out["class_id"], minlength=k).astype(np.int64)
    per_class: dict[str, Any] = {}
    for f in PER_CLASS:
        m, s = np.asarray(getattr(main, f)), np.asarray(getattr(sub, f))
        per_class[f] = np.stack([m[c] if kind == "main" else s[c] for kind, c in sources])
    avg_m, avg_s = np.asarray(main.averages), np.asarray(sub.averages)
    averages = []
    for kind, c in sources:  # a merged group: the size-weighted mean (one frame: the parent's)
        if kind == "main":
            averages.append(avg_m[c])
            continue
        members = np.flatnonzero(reps == c)
        w = sub_sizes[members].astype(np.float64)
        averages.append((avg_s[members] * (w / w.sum())[:, None, None]).sum(axis=0))
    n = max(int(sizes.sum()), 1)
    return replace(
        main,
        **out,
        **per_class,
        averages=np.stack(averages).astype(np.float32),
        class_sizes=sizes,
        class_distribution=(sizes / n).astype(np.float32),
        parent_class=np.asarray(parent_of, np.int64),
        lineage={"split": split, "kept_whole": [c + 1 for c in kept_whole]},
    )


def lineage_summary(result: ClassResult) -> dict[str, Any] | None:
    """The ``subclassify`` entry of summary.json (1-based class numbers), or None."""
    if result.parent_class is None:
        return None
    lin = dict(result.lineage or {})
    return {
        "parent_class": (np.asarray(result.parent_class) + 1).tolist(),
        "split": lin.get("split", {}),
        "kept_whole": lin.get("kept_whole", []),
        "merge_test": {
            "z_merge": MERGE_Z,
            "pairs": [t | {"a": t["a"] + 1, "b": t["b"] + 1} for t in lin.get("tested", [])],
            "numbering": "sub-run classes, 1-based",
        },  # fmt: skip
        "sub_run": lin.get("sub_run"),
        "seconds": lin.get("seconds", 0.0),
    }
