"""Per-particle outputs of an E-step, the final capped assignment, and the ClassResult."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from companion.classify import fourier as fo
from companion.classify.backend import get_array_module, logsumexp, to_device, to_host
from companion.classify.result import ClassResult
from companion.classify.score import BatchScores

if TYPE_CHECKING:
    from pathlib import Path

    from companion.classify.checkpoint import EMState
    from companion.params import ClassifyParams
    from companion.particles import ParticleSet

log = logging.getLogger(__name__)


class RunContext(Protocol):
    """What this module reads of a classification run (the EM loop's run state)."""

    particles: ParticleSet
    params: ClassifyParams
    xp: Any
    device: str
    geom: fo.Geometry
    search: Any  # the pose grid: ``shifts`` (pixels at the work box) and ``step``
    ckpt_dir: Path
    r: int  # in-plane rotations
    k: int
    n: int
    total: int  # iterations in the run
    cap: int | None
    marginal: bool


ADAPTIVE_FRACTION = 0.999  # RELION's --adaptive_fraction: the mass significant samples hold
TWO_PI = 2.0 * np.pi
IN_RAM = 256 << 20  # larger (N, K) arrays go to memory maps in the cache directory


def host_array(run: RunContext, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes <= IN_RAM:
        return np.zeros(shape, dtype)
    d = run.ckpt_dir / "cache"
    d.mkdir(parents=True, exist_ok=True)
    return np.memmap(d / f"{name}.bin", dtype=dtype, mode="w+", shape=shape)


def poses(run: RunContext, rot: Any, shift_idx: Any) -> tuple[np.ndarray, np.ndarray]:
    """(psi in degrees, RELION range (-180, 180]; origin (x, y) in original pixels)."""
    rot, shift_idx = to_host(rot), to_host(shift_idx)
    psi = -rot.astype(np.float64) * (360.0 / run.r)
    psi = -(((-psi) + 180.0) % 360.0 - 180.0)  # (-180, 180]
    scale = run.search.step * run.geom.box / run.geom.work_box
    shift = run.search.shifts[shift_idx].astype(np.float64) * scale
    return psi.astype(np.float32), shift.astype(np.float32)


def particle_outputs(run: RunContext, sc: BatchScores, post: Any, x: Any, v: Any, is2: Any,
                     log_prior: Any, *, c2s: Any = None, refs: Any = None,
                     ) -> dict[str, np.ndarray]:  # fmt: skip
    """Host arrays for one batch, named as the per-particle fields of EMState.

    ``refs`` (the RotatedRefs scored) and ``c2s`` (C²/σ² of the batch, with any scale the
    model carried) add the CryoSPARC powers ``image_pow``, ``cross_cor`` and ``slice_pow``
    of the best pose in the assigned class; without them those are left out. Terms follow
    :mod:`companion.classify.particle_terms`.
    """
    from companion.classify import particle_terms as pt

    xp = get_array_module(post)
    b = post.shape[0]
    ar = xp.arange(b)
    lab = post.argmax(axis=1)
    psi, shift = poses(run, sc.rot[ar, lab], sc.shift[ar, lab])
    if run.marginal and sc.dense_w is not None:
        peak = sc.dense_w.max(axis=(1, 3))
        nsig = pt.significant_dense(sc.dense_w, post, ADAPTIVE_FRACTION)
        max_prob = (post * peak).max(axis=1)
    elif run.marginal:
        pb, pk = sc.pairs
        peak = xp.zeros_like(post)
        peak[pb, pk] = sc.local_w.max(axis=(1, 2))
        nsig = pt.significant_pairs(sc.local_w, post[pb, pk], pb, b, ADAPTIVE_FRACTION)
        max_prob = (post * peak).max(axis=1)
    else:
        max_prob = post.max(axis=1)
        nsig = pt.significant_rows(post, ADAPTIVE_FRACTION)
    n = x.shape[1] if refs is None else int(refs.n)  # coefficients the E-step used
    data, lognorm = pt.data_terms(x[:, :n], v[:, :n], is2[:, :n], run.geom.work_box)
    ll = logsumexp(sc.ev_1 + log_prior[None]) - data - lognorm
    out = {
        "class_id": to_host(lab).astype(np.int32),
        "psi": psi,
        "shift": shift,
        "max_prob": to_host(max_prob).astype(np.float32),
        "class_prob": to_host(post[ar, lab]).astype(np.float32),
        "loglik": to_host(ll).astype(np.float32),
        "n_sig": to_host(nsig).astype(np.int32),
        "class_ess": to_host(1.0 / (post * post).sum(axis=1)).astype(np.float32),
        "loglik_gain": to_host(ll + data + lognorm).astype(np.float32),
    }
    n_top = min(int(getattr(run.params, "posteriors", 0) or 0), run.k)
    if n_top:
        # balanced runs: the unconstrained posterior, which the final capped assignment's
        # class_prob is read from (assign_balanced); else the E-step's own
        src = post
        if run.params.balance != "off":
            lp = sc.ev_u + log_prior[None]
            src = xp.exp(lp - logsumexp(lp)[:, None])
        cls, prob, cll = pt.top_classes(src, sc.ev_1 - (data + lognorm)[:, None], n_top)
        out["post_class"] = to_host(cls).astype(np.int32)
        out["post_prob"] = to_host(prob).astype(np.float32)
        out["post_loglik"] = to_host(cll).astype(np.float32)
    if c2s is not None and refs is not None:
        row = lab * run.r + sc.rot[ar, lab]
        slice_pow = (c2s[:, :n] * refs.power[row]).sum(axis=1)
        out["image_pow"] = to_host(2.0 * data).astype(np.float32)
        out["cross_cor"] = to_host(2.0 * sc.best[ar, lab] + slice_pow).astype(np.float32)
        out["slice_pow"] = to_host(slice_pow).astype(np.float32)
    return out


def assign_balanced(run: RunContext, st: EMState, stats: dict[str, Any]) -> None:
    """Final hard labels under the cap over ALL particles; each keeps its best pose in the
    class it is given."""
    from companion.classify import balance

    logpost = stats["logpost"]
    scores = to_device(np.asarray(logpost), run.xp)
    labels = to_host(balance.assign_capped(scores, int(run.cap))).astype(np.int64)
    sizes = np.bincount(labels, minlength=run.k)
    if sizes.max(initial=0) > run.cap:  # a cap is a promise
        raise RuntimeError(f"capped assignment broke the cap ({sizes.max()} > {run.cap})")
    ar = np.arange(run.n)
    pose = np.asarray(stats["pose"])[ar, labels]
    t = run.search.n_shift
    psi, shift = poses(run, pose // t, pose % t)
    moved = labels != st.class_id
    st.class_id = labels.astype(np.int32)
    st.psi, st.shift = psi, shift
    st.class_prob = np.exp(np.asarray(logpost)[ar, labels]).astype(np.float32)
    log.info("capped assignment (cap %d): %d particles moved from their most likely class, "
             "largest class %d", run.cap, int(moved.sum()), int(sizes.max()))  # fmt: skip


def occupancy(st: EMState) -> np.ndarray:
    """float32[K] soft class occupancy, summing to 1 (rlnClassDistribution) — not the E-step
    prior, which is held uniform with --class-priors uniform or --balance."""
    occ = np.maximum(np.asarray(st.run_occ, np.float64), 0)
    if occ.sum() <= 0:
        occ = np.asarray(st.prior, np.float64)
    return (occ / max(occ.sum(), 1e-30)).astype(np.float32)


def reseed(run: RunContext, st: EMState, hard: np.ndarray, halves: Any = None) -> None:
    """Re-seed classes below ``--reseed-empty`` × mean size (companion.classify.reseed):
    each gets a split of a donor class (its half-set averages, else a perturbed copy); the
    donor's prior is shared between the two and the new class's running sums start empty."""
    from companion.classify import reseed as rs

    rng = np.random.default_rng([run.params.seed, 0x7E5E, st.iteration + 1])
    res = rs.reseed_empty(st.refs, hard, run.params.reseed_empty, rng, halves=halves)
    if res is None:
        return
    st.refs = np.asarray(to_host(res.refs), np.float32)
    for e, d in res.pairs:
        st.run_num[:, e] = 0
        st.run_den[:, e] = 0
        st.run_occ[d] *= 0.5
        st.run_occ[e] = st.run_occ[d]
        st.acc_rot[e], st.acc_trans[e] = st.acc_rot[d], st.acc_trans[d]
    if run.params.resolved_class_priors == "estimated":
        prior = np.maximum(np.asarray(res.sizes, np.float64), 0)
        if prior.sum() > 0:
            prior = np.maximum(prior / prior.sum(), 1e-12)
            st.prior = prior / prior.sum()
    log.info("re-seeded classes %s from %s", [int(e) + 1 for e in res.pairs[:, 0]],
             [int(d) + 1 for d in res.pairs[:, 1]])  # fmt: skip


def _extend(a: np.ndarray, n: int, fill_last: bool = False) -> np.ndarray:
    """(…, S) → (…, n) padded with zeros (or the last value)."""
    out = np.zeros(a.shape[:-1] + (n,), np.float32)
    m = min(n, a.shape[-1])
    out[..., :m] = a[..., :m]
    if fill_last and n > m:
        out[..., m:] = a[..., m - 1 : m]
    return out


def _group_scale(st: EMState, rows: np.ndarray) -> np.ndarray:
    """ClassResult.group_scale: each group's noise-row scale (1 where none was kept)."""
    scale = np.asarray(st.group_scale, np.float32)
    return scale[rows] if scale.size > int(rows.max(initial=0)) else np.ones(len(rows), np.float32)


def _optional(run: RunContext, st: EMState) -> dict[str, np.ndarray]:
    """The optional per-particle fields the run has (posteriors cut to --posteriors)."""
    out: dict[str, np.ndarray] = {}
    n_top = min(int(getattr(run.params, "posteriors", 0) or 0), run.k)
    if n_top and st.post_class is not None and st.post_class.shape[1] >= n_top:
        out["post_class"] = np.asarray(st.post_class[:, :n_top], np.int32)
        out["post_prob"] = np.asarray(st.post_prob[:, :n_top], np.float32)
        out["post_loglik"] = np.asarray(st.post_loglik[:, :n_top], np.float32)
    for name in ("image_pow", "cross_cor", "slice_pow", "loglik_gain"):
        if getattr(st, name) is not None:
            out[name] = np.asarray(getattr(st, name), np.float32)
    return out


def build_result(run: RunContext, st: EMState) -> ClassResult:
    geom, params = run.geom, run.params
    n_out = geom.box // 2 + 1
    # spectra in RELION's normalisation (forward FFT divided by the pixel count)
    norm = 1.0 / geom.work_box**2
    averages = to_host(fo.fourier_pad(to_device(st.refs, run.xp), geom.box)).astype(np.float32)
    labels = st.class_id
    sizes = np.bincount(labels[labels >= 0], minlength=run.k).astype(np.int64)
    groups = np.unique(run.particles.optics_group).astype(np.int32)
    shift_a = st.shift * geom.psize
    seen = labels >= 0
    return ClassResult(
        class_id=labels.astype(np.int32),
        psi_deg=st.psi.astype(np.float32),
        shift_px=st.shift.astype(np.float32),
        max_prob=st.max_prob.astype(np.float32),
        class_prob=st.class_prob.astype(np.float32),
        loglik=st.loglik.astype(np.float32),
        n_significant=st.n_sig.astype(np.int32),
        norm_correction=np.ones(run.n, np.float32),
        scale=(np.ones(run.n, np.float32) if st.scale is None else st.scale.astype(np.float32)),
        half_set=st.half.astype(np.uint8),
        class_ess=st.class_ess.astype(np.float32),
        averages=averages,
        class_sizes=sizes,
        class_distribution=occupancy(st),
        resolution_A=st.resolution.astype(np.float32),
        accuracy_rot_deg=np.asarray(st.acc_rot, np.float32),
        accuracy_trans_A=np.asarray(st.acc_trans, np.float32),
        prior_offset_px=np.zeros((run.k, 2), np.float32),
        shell_resolution_A=geom.shell_resolution(n_out),
        frc=_extend(st.frc, n_out),
        ssnr=_extend(st.ssnr, n_out),
        sigma2_ref=_extend(st.ref_power * norm, n_out),
        tau2=_extend(st.tau2 * norm, n_out),
        sigma2_noise=_extend(st.sigma2_used * norm, n_out, fill_last=True)[run.group_rows],
        group_scale=_group_scale(st, run.group_rows),
        optics_groups=groups,
        iteration=int(st.iteration),
        n_iterations=int(run.total),
        work_box=int(geom.work_box),
        work_psize=float(geom.work_psize),
        current_resolution_A=float(
            st.history[-1].get("resolution_limit_A", geom.box * geom.psize / geom.s_max)
            if st.history
            else geom.box * geom.psize / geom.s_max
        ),
        loglik_total=float(st.loglik[seen].astype(np.float64).sum()),
        avg_pmax=float(st.max_prob[seen].mean()) if seen.any() else 0.0,
        sigma_offsets_A=float(np.sqrt(np.mean(shift_a[seen] ** 2))) if seen.any() else 0.0,
        cap=run.cap,
        **_optional(run, st),
        params=params.resolved(),
        device=run.device,
        timings=dict(st.timings),
        history=list(st.history),
    )
