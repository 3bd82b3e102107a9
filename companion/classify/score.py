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

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from companion.classify import fourier as fo
from companion.classify.backend import (
    get_array_module,
    is_cupy,
    matmul_precision,
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
    tf32: bool = False  # TF32 tensor-core matmuls for the coarse GEMMs (CuPy only)
    _coarse_ph: dict = field(default_factory=dict)  # fc -> (Tc, fc) coarse phase ramps

    @property
    def n_shift(self) -> int:
        return int(self.shifts.shape[0])

    @classmethod
    def create(cls, geom: fo.Geometry, psi_step: float, max_shift: float, shift_step: float,
               mode: str, xp: Any, tf32: bool = False) -> Search:  # fmt: skip
        n_rot = max(1, int(round(360.0 / psi_step)))
        radius = max_shift * geom.work_box
        shifts = fo.shift_grid(radius, shift_step)
        t_px = shifts * shift_step
        phases = fo.phase_ramps(t_px, geom, xp=xp)
        s = cls(mode, n_rot, shifts, float(shift_step), float(radius), phases, tf32=bool(tf32))
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

    def coarse_phases(self, fc: int) -> Any:
        """Phase ramps of the coarse shifts at the first ``fc`` coefficients (Tc, fc),
        gathered once per resolution limit."""
        if fc not in self._coarse_ph:
            ph = self.phases[self.coarse_shift_idx, :fc]
            self._coarse_ph[fc] = get_array_module(ph).ascontiguousarray(ph)
        return self._coarse_ph[fc]

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


#: bytes of one coarse block's score tile (particles × shifts × classes × rotations) and of
#: one fine chunk's gathered reference rows on the CPU: small enough to stay in the cache
#: while the GEMM writes the tile and the subtraction and the max/argmax read it back
CPU_TILE_BYTES = 4 << 20
#: the same on a GPU (where the tile lives in device memory, the bound is the batch budget)
GPU_TILE_BYTES = 256 << 20


def tile_bytes(xp: Any, budget: int | None = None) -> int:
    """Bytes of one cache-sized working tile on the device of ``xp`` (at most ``budget``)."""
    cap = GPU_TILE_BYTES if is_cupy(xp) else CPU_TILE_BYTES
    return int(min(cap, budget)) if budget else cap


def coarse_best(xc: Any, c2s: Any, refs: RotatedRefs, search: Search, budget: int | None = None,
                segments: Any = None) -> tuple[Any, Any, Any]:  # fmt: skip
    """The coarse pass: for every particle and class the best coarse score and its pose.

    Blocked over particles and classes: each block's (b·Tc, k·Rc) score tile is one GEMM,
    the quadratic term (b, k·Rc) is subtracted in place and the tile reduced to its
    max/argmax over (shift, rotation) before the next block, so the (B·Tc, K·Rc) tensor of
    the whole batch is never held. Returns ``best`` (B, K) float32, the coarse shift (index
    into ``search.coarse_shift_idx``) and the coarse rotation (index into the coarse
    rotations), both int32. Ties go to the lowest rotation, then the lowest shift.
    ``segments``: ``[(rows, k0, k1), …]`` (rows: particle indices on the device): score
    those particles against classes ``k0:k1`` only (``--subclassify``: a parent's
    sub-classes); every other (particle, class) gets -inf.
    """
    xp = get_array_module(xc)
    b = xc.shape[0]
    k = refs.A.shape[0]
    if segments is None:
        return _coarse_range(xc, c2s, refs, search, budget, 0, k)
    best = xp.full((b, k), -np.inf, xp.float32)
    tbest = xp.zeros((b, k), xp.int32)
    rbest = xp.zeros((b, k), xp.int32)
    for rows, k0, k1 in segments:
        bb, tt, rr = _coarse_range(xc[rows], c2s[rows], refs, search, budget, k0, k1)
        best[rows, k0:k1] = bb
        tbest[rows, k0:k1] = tt
        rbest[rows, k0:k1] = rr
    return best, tbest, rbest


def segments_mask(segments: Any, b: int, k: int, xp: Any) -> Any:
    """(B, K) bool on the device of ``xp``: True where :func:`coarse_best`'s ``segments``
    let a particle go (its rows × its class range)."""
    mask = xp.zeros((b, k), dtype=bool)
    for rows, k0, k1 in segments:
        mask[rows, k0:k1] = True
    return mask


def _coarse_range(xc: Any, c2s: Any, refs: RotatedRefs, search: Search, budget: int | None,
                  ka: int, kz: int) -> tuple[Any, Any, Any]:  # fmt: skip
    """:func:`coarse_best` of all particles of ``xc`` against classes ``ka:kz``."""
    xp = get_array_module(xc)
    b = xc.shape[0]
    fc = refs.fc
    rc = refs.coarse.shape[0] // refs.A.shape[0]
    k = kz - ka
    cidx = search.coarse_shift_idx
    tc = int(cidx.shape[0])
    ph = search.coarse_phases(fc)  # (Tc, Fc)
    quad = (c2s[:, :fc] @ refs.coarse_power[ka * rc : kz * rc].T) * np.float32(0.5)  # (B, k*Rc)
    best = xp.empty((b, k), xp.float32)
    tbest = xp.empty((b, k), xp.int32)
    rbest = xp.empty((b, k), xp.int32)
    tile = tile_bytes(xp, budget)
    # classes per block: all K when the tile of enough particles for ~256 GEMM rows fits
    n_min = -(-256 // tc)
    kb = max(1, min(k, tile // (4 * n_min * tc * rc)))
    pb = max(1, min(b, tile // (4 * tc * kb * rc), tile // (8 * tc * fc)))
    with matmul_precision(xp, search.tf32):
        for s in range(0, b, pb):
            e = min(b, s + pb)
            n = e - s
            y = f32view(xc[s:e, None, :fc] * ph[None]).reshape(n * tc, 2 * fc)
            for k0 in range(0, k, kb):
                k1 = min(k, k0 + kb)
                m = k1 - k0
                ll = (y @ refs.coarse[(ka + k0) * rc : (ka + k1) * rc].T).reshape(n, tc, m * rc)
                ll -= quad[s:e, None, k0 * rc : k1 * rc]
                ll = ll.reshape(n, tc, m, rc)
                a1 = ll.argmax(axis=3)  # (n, Tc, m) best rotation per shift
                m1 = xp.take_along_axis(ll, a1[..., None], axis=3)[..., 0]
                t1 = m1.argmax(axis=1)  # (n, m)
                best[s:e, k0:k1] = xp.take_along_axis(m1, t1[:, None, :], axis=1)[:, 0, :]
                tbest[s:e, k0:k1] = t1
                rbest[s:e, k0:k1] = xp.take_along_axis(a1, t1[:, None, :], axis=1)[:, 0, :]
    return best, tbest, rbest


def score_fast(xc: Any, c2s: Any, refs: RotatedRefs, search: Search, u: float,
               marginal: bool, budget: int | None = None,
               segments: Any = None) -> BatchScores:  # fmt: skip
    xp = get_array_module(xc)
    b = xc.shape[0]
    k, r, f = refs.A.shape
    fc = refs.fc
    cidx = search.coarse_shift_idx
    tc = int(cidx.shape[0])
    rc = refs.coarse.shape[0] // k
    if TIMINGS is not None:
        synchronize(xp)
    t_lap = time.perf_counter()
    # ---- coarse pass: every class, 2x rotation and shift steps, half resolution
    # (segments: each particle's own classes only; the others are -inf, so the margin is
    # taken over its own classes and the others are never refined)
    best_c, tcb, rcb = coarse_best(xc, c2s, refs, search, budget, segments)
    if segments is None:
        scored = b * k
    else:
        scored = sum(int(rows.shape[0]) * (k1 - k0) for rows, k0, k1 in segments)
    flops = 4.0 * scored * tc * rc * fc + 2.0 * scored * fc * rc
    t_lap = _lap(xp, "coarse", t_lap, flops)
    # ---- significant (particle, class) pairs: coarse score near the particle's best
    gap = best_c.max(axis=1, keepdims=True) - best_c  # (B, K) >= 0
    sig = gap <= np.float32(COARSE_MARGIN * u)
    bi, ki = xp.nonzero(sig)
    n_pairs = int(bi.shape[0])
    # ---- fine pass around the best coarse pose of each significant pair
    offs = search.rot_offsets
    j = int(offs.shape[0])
    rc_pair = rcb[bi, ki]
    if j >= r:
        rot_sel = xp.broadcast_to(xp.arange(r, dtype=xp.int32)[None, :], (n_pairs, r))
        j = r
    else:
        rot_sel = ((2 * rc_pair[:, None] + offs[None, :]) % r).astype(xp.int32)  # (P, J)
    t0 = cidx[tcb[bi, ki]]  # (P,) index into shifts
    shifts, local = search.shifts_dev, search.local_dev
    nd = local.shape[0]
    cand = search.shift_index(shifts[t0][:, None, :] + local[None])  # (P, n_d)
    fine, jbest, dbest, s1_all, su_all, local_w = _fine_pass(
        xc, c2s, refs, search, u, marginal, budget, bi, ki, rot_sel, t0, cand, rc_pair
    )
    fine_flop = 4.0 * n_pairs * j * f * nd + 2.0 * n_pairs * j * 2 * f
    flops += fine_flop
    _lap(xp, "fine", t_lap, fine_flop)
    # insignificant pairs: coarse pose, score extrapolated from the coarse gap (never used
    # for weights — their posterior is negligible — but ordered, for capped assignment)
    ratio = np.float32(f / max(fc, 1))
    top = xp.zeros(b, xp.float32)
    is_top = gap[bi, ki] == 0
    top[bi[is_top]] = fine[is_top]
    best = top[:, None] - gap * ratio
    best[bi, ki] = fine
    rot = (2 * rcb) % r
    shift = cidx[tcb].astype(xp.int32)
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


#: on the CPU, refined pairs that share a class and a rotation window (at least this many)
#: are scored as one GEMM against that window's shifted reference rows (J·n_d columns)
#: instead of one product per pair. 16, measured (1000 particles, K 24, 6 Å, one OpenBLAS
#: thread on an AVX-512 Xeon): with 8 the GEMMs of 8-15 rows made the fine pass 1.17 s
#: instead of 0.85 s at 250 particles per batch; at 1000 per batch 16 and 8 tie (0.63 s),
#: 32 is 0.69 s and no grouping 0.83 s
GROUP_MIN = 16


def _fine_pass(xc: Any, c2s: Any, refs: RotatedRefs, search: Search, u: float, marginal: bool,
               budget: int | None, bi: Any, ki: Any, rot_sel: Any, t0: Any, cand: Any,
               rc_pair: Any) -> tuple:  # fmt: skip
    """Full-resolution scores of the (P) significant pairs around their coarse best pose.

    The pairs are processed grouped by reference (class, then coarse rotation), so each
    reference row is read from memory once. On the CPU a group of ≥ ``GROUP_MIN`` pairs with
    the same rotation window is one GEMM: the particles at their coarse shifts (g, 2F) × the
    window's rows times each local phase ramp (2F, J·n_d). Other pairs go in cache-sized
    chunks: each pair's J rows times the conjugate particle, × the local ramps (2F, n_d).
    The quadratic term comes from one (B, K·R) GEMM when the pairs use enough of it
    (``QUAD_TABLE_RATIO``; at steady state nearly every pair is refined), otherwise from
    the scored rotations only. Results are in the pairs' own order.
    """
    xp = get_array_module(xc)
    k, r, f = refs.A.shape
    n_pairs = int(bi.shape[0])
    j = int(rot_sel.shape[1])
    nd = int(search.local_dev.shape[0])
    res = _FineResults(xp, n_pairs, j, nd, marginal, u)
    if n_pairs == 0:
        return res.out()
    keys = ki.astype(xp.int64) * r + rc_pair
    order = xp.argsort(keys, kind="stable")
    with _one_blas_thread(xp):
        return _fine_loops(xc, c2s, refs, search, budget, bi, ki, rot_sel, t0, cand, res,
                           order, keys)  # fmt: skip


@contextlib.contextmanager
def _one_blas_thread(xp: Any) -> Iterator[None]:
    """On the CPU, the fine pass's many small GEMMs on one BLAS thread: measured on the
    shared 2-core VM, two OpenBLAS threads made them 3–20× slower in wall time (each small
    product waits for the second thread), one thread was as fast in CPU time."""
    if is_cupy(xp):
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _fine_loops(xc: Any, c2s: Any, refs: RotatedRefs, search: Search, budget: int | None,
                bi: Any, ki: Any, rot_sel: Any, t0: Any, cand: Any, res: _FineResults,
                order: Any, keys: Any) -> tuple:  # fmt: skip
    xp = get_array_module(xc)
    k, r, f = refs.A.shape
    n_pairs = int(bi.shape[0])
    j = int(rot_sel.shape[1])
    nd = int(search.local_dev.shape[0])
    phases = search.phases[:, :f]
    a_rows = refs.A.reshape(k * r, f)
    c2half = c2s[:, :f] * np.float32(0.5)
    quad_all = _quad_table(c2half, refs, n_pairs * j, budget)
    rest = order
    if not is_cupy(xp):
        ks = keys[order]
        starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
        ends = np.r_[starts[1:], n_pairs]
        big = (ends - starts) >= GROUP_MIN
        plus = np.conj(search.local_adj[:, : 2 * f].view(np.complex64))  # (n_d, F) e^{+2πi k·d}
        for s, e in zip(starts[big].tolist(), ends[big].tolist(), strict=True):
            o = order[s:e]
            a = a_rows[ki[o[0]] * r + rot_sel[o[0]]]  # (J, F): the window's rows, read once
            w = a[:, None, :] * plus[None]  # (J, n_d, F)
            q = xc[bi[o], :f] * phases[t0[o]]  # (g, F) particles at their coarse shifts
            ll = (f32view(q) @ f32view(w).reshape(j * nd, 2 * f).T).reshape(e - s, j, nd)
            if quad_all is None:
                quad = c2half[bi[o]] @ refs.power[ki[o[0]] * r + rot_sel[o[0]]].T  # (g, J)
            else:
                quad = quad_all[bi[o][:, None], ki[o[0]] * r + rot_sel[o[0]]]
            ll -= quad[:, :, None]
            res.add(o, ll, cand)
        rest = order[np.repeat(~big, ends - starts)]
    # ½·C²/sigma², interleaved like the float32 view of a complex row: (B, 2F)
    c2h = xp.repeat(c2half, 2, axis=1) if quad_all is None else None
    per = j * f * 8 * (3 if quad_all is None else 2) + j * nd * 4 * 3 + f * 8 * 2
    # at least FINE_ROWS GEMM rows per chunk: a thinner GEMM against the (2F, n_d) ramps
    # spends its time packing them (measured: 19 pairs per chunk 0.30 s, 80 pairs 0.25 s)
    chunk = max(1, tile_bytes(xp, budget) // per, -(-FINE_ROWS // j))
    cross = search.local_cross[: 2 * f]
    n_rest = int(rest.shape[0])
    for s in range(0, n_rest, chunk):
        o = rest[s : s + chunk]
        n = int(o.shape[0])
        pb = bi[o]
        q = xc[pb, :f] * phases[t0[o]]  # particle at its coarse best shift (n, F)
        rows = ki[o][:, None] * r + rot_sel[o]  # (n, J)
        z = xp.take(a_rows, rows.reshape(-1), axis=0)
        if quad_all is None:
            zf = f32view(z).reshape(n, j, 2 * f)
            quad = xp.matmul(zf * zf, c2h[pb][:, :, None])  # (n, J, 1): ½ Σ C²/σ² |A|²
        else:
            quad = quad_all[pb[:, None], rows][:, :, None]
        z = z.reshape(n, j, f)
        z *= xp.conj(q)[:, None, :]
        ll = (f32view(z).reshape(n * j, 2 * f) @ cross).reshape(n, j, nd)
        ll -= quad
        res.add(o, ll, cand)
    return res.out()


#: the fine pass takes the quadratic term of its pairs from one (B, K·R) GEMM when that
#: computes at most this many times the entries the pairs use: on one AVX-512 OpenBLAS
#: thread the GEMM ran at ~130 GFLOP/s and the per-pair products at 2–4 (1000 particles,
#: K 24, 6 Å, every pair refined: the quadratic term took 0.19 s per pass from the pairs'
#: products, 0.04 s as a table)
QUAD_TABLE_RATIO = 24
#: GEMM rows (pairs × J rotations) of one fine chunk at least
FINE_ROWS = 256


def _quad_table(c2half: Any, refs: RotatedRefs, n_used: int, budget: int | None) -> Any:
    """½ Σ_f (C²/σ²)_bf |A_krf|² for every particle and (class, rotation), (B, K·R), or
    None when the pairs' ``n_used`` entries are too few for the GEMM to pay (or its table
    would take more than a quarter of ``budget``)."""
    b = int(c2half.shape[0])
    kr = int(refs.power.shape[0])
    cap = (budget or work_budget(get_array_module(c2half))) // 4
    if b * kr > QUAD_TABLE_RATIO * max(n_used, 1) or 4 * b * kr > cap:
        return None
    return c2half @ refs.power.T


class _FineResults:
    """The fine pass's per-pair outputs, filled chunk by chunk (``add``)."""

    def __init__(self, xp: Any, n_pairs: int, j: int, nd: int, marginal: bool, u: float) -> None:
        self.xp, self.nd, self.marginal, self.u = xp, nd, marginal, u
        self.fine = xp.empty(n_pairs, xp.float32)
        self.jbest = xp.empty(n_pairs, xp.int32)
        self.dbest = xp.empty(n_pairs, xp.int32)
        self.s1 = self.su = self.local_w = None
        if marginal:
            self.s1 = xp.empty(n_pairs, xp.float32)
            self.su = xp.empty(n_pairs, xp.float32)
            self.local_w = xp.empty((n_pairs, j, nd), xp.float32)

    def add(self, o: Any, ll: Any, cand: Any) -> None:
        """Scores ``ll`` (n, J, n_d) of the pairs ``o``: poses outside the search disc
        excluded, best pose, and (marginal) the normalised pose weights."""
        xp, nd = self.xp, self.nd
        n, j = ll.shape[0], ll.shape[1]
        ll = xp.where((cand[o] < 0)[:, None, :], NEG, ll)
        flat = ll.reshape(n, j * nd)
        arg = flat.argmax(axis=1)
        bst = xp.take_along_axis(flat, arg[:, None], axis=1)[:, 0]
        self.fine[o] = bst
        self.jbest[o] = (arg // nd).astype(xp.int32)
        self.dbest[o] = (arg % nd).astype(xp.int32)
        if self.marginal:
            s1, su = _lse_parts(ll, bst[:, None, None], (1, 2), self.u, keep=True)
            self.local_w[o] = ll
            self.s1[o], self.su[o] = s1, su

    def out(self) -> tuple:
        return self.fine, self.jbest, self.dbest, self.s1, self.su, self.local_w


def score(xc: Any, c2s: Any, refs: RotatedRefs, search: Search, u: float, marginal: bool,
          budget: int | None = None, segments: Any = None) -> BatchScores:  # fmt: skip
    """Scores of a batch against every class. ``segments`` (:func:`coarse_best`'s), or
    None: the classes each particle may go to (``--subclassify``: its parent's sub-classes,
    one contiguous range). The others get score and evidence -inf; the fast search never
    scores them (coarse pass) or refines them, the exhaustive one scores, then masks them."""
    if search.mode == "fast":
        return score_fast(xc, c2s, refs, search, u, marginal, budget, segments)
    out = score_exhaustive(xc, c2s, refs, search, u, marginal)
    if segments is not None:
        xp = get_array_module(xc)
        ok = segments_mask(segments, *out.best.shape, xp)
        ninf = np.float32(-np.inf)
        out.best = xp.where(ok, out.best, ninf)
        out.ev_u = xp.where(ok, out.ev_u, ninf)
        out.ev_1 = xp.where(ok, out.ev_1, ninf)
    return out


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
