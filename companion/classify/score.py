"""E-step scoring: log-likelihood of every (class, in-plane rotation, shift) as GEMMs.

With whitened, CTF-weighted particle coefficients ``Xc = cy·X/sigma²`` (B, F) and rotated
references ``A`` (K, R, F), the log-likelihood of a pose, up to a per-particle constant, is

    ll(b, k, r, t) = Re Σ_f conj(Xc_bf e^{-2πi f·t}) A_krf − ½ Σ_f (C²/sigma²)_bf |A_krf|²

(RELION's half-plane sum with sigma² = half the noise power per complex coefficient). The
complex arrays are viewed as interleaved float32, so the cross term is one real GEMM with
inner size 2F: shifted particles (B·T, 2F) × references (K·R, 2F)ᵀ; the quadratic term is a
second GEMM (B, F) × (F, K·R).

Search modes:

- ``exhaustive``: every rotation and shift at full resolution (cost ~ 4·B·T·K·R·F flops).
- ``fast`` (default): a coarse pass over every class with twice the rotation and shift steps
  at half the resolution (one GEMM), then, for every particle and class, a fine pass around
  the best coarse pose (±``FINE_ROT`` rotations, ±``FINE_SHIFT`` shift steps) at full
  resolution. The fine pass multiplies the particle, shifted to the coarse best shift, by each
  selected rotated reference and evaluates all local shifts as one GEMM against a small table
  of phase ramps. Only classes whose coarse score is within ``COARSE_MARGIN × u`` of the
  particle's best are refined; poses outside the fine window carry no weight (as in RELION's
  adaptive oversampling, which keeps only the significant coarse samples).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from companion.classify import fourier as fo
from companion.classify.backend import (
    batch_size,
    get_array_module,
    synchronize,
    to_device,
    work_budget,
)

FINE_ROT = 2  # fine rotations on each side of the best coarse one (coarse step = 2 fine)
FINE_SHIFT = 2  # fine shift steps on each side of the best coarse shift (coarse step = 2)
COARSE_MARGIN = 12.0  # classes whose coarse score trails the best by more than this × u
# are not refined (their posterior weight is ~exp(-margin·F/Fc) — negligible)
NEG = np.float32(-3.0e38)
#: set to a dict by ``companion bench speed`` to time the passes (with a device sync each):
#: coarse_s / coarse_flop / fine_s / fine_flop accumulate there; None (default) costs nothing
TIMINGS: dict[str, float] | None = None


def _lap(xp: Any, part: str, t0: float, flop: float) -> float:
    """Add the seconds since ``t0`` and ``flop`` to ``TIMINGS[part...]``; the new t0."""
    if TIMINGS is None:
        return 0.0
    synchronize(xp)
    now = time.perf_counter()
    TIMINGS[part + "_s"] = TIMINGS.get(part + "_s", 0.0) + now - t0
    TIMINGS[part + "_flop"] = TIMINGS.get(part + "_flop", 0.0) + flop
    return now


def f32view(a: Any) -> Any:
    """A complex64 array (..., F) viewed as float32 (..., 2F) [re, im, re, im, ...]."""
    return a.view(get_array_module(a).float32)


@dataclass
class Search:
    """The pose grid of one run (rotations, shifts, coarse/fine subsets) on one device."""

    mode: str
    n_rot: int
    shifts: np.ndarray  # int32 (T, 2) grid coordinates (units of ``step`` working px)
    step: float
    radius: float  # working px
    phases: Any  # (T, F) complex64: exp(-2πi k·t/w)
    # fast mode
    coarse_shift_idx: Any = None  # indices into shifts (even coordinates)
    rot_offsets: Any = None  # (J,) int
    local: np.ndarray | None = None  # (n_d, 2) local shift offsets (grid units)
    local_cross: Any = None  # (2F, n_d) float32: [cos; -sin] of +2πi k·d/w, interleaved
    local_adj: Any = None  # (n_d, 2F) float32: exp(-2πi k·d/w) interleaved
    lookup: Any = None  # ((2n+1)², ) index of grid point in shifts, -1 outside
    lookup_n: int = 0
    shifts_dev: Any = None  # ``shifts`` and ``local`` on the device (uploaded once)
    local_dev: Any = None

    @property
    def n_shift(self) -> int:
        return int(self.shifts.shape[0])

    @classmethod
    def create(cls, geom: fo.Geometry, psi_step: float, max_shift: float, shift_step: float,
               mode: str, xp: Any) -> Search:  # fmt: skip
        n_rot = max(1, int(round(360.0 / psi_step)))
        radius = max_shift * geom.work_box
        shifts = fo.shift_grid(radius, shift_step)
        t_px = shifts * shift_step
        phases = fo.phase_ramps(t_px, geom, xp=xp)
        s = cls(mode, n_rot, shifts, float(shift_step), float(radius), phases)
        if mode == "fast":
            s._init_fast(geom, xp)
        return s

    def _init_fast(self, geom: fo.Geometry, xp: Any) -> None:
        even = np.flatnonzero((self.shifts[:, 0] % 2 == 0) & (self.shifts[:, 1] % 2 == 0))
        self.coarse_shift_idx = to_device(even.astype(np.int64), xp)
        j = min(2 * FINE_ROT + 1, self.n_rot)
        self.rot_offsets = to_device(np.arange(j) - (j - 1) // 2, xp)
        d = np.arange(-FINE_SHIFT, FINE_SHIFT + 1)
        dy, dx = np.meshgrid(d, d, indexing="ij")
        self.local = np.stack([dx.ravel(), dy.ravel()], axis=1).astype(np.int32)
        loc = fo.phase_ramps(self.local * self.step, geom)  # exp(-2πi k·d/w)  (n_d, F)
        self.local_adj = to_device(loc.view(np.float32), xp)
        plus = np.conj(loc)  # exp(+2πi k·d/w)
        cross = np.empty((2 * geom.n_coef, len(self.local)), np.float32)
        cross[0::2] = plus.real.T
        cross[1::2] = -plus.imag.T
        self.local_cross = to_device(cross, xp)
        n = int(np.abs(self.shifts).max()) + FINE_SHIFT + 1
        table = np.full((2 * n + 1) ** 2, -1, np.int64)
        table[(self.shifts[:, 1] + n) * (2 * n + 1) + self.shifts[:, 0] + n] = np.arange(
            self.n_shift
        )
        self.lookup, self.lookup_n = to_device(table, xp), n
        self.shifts_dev, self.local_dev = to_device(self.shifts, xp), to_device(self.local, xp)

    @staticmethod
    def coarse_shell(shell: int) -> int:
        """Resolution limit (shell) of the coarse pass for a fine limit ``shell``."""
        return max(int(math.ceil(shell / 2)), min(shell, 10))

    def shift_index(self, xy: Any) -> Any:
        """Index in ``shifts`` of grid points (..., 2) (−1 outside the search disc)."""
        n = self.lookup_n
        return self.lookup[(xy[..., 1] + n) * (2 * n + 1) + xy[..., 0] + n]


@dataclass
class RotatedRefs:
    """References rotated for one iteration, in the layouts the GEMMs want.

    ``full`` holds every kept coefficient (the M-step and the noise estimate use them);
    the E-step uses the first ``n`` (the current resolution limit) and, in fast mode, the
    first ``fc`` of every second rotation for the coarse pass.
    """

    full: Any  # (K, R, F) complex64
    A: Any  # (K, R, n) complex64, contiguous
    A_flat: Any  # (K*R, 2n) float32 view
    power: Any  # (K*R, n) float32 |A|²
    n: int
    fc: int = 0
    coarse: Any = None  # (K*Rc, 2fc) float32 contiguous
    coarse_power: Any = None  # (K*Rc, fc)

    @classmethod
    def create(cls, full: Any, search: Search, n: int | None = None,
               fc: int | None = None) -> RotatedRefs:  # fmt: skip
        xp = get_array_module(full)
        k, r, f_all = full.shape
        n = f_all if n is None else int(n)
        a = xp.ascontiguousarray(full[:, :, :n])
        power = (a.real**2 + a.imag**2).reshape(k * r, n).astype(xp.float32)
        out = cls(full, a, f32view(a).reshape(k * r, 2 * n), power, n)
        if search.mode == "fast":
            fc = n if fc is None else min(int(fc), n)
            ac = xp.ascontiguousarray(a[:, ::2, :fc])
            rc = ac.shape[1]
            out.fc = fc
            out.coarse = f32view(ac).reshape(k * rc, 2 * fc)
            out.coarse_power = xp.ascontiguousarray(power.reshape(k, r, n)[:, ::2, :fc]).reshape(
                k * rc, fc
            )
        return out


@dataclass
class BatchScores:
    """Per (particle, class) results of one batch's E-step.

    ``ev_u`` is the class evidence at temperature u (max mode: best ll / u; marginal:
    log-mean-exp over the pose grid of ll / u), ``ev_1`` the same at u = 1.
    """

    best: Any  # (B, K) best ll
    ev_u: Any
    ev_1: Any
    rot: Any  # (B, K) int best rotation
    shift: Any  # (B, K) int index into Search.shifts
    # marginal mode: within-class pose weights (normalised per (b, k))
    dense_w: Any = None  # exhaustive: (B, T, K, R)
    local_w: Any = None  # fast: (P, J, n_d) for the significant (particle, class) pairs
    local_rot: Any = None  # fast: (P, J) rotation indices
    local_t0: Any = None  # fast: (P,) shift index of the window centre
    pairs: Any = None  # fast: (particle index (P,), class index (P,))
    n_fine: int = 0  # (particle, class) pairs scored at full resolution
    flops: float = 0.0


def _lse_parts(ll: Any, best: Any, axes: tuple[int, ...], u: float, keep: bool) -> tuple:
    """Σ exp(ll − best) and Σ exp((ll − best)/u) over ``axes``; optionally the normalised
    weights exp((ll − best)/u) / Σ (computed in place in ``ll``)."""
    xp = get_array_module(ll)
    s1 = xp.exp(ll - best).sum(axis=axes)
    ll -= best
    ll *= np.float32(1.0 / u)
    xp.exp(ll, out=ll)
    su = ll.sum(axis=axes)
    if keep:
        shape = list(su.shape)
        for a in sorted(axes):
            shape.insert(a, 1)
        ll /= su.reshape(shape)
    return s1, su


def score_exhaustive(xc: Any, c2s: Any, refs: RotatedRefs, search: Search, u: float,
                     marginal: bool) -> BatchScores:  # fmt: skip
    xp = get_array_module(xc)
    b = xc.shape[0]
    k, r, f = refs.A.shape
    t = search.n_shift
    y = xc[:, None, :f] * search.phases[None, :, :f]  # (B, T, n)
    ll = f32view(y).reshape(b * t, 2 * f) @ refs.A_flat.T  # (B*T, K*R)
    quad = (c2s[:, :f] @ refs.power.T) * np.float32(0.5)  # (B, K*R)
    ll = ll.reshape(b, t, k * r)
    ll -= quad[:, None, :]
    ll = ll.reshape(b, t, k, r)
    m1 = ll.max(axis=3)  # (B, T, K)
    a1 = ll.argmax(axis=3)
    best = m1.max(axis=1)  # (B, K)
    tbest = m1.argmax(axis=1)
    rbest = xp.take_along_axis(a1, tbest[:, None, :], axis=1)[:, 0, :]
    flops = 4.0 * b * t * k * r * f + 2.0 * b * f * k * r
    out = BatchScores(best, best / np.float32(u), best, rbest.astype(xp.int32),
                      tbest.astype(xp.int32), flops=flops)  # fmt: skip
    if marginal:
        s1, su = _lse_parts(ll, best[:, None, :, None], (1, 3), u, keep=True)
        lognp = np.float32(math.log(t * r))
        out.ev_1 = best + xp.log(s1) - lognp
        out.ev_u = best / np.float32(u) + xp.log(su) - lognp
        out.dense_w = ll
    return out


def score_fast(xc: Any, c2s: Any, refs: RotatedRefs, search: Search, u: float,
               marginal: bool, budget: int | None = None) -> BatchScores:  # fmt: skip
    xp = get_array_module(xc)
    b = xc.shape[0]
    k, r, f = refs.A.shape
    fc = refs.fc
    cidx = search.coarse_shift_idx
    tc = int(cidx.shape[0])
    rc = refs.coarse.shape[0] // k
    phases = search.phases[:, :f]
    if TIMINGS is not None:
        synchronize(xp)
    t_lap = time.perf_counter()
    # ---- coarse pass: every class, 2x rotation and shift steps, half resolution
    yc = xc[:, None, :fc] * search.phases[cidx, :fc][None]  # (B, Tc, Fc)
    llc = f32view(yc).reshape(b * tc, 2 * fc) @ refs.coarse.T  # (B*Tc, K*Rc)
    llc = llc.reshape(b, tc, k * rc)
    llc -= ((c2s[:, :fc] @ refs.coarse_power.T) * np.float32(0.5))[:, None, :]
    llc = llc.reshape(b, tc, k, rc)
    m1 = llc.max(axis=3)
    a1 = llc.argmax(axis=3)
    tcb = m1.argmax(axis=1)  # (B, K)
    best_c = xp.take_along_axis(m1, tcb[:, None, :], axis=1)[:, 0, :]
    rcb = xp.take_along_axis(a1, tcb[:, None, :], axis=1)[:, 0, :]
    del llc, m1, a1, yc
    flops = 4.0 * b * tc * k * rc * fc
    t_lap = _lap(xp, "coarse", t_lap, flops + 2.0 * b * fc * k * rc)
    # ---- significant (particle, class) pairs: coarse score near the particle's best
    gap = best_c.max(axis=1, keepdims=True) - best_c  # (B, K) >= 0
    sig = gap <= np.float32(COARSE_MARGIN * u)
    bi, ki = xp.nonzero(sig)
    n_pairs = int(bi.shape[0])
    # ---- fine pass around the best coarse pose of each significant pair
    offs = search.rot_offsets
    j = int(offs.shape[0])
    if j >= r:
        rot_sel = xp.broadcast_to(xp.arange(r)[None, :], (n_pairs, r))
        j = r
    else:
        rot_sel = (2 * rcb[bi, ki][:, None] + offs[None, :]) % r  # (P, J)
    t0 = cidx[tcb[bi, ki]]  # (P,) index into shifts
    shifts, local = search.shifts_dev, search.local_dev
    nd = local.shape[0]
    cand = search.shift_index(shifts[t0][:, None, :] + local[None])  # (P, n_d)
    quad = (c2s[:, :f] @ refs.power.T) * np.float32(0.5)  # (B, K*R)
    flops += 2.0 * b * f * k * r
    quad_sel = quad[bi[:, None], ki[:, None] * r + rot_sel]  # (P, J)
    fine = xp.empty(n_pairs, xp.float32)
    jbest = xp.empty(n_pairs, xp.int64)
    dbest = xp.empty(n_pairs, xp.int64)
    if marginal:
        s1_all = xp.empty(n_pairs, xp.float32)
        su_all = xp.empty(n_pairs, xp.float32)
        local_w = xp.empty((n_pairs, j, nd), xp.float32)
    # the fine pass's chunks take at most what the freed coarse arrays held (yc, llc, m1,
    # a1), so the E-step batch sized for the coarse pass (em.batch_size) bounds it too
    freed = b * tc * (fc * 8 + k * rc * 4 + k * 12)
    budget = min(work_budget(xp) if budget is None else budget, freed)
    chunk = batch_size(j * f * 8 * 3 + j * nd * 4 * 3 + f * 8 * 2, xp, budget=budget,
                       most=max(n_pairs, 1))  # fmt: skip
    a_rows = refs.A.reshape(k * r, f)
    for s in range(0, n_pairs, chunk):
        e = min(n_pairs, s + chunk)
        n = e - s
        q = xc[bi[s:e], :f] * phases[t0[s:e]]  # particle at its coarse best shift (n, F)
        z = xp.take(a_rows, (ki[s:e, None] * r + rot_sel[s:e]).reshape(-1), axis=0)
        z = z.reshape(n, j, f)
        z *= xp.conj(q)[:, None, :]
        ll = (f32view(z).reshape(n * j, 2 * f) @ search.local_cross[: 2 * f]).reshape(n, j, nd)
        ll -= quad_sel[s:e, :, None]
        ll = xp.where((cand[s:e] < 0)[:, None, :], NEG, ll)
        flat = ll.reshape(n, j * nd)
        arg = flat.argmax(axis=1)
        bst = xp.take_along_axis(flat, arg[:, None], axis=1)[:, 0]
        fine[s:e] = bst
        jbest[s:e] = arg // nd
        dbest[s:e] = arg % nd
        if marginal:
            s1, su = _lse_parts(ll, bst[:, None, None], (1, 2), u, keep=True)
            local_w[s:e] = ll
            s1_all[s:e], su_all[s:e] = s1, su
        del z, q, ll
    flops += 4.0 * n_pairs * j * f * nd
    _lap(xp, "fine", t_lap, 4.0 * n_pairs * j * f * nd + 2.0 * b * f * k * r)
    # insignificant pairs: coarse pose, score extrapolated from the coarse gap (never used
    # for weights — their posterior is negligible — but ordered, for capped assignment)
    ratio = np.float32(f / max(fc, 1))
    top = xp.zeros(b, xp.float32)
    is_top = gap[bi, ki] == 0
    top[bi[is_top]] = fine[is_top]
    best = top[:, None] - gap * ratio
    best[bi, ki] = fine
    rot = (2 * rcb) % r
    shift = cidx[tcb]
    rot[bi, ki] = xp.take_along_axis(rot_sel, jbest[:, None], axis=1)[:, 0]
    shift[bi, ki] = xp.take_along_axis(cand, dbest[:, None], axis=1)[:, 0]
    out = BatchScores(best, best / np.float32(u), best, rot.astype(xp.int32),
                      shift.astype(xp.int32), flops=flops)  # fmt: skip
    out.n_fine = n_pairs
    if marginal:
        lognp = np.float32(math.log(search.n_shift * r))
        ev_u = best / np.float32(u) - lognp
        ev_1 = best - lognp
        ev_u[bi, ki] += xp.log(su_all)
        ev_1[bi, ki] += xp.log(s1_all)
        out.ev_u, out.ev_1 = ev_u, ev_1
        out.local_w = local_w
        out.local_rot = xp.ascontiguousarray(rot_sel)
        out.local_t0 = t0
        out.pairs = (bi, ki)
    return out


def score(xc: Any, c2s: Any, refs: RotatedRefs, search: Search, u: float, marginal: bool,
          budget: int | None = None) -> BatchScores:  # fmt: skip
    if search.mode == "fast":
        return score_fast(xc, c2s, refs, search, u, marginal, budget)
    return score_exhaustive(xc, c2s, refs, search, u, marginal)


def broadcast_classes(sc: BatchScores, owner: Any, k: int) -> BatchScores:
    """Scores against one reference (all K references equal, as in the seeding iteration)
    repeated for K classes; the marginal pose weights go to each particle's ``owner``."""
    xp = get_array_module(sc.best)

    def rep(a: Any) -> Any:
        return xp.ascontiguousarray(xp.repeat(a, k, axis=1))

    out = BatchScores(rep(sc.best), rep(sc.ev_u), rep(sc.ev_1), rep(sc.rot), rep(sc.shift),
                      flops=sc.flops, n_fine=sc.n_fine)  # fmt: skip
    if sc.dense_w is not None:  # (B, T, 1, R) -> owner column of (B, T, K, R)
        b, t, _, r = sc.dense_w.shape
        w = xp.zeros((b, t, k, r), xp.float32)
        w[xp.arange(b), :, owner, :] = sc.dense_w[:, :, 0, :]
        out.dense_w = w
    if sc.local_w is not None:
        pb, _ = sc.pairs
        out.local_w, out.local_rot, out.local_t0 = sc.local_w, sc.local_rot, sc.local_t0
        out.pairs = (pb, owner[pb])
    return out
