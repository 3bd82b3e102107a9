"""The fast search as it was before the blocked coarse pass and the grouped fine pass
(companion 9e88d68): the whole (B·Tc, K·Rc) coarse tensor, the quadratic term as a full
(B, K·R) GEMM at full F, one gather of J reference rows per pair. Kept here, not in the
package, as the slow reference the production code is checked against."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from companion.classify.backend import batch_size, get_array_module
from companion.classify.score import (
    COARSE_MARGIN,
    NEG,
    BatchScores,
    RotatedRefs,
    Search,
    _lse_parts,
    f32view,
)


def score_fast_reference(xc: Any, c2s: Any, refs: RotatedRefs, search: Search, u: float,
               marginal: bool, budget: int | None = None) -> BatchScores:  # fmt: skip
    xp = get_array_module(xc)
    b = xc.shape[0]
    k, r, f = refs.A.shape
    fc = refs.fc
    cidx = search.coarse_shift_idx
    tc = int(cidx.shape[0])
    rc = refs.coarse.shape[0] // k
    phases = search.phases[:, :f]
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
