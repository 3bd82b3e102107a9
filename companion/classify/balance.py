"""Capacity-constrained class assignment (balanced-class mode).

Two solvers over an (N, K) matrix of class scores, for NumPy and CuPy alike (the array module
comes from the input; work is done in row chunks so temporaries stay small):

- :func:`sinkhorn_capped` — soft assignment for the E-step: the class posteriors projected
  (in KL) onto {rows sum to 1, column sums ≤ cap}. Its dual is one log price per class.
- :func:`assign_capped` — final hard labels whose class counts never exceed the cap, with a
  total score within ``N · eps`` of the optimum (an auction over class prices, then an exact
  greedy repair).

Both can return their per-class prices (``return_dual`` / ``return_prices``). The Sinkhorn
prices warm-start the next call (online EM re-uses them across mini-batches: prices are per
class, not per particle).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from companion.classify.backend import (
    get_array_module,
    host_bool,
    host_float,
    host_int,
    to_device,
    to_host,
)

log = logging.getLogger(__name__)

#: the auction may always evaluate this many scores, whatever ``max_work`` says
_MIN_WORK = 4e8
#: auction rounds allowed: this many per class plus the minimum
_ROUNDS_PER_CLASS = 20
_ROUNDS_MIN = 200
#: most a class price moves in one Newton step of the capped Sinkhorn, in units of the
#: temperature (exp(-TRUST) ~ 1e-13: beyond it the step changes no weight any more)
TRUST = 30.0
#: elements per row chunk (NumPy / CuPy); bounds the temporaries of every pass.
_CHUNK_ELEMS = {"numpy": 1 << 21, "cupy": 1 << 25}


def _chunk_rows(xp: Any, k: int) -> int:
    return max(1, _CHUNK_ELEMS["cupy" if xp.__name__ == "cupy" else "numpy"] // max(k, 1))


def _caps_array(xp: Any, caps: Any, k: int, dtype: Any) -> Any:
    c = xp.asarray(caps, dtype=dtype)
    if c.ndim == 0:
        c = xp.ascontiguousarray(xp.broadcast_to(c, (k,)))  # no host round trip
    if c.shape != (k,):
        raise ValueError(f"caps must be a scalar or have shape ({k},), got {tuple(c.shape)}")
    return c


# ----------------------------------------------------------------------------------- soft


def sinkhorn_capped(
    log_post: Any,
    caps: Any,
    n_iter: int = 50,
    tol: float = 1e-3,
    *,
    dual: Any = None,
    return_dual: bool = False,
) -> Any:
    """Soft class weights with rows summing to 1 and column sums at most ``caps``.

    Solves ``min_W KL(W ‖ Q)`` over ``{W ≥ 0, W·1 = 1, 1ᵀW ≤ caps}`` where
    ``Q = softmax(log_post)`` row-wise (uniform class priors). The solution is
    ``W_ik = exp(L_ik − a_i − b_k)`` with row normalisers ``a_i = logsumexp_k(L_ik − b_k)`` and
    class prices ``b ≥ 0`` that are zero for classes under their cap: ``b`` minimises the
    convex dual ``g(b) = Σ_i a_i(b) + Σ_k cap_k b_k`` over ``b ≥ 0`` (gradient ``cap − 1ᵀW``,
    Hessian ``diag(1ᵀW) − WᵀW``, a K×K GEMM). Algorithm, all in the log domain:

    - Sinkhorn/IPF scaling with the column step clipped at zero — ``a`` by the row
      normalisation, then ``b_k ← max(0, b_k + log(Σ_i W_ik / cap_k))``, i.e. only overfull
      columns are scaled down — is exact block-coordinate descent on ``g`` and converges, but
      slowly when posteriors are peaked. So each step here is a projected Newton step on ``g``
      (free classes: priced or overfull), backtracked along the projected arc until the slope
      of ``g`` at the new point along the step is ≤ 0, which by convexity proves descent
      (column sums are accurate where float32 values of ``g`` are not), with the Sinkhorn
      column step as the fallback when the Newton direction does not descend.
    - ε-scaling: the prices are solved first for tempered copies ``L / T``, ``T`` falling by
      4× from a quarter of the largest row spread to 1, each level warm-starting the next.
    - Stop when every column is within ``(1 + tol)·cap`` and every priced column within
      ``(1 − tol)·cap``, or after ``n_iter`` steps at ``T = 1``. A last rounding step
      (Altschuler et al. 2017) makes the constraints exact: overfull columns are scaled down to
      their cap and each row's missing mass is spread over the classes with room, in
      proportion to their room. ``W_ik ≤ 1`` after the row step, so nothing overflows however
      peaked the posteriors.

    Args:
        log_post: (N, K) float array, unnormalised log posteriors (``-inf`` = impossible).
        caps: (K,) or scalar, the most weight each class may hold (may be fractional, e.g.
            scaled to a mini-batch); ``sum(caps) ≥ N``.
        n_iter: most steps at the final temperature.
        tol: relative tolerance on the column sums before the final rounding.
        dual: (K,) class prices ``b`` to start from (e.g. the previous mini-batch's): solved
            at T = 1 directly, falling back to the ε-scaling levels from zero if that does not
            converge. All-zero prices count as a cold start.
        return_dual: also return the final prices (float64, on the input's device).

    Returns:
        (N, K) weights in the input's float dtype (and the prices with ``return_dual``).
    """
    xp = get_array_module(log_post)
    L = log_post
    if L.ndim != 2:
        raise ValueError("log_post must be an (N, K) array")
    n, k = L.shape
    dtype = np.dtype(L.dtype if L.dtype in (np.float32, np.float64) else np.float64)
    caps = _caps_array(xp, caps, k, np.float64)
    if host_bool(xp.any(caps < 0)) or host_float(caps.sum()) < n * (1 - 1e-9):
        raise ValueError(f"caps must be ≥ 0 with sum ≥ {n}, got sum {host_float(caps.sum()):.6g}")
    shut = caps <= 0
    b = xp.zeros(k, dtype=np.float64) if dual is None else xp.asarray(dual, np.float64).copy()
    b = xp.where(shut, xp.inf, xp.maximum(b, 0))
    rows = _chunk_rows(xp, k)
    solver = _CappedDual(xp, L, caps, dtype, rows)
    if not host_bool(xp.all(caps >= n)):
        ok = False
        warm = host_bool(xp.any(xp.isfinite(b) & (b > 0)))  # all-zero prices: a cold start
        if warm:  # a few steps: a warm start that is close converges fast or not at all
            b, ok = solver.solve(b, 1.0, tol, min(n_iter, 8))
        if not ok:  # cold, or the warm start did not converge: ε-scaling from zero
            b = xp.where(shut, xp.inf, 0.0)
            t = _max_row_spread(xp, L, rows) / 4.0
            while t > 2.0:
                b, _ = solver.solve(b, t, max(tol, 0.05), 8)
                t /= 4.0
            b, ok = solver.solve(b, 1.0, tol, n_iter)
            if not ok:
                log.debug("sinkhorn_capped: not converged to tol=%g in %d steps", tol, n_iter)
    else:
        b = xp.where(shut, xp.inf, 0.0)
    out = xp.empty((n, k), dtype=dtype)
    col = solver.sweep(b, 1.0, out=out)[0]
    _round_to_caps(xp, out, col, caps, L)
    return (out, b) if return_dual else out


def sinkhorn_capped_blocks(
    log_post: Any,
    caps: float | np.ndarray,
    blocks: list[tuple[Any, int, int]],
    *,
    dual: Any = None,
    n_iter: int = 50,
    tol: float = 1e-3,
    return_dual: bool = False,
) -> Any:
    """:func:`sinkhorn_capped` of a block-diagonal problem, with caps each block can meet.

    ``blocks``: ``[(rows, k0, k1), …]`` (rows: device indices; every row in one block; the
    list :func:`companion.classify.score.score` takes as ``segments``): the
    rows of a block may only go to classes ``k0 … k1-1`` (``log_post`` is ``-inf``
    elsewhere), as in ``--subclassify``, where a particle only goes to its parent's
    sub-classes. A class's column then holds only its block's rows, so the blocks do not
    couple, and a block whose caps cannot hold its rows (a mini-batch that drew more of one
    parent than its classes' share) would make the whole problem infeasible: its caps are
    raised in proportion until they just hold them. Solved as one problem (its Hessian is
    block-diagonal; measured faster than one solve per block, which pays the solver's fixed
    cost per block). ``caps``: host scalar or (K,). Classes of no block get no weight and
    keep their price in ``dual``.
    """
    xp = get_array_module(log_post)
    k = log_post.shape[1]
    c = np.array(np.broadcast_to(np.asarray(caps, np.float64), (k,)))
    seen = np.zeros(k, bool)
    for rows, k0, k1 in blocks:
        nb = int(rows.shape[0])
        if nb == 0:
            continue
        seen[k0:k1] = True
        tot = c[k0:k1].sum()
        if tot < nb:
            c[k0:k1] = c[k0:k1] * (nb / tot) if tot > 0 else nb / (k1 - k0)
    w, b = sinkhorn_capped(log_post, to_device(c, xp), n_iter, tol, dual=dual, return_dual=True)
    if dual is not None and not seen.all():  # no rows, no information: the old price
        keep = to_device(~seen, xp)
        b = xp.where(keep, xp.asarray(dual, np.float64), b)
    return (w, b) if return_dual else w


class _CappedDual:
    """The dual ``g(b)`` of the capped KL projection at temperature T, evaluated in chunks."""

    def __init__(self, xp: Any, L: Any, caps: Any, dtype: Any, rows: int) -> None:
        self.xp, self.L, self.caps, self.dtype, self.rows = xp, L, caps, dtype, rows
        self.k = L.shape[1]
        self.floor = -80.0 if dtype == np.float32 else -700.0

    def sweep(self, b: Any, temp: float, out: Any = None, hess: bool = False) -> tuple:
        """(column sums, Hessian of g or None) at prices ``b`` (in units of L / temp)."""
        xp, k = self.xp, self.k
        bt = b / temp
        btd = bt.astype(self.dtype)
        col = xp.zeros(k, dtype=np.float64)
        hmat = xp.zeros((k, k), dtype=np.float64) if hess else None
        for s in range(0, self.L.shape[0], self.rows):
            m = self.L[s : s + self.rows].astype(self.dtype, copy=False) / self.dtype.type(temp)
            m = m - btd
            mx = m.max(axis=1, keepdims=True)
            dead = ~xp.isfinite(mx)  # no open class with a finite score: spread evenly
            if host_bool(dead.any()):
                m = xp.where(dead, xp.where(xp.isfinite(btd), 0, -xp.inf).astype(m.dtype), m)
                mx = xp.where(dead, 0, mx)
            m -= mx
            m[m < self.floor] = -xp.inf  # exp would be subnormal (slow) and is negligible
            xp.exp(m, out=m)
            z = m.sum(axis=1, keepdims=True)
            m /= z
            col += m.sum(axis=0, dtype=np.float64)
            if hess:
                w = m[~dead[:, 0]]  # rows spread evenly do not depend on b
                hmat += (w.T @ w).astype(np.float64)
            if out is not None:
                out[s : s + self.rows] = m
        if hess:
            hmat = xp.diag(col) - hmat
        return col, hmat

    def done(self, b: Any, col: Any, tol: float) -> bool:
        xp, caps = self.xp, self.caps
        over = host_float(xp.max(col - caps * (1 + tol)))
        priced = (b > 0) & (caps > 0)
        slack = host_float(xp.max(xp.where(priced, caps * (1 - tol) - col, -1.0)))
        return over <= 0 and slack <= 0

    def solve(self, b: Any, temp: float, tol: float, n_iter: int) -> tuple[Any, bool]:
        """Projected Newton on g at temperature ``temp`` from prices ``b``.

        Returns the prices and whether the columns are within ``tol`` (see :meth:`done`)."""
        xp, caps = self.xp, self.caps
        open_ = caps > 0
        bt = xp.where(open_, b / temp, xp.inf)
        col, hmat = self.sweep(bt * temp, temp, hess=True)
        alpha = 0.25
        for _ in range(n_iter):
            if self.done(bt, col, tol):
                break
            grad = caps - col
            # free: priced classes, and classes at 0 that want a price (overfull)
            free = open_ & ((bt > 0) | (grad < 0))
            d = xp.zeros_like(grad)
            fi = xp.nonzero(free)[0]
            if fi.shape[0]:
                h = hmat[xp.ix_(fi, fi)]
                h = h + xp.eye(fi.shape[0]) * (1e-9 * host_float(xp.trace(h)) / fi.shape[0] + 1e-12)
                d[fi] = -xp.linalg.solve(h, grad[fi])
            base = xp.where(open_, bt, 0.0)
            accepted = False
            alpha = min(1.0, 4.0 * alpha)  # near-hard posteriors: steps stay short
            # trust region: a nearly singular Hessian (near-hard rows) gives a huge step that
            # 20 halvings would not bring back; no price needs to move by more than TRUST
            # (in units of the temperature) in one step
            big = host_float(xp.abs(d).max())
            if big * alpha > TRUST:
                alpha = TRUST / big
            first = alpha
            for _ in range(20):  # backtracking along the projected arc
                cand = xp.where(open_, xp.maximum(base + alpha * d, 0.0), xp.inf)
                step = xp.where(open_, cand, 0.0) - base
                if host_float((grad * step).sum()) >= 0:
                    break  # not a descent direction
                col2, h2 = self.sweep(cand * temp, temp, hess=alpha == first)
                # g is convex, so g(cand) ≤ g(base) + ∇g(cand)·step: a non-positive slope at
                # the candidate proves descent, and column sums are accurate where g's
                # float32 value is not
                if host_float(((caps - col2) * step)[open_].sum()) <= 0:
                    accepted = True
                    if h2 is None:
                        col2, h2 = self.sweep(cand * temp, temp, hess=True)
                    break
                alpha *= 0.5
            if not accepted:  # Sinkhorn column step: exact descent on g for the columns
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = xp.log(col / caps)
                cand = xp.where(
                    open_, xp.maximum(base + xp.nan_to_num(ratio, neginf=-1e30), 0), xp.inf
                )
                col2, h2 = self.sweep(cand * temp, temp, hess=True)
                alpha = 0.25
            bt, col, hmat = cand, col2, h2
        return xp.where(open_, bt * temp, xp.inf), self.done(bt, col, tol)


def _round_to_caps(xp: Any, w: Any, col: Any, caps: Any, L: Any) -> None:
    """In place: column sums ≤ caps (to 1e-6 relative) and rows summing to 1 (Altschuler et
    al. 2017).

    A row's missing mass goes to the classes with room in proportion to their room; where
    ``L`` forbids classes (``-inf``), first only to the classes with room that the row may
    go to: exact for block-diagonal ``L`` (:func:`sinkhorn_capped_blocks`). Where that
    overfills a class (other ``-inf`` patterns), the excess is spread over all classes with
    room, which always fits."""
    if not host_bool((col > caps).any()):
        return
    passes = (True, False) if host_bool(xp.isinf(L).any()) else (False,)
    for restricted in passes:
        over = col > caps
        if not host_bool(over.any()):
            return
        scale = xp.where(over, caps / xp.maximum(col, 1e-300), 1.0).astype(w.dtype)
        w *= scale
        room = xp.maximum(caps - w.sum(axis=0, dtype=np.float64), 0.0)
        missing = xp.maximum(1.0 - w.sum(axis=1, dtype=np.float64), 0.0)
        tot = host_float(room.sum())
        if tot <= 0:
            return
        if not restricted:
            w += (missing[:, None] * (room / tot)[None, :]).astype(w.dtype)
            return
        rows = _chunk_rows(xp, w.shape[1])
        for s in range(0, w.shape[0], rows):
            share = xp.where(xp.isfinite(L[s : s + rows]), room[None, :], 0.0)
            d = share.sum(axis=1, keepdims=True)
            share = xp.where(d > 0, share / xp.where(d > 0, d, 1.0), (room / tot)[None, :])
            w[s : s + rows] += (missing[s : s + rows, None] * share).astype(w.dtype)
        # float32 sums of exactly-filled columns may land a hair above the cap
        col = w.sum(axis=0, dtype=np.float64) * (1.0 - 1e-6)


def _max_row_spread(xp: Any, L: Any, rows: int, sample: int = 50000) -> float:
    """Largest (max − min) over the finite entries of a row (up to ``sample`` rows; ≥ 1)."""
    n = L.shape[0]
    if n > sample:
        L = L[xp.linspace(0, n - 1, sample).astype(np.int64)]
    best = 1.0
    for s in range(0, L.shape[0], rows):
        m = L[s : s + rows]
        fin = xp.isfinite(m)
        hi = xp.where(fin, m, -xp.inf).max(axis=1)
        lo = xp.where(fin, m, xp.inf).min(axis=1)
        d = hi - lo
        d = d[xp.isfinite(d)]
        if d.size:
            best = max(best, host_float(d.max()))
    return best


def _top2(xp: Any, s: Any, p: Any, idx: Any, exclude: Any, rows: int) -> tuple[Any, Any, Any]:
    """Best class, its value and the runner-up value of ``s[idx] − p`` (``exclude`` masked).

    ``idx`` None means all rows. Values are float64; ``-inf`` where no class is left.
    """
    n = s.shape[0] if idx is None else int(idx.shape[0])
    j1 = xp.empty(n, dtype=np.int64)
    v1 = xp.empty(n, dtype=np.float64)
    v2 = xp.empty(n, dtype=np.float64)
    pd = p.astype(s.dtype)
    for a in range(0, n, rows):
        sl = slice(a, min(a + rows, n))
        t = (s[sl] if idx is None else s[idx[sl]]) - pd
        r = xp.arange(t.shape[0])
        if exclude is not None:
            t[r, exclude[sl]] = -xp.inf
        j = t.argmax(axis=1)
        j1[sl] = j
        v1[sl] = t[r, j]
        t[r, j] = -xp.inf
        v2[sl] = t.max(axis=1)
    return j1, v1, v2


def assign_capped(
    scores: Any,
    cap: Any,
    *,
    eps: float | None = None,
    max_work: float = 10.0,
    return_prices: bool = False,
) -> Any:
    """Hard labels maximising the total score with at most ``cap[k]`` rows in class k.

    Forward auction over class prices ``p ≥ 0`` (Bertsekas' auction for similar objects,
    Jacobi form). Every row holds its best class ``argmax_k (s_ik − p_k)``. Each round, every
    overfull class with excess ``e`` ranks its members by margin (own value minus best other
    value), evicts the ``e`` weakest and raises its price to the weakest stayer's margin plus
    ``eps``; evicted rows take their best class at the new prices (possibly overfilling it:
    next round). Prices only rise, so a class that filled stays full; every row is at its
    best class except stayers within ``eps`` of it. Hence, when no class is overfull,
    ``total ≥ optimum − N·eps`` (LP duality: prices are positive only on full classes).
    A round touches only the rows that may move: each row keeps a lower bound of its margin
    (exact when computed, lowered by its own class's price rises), a per-class histogram of
    the bounds picks the members that may be among the weakest, and only those are ranked and
    re-evaluated.

    Work is bounded: after ``max_work · N`` row evaluations or ``20 K + 200`` rounds (more
    for small problems; rows with alike class preferences cascade through the classes one
    per round, and near-ties start price wars that advance by ``eps``) a greedy repair
    finishes. The repair, also run after a finished auction, is what
    guarantees the cap, by construction: it trims every overfull class to exactly its cap
    (keeping its highest-margin members); then a few rounds place unassigned rows, each row
    proposing to its best few classes that still have room and each class accepting at most
    its remaining room (a row accepted twice keeps its best class); a last sweep over the
    classes with room gives each at most its room from the rows still left, until none is left
    (``sum(cap) ≥ N``: the rooms add up to at least the rows left).

    Args:
        scores: (N, K) float array, higher is better (e.g. log posteriors). ``-inf`` = never,
            unless every class with room is ``-inf`` for that row.
        cap: int or (K,) ints ≥ 0 with ``sum ≥ N``.
        eps: bid increment; default ``1e-3 ×`` the mean finite row spread (max − min).
        max_work: auction budget in row evaluations per row (at least ``4e8 / K`` in all)
            before the repair takes over.
        return_prices: also return the final class prices (float64, ``inf`` for cap 0).

    Returns:
        int64 (N,) labels on the input's device (and the prices with ``return_prices``).
    """
    xp = get_array_module(scores)
    s = scores
    if s.ndim != 2:
        raise ValueError("scores must be an (N, K) array")
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float64)
    n, k = s.shape
    caps = _caps_array(xp, cap, k, np.int64)
    if host_bool(xp.any(caps < 0)) or host_int(caps.sum()) < n:
        raise ValueError(f"caps must be ≥ 0 with sum ≥ {n}, got sum {host_int(caps.sum())}")
    rows = _chunk_rows(xp, k)
    p = xp.where(caps > 0, 0.0, xp.inf)
    spread = _mean_row_spread(xp, s)
    if eps is None:
        eps = 1e-3 * spread
    budget = max(max_work * n, _MIN_WORK / k)  # row evaluations; small problems finish
    # a cascade takes ~K rounds, a price war among near-ties up to ~K·spread/eps; small
    # problems (cheap rounds) may always run to the end
    max_rounds = max(_ROUNDS_PER_CLASS * k + _ROUNDS_MIN, min(int(2e7 / (n * k)), 2000 * k))

    labels, v1, v2 = _top2(xp, s, p, None, None, rows)
    labels[~xp.isfinite(v1)] = -1  # no finite open class: left to the repair
    # lower bound on each row's margin (own value − best other value): exact when computed;
    # when the row's own price rises by d it drops by exactly d; when other prices rise the
    # true margin can only grow. Members are re-evaluated only when they might be evicted.
    with np.errstate(invalid="ignore"):  # -inf − -inf: rows with no finite class
        mlb = xp.nan_to_num(v1 - v2, nan=xp.inf, posinf=xp.inf)
    stamp = xp.zeros(n, dtype=np.int64)  # round in which mlb was last made exact
    rounds, work = 0, 0
    while work < budget and rounds < max_rounds:
        counts = xp.bincount(labels[labels >= 0], minlength=k)
        excess = counts - caps
        over = excess > 0
        if not host_bool(over.any()):
            break
        rounds += 1
        members = xp.nonzero((labels >= 0) & over[xp.maximum(labels, 0)])[0]
        lab_m = labels[members]
        grow = 2
        while True:  # until the `excess` weakest members of each class have exact margins
            idx = members[_candidates(xp, lab_m, mlb[members], excess, k, spread)]
            lab = labels[idx]
            lab_s, m_s, idx_s, first, pos = _rank_members(xp, lab, mlb[idx], idx, k)
            out = pos < excess[lab_s]
            if not host_bool((out & (stamp[idx_s] != rounds)).any()):
                break
            # refresh a window beyond the excess too: refreshed margins only grow
            win = pos < excess[lab_s] * grow + 16
            stale = idx_s[win & (stamp[idx_s] != rounds)]
            grow *= 4
            mlb[stale] = _margins(xp, s, p, stale, labels[stale], rows)
            stamp[stale] = rounds
            work += int(stale.shape[0])
        ko = xp.nonzero(over)[0]
        ie = first[ko] + excess[ko]  # the weakest stayer (exists: count > excess when cap ≥ 1)
        stay = m_s[xp.minimum(ie, m_s.shape[0] - 1)]  # a lower bound of its margin
        last = m_s[ie - 1]  # the strongest evicted member's (exact) margin
        # the new price evicts every evicted row: past their margins (a stayer with no other
        # class, margin +inf, would otherwise let the price crawl up by eps)
        step = xp.where(xp.isfinite(stay), stay, xp.where(xp.isfinite(last), last, 0.0))
        step = xp.maximum(step, 0) + eps
        p[ko] += step
        dp = xp.zeros(k, dtype=np.float64)
        dp[ko] = step
        mlb[members] -= dp[lab_m]
        ev, hopeless = idx_s[out], ~xp.isfinite(m_s[out])  # hopeless: no other finite class
        # re-evaluated at the new prices, unmasked: other classes may have raised too, and a row
        # that still prefers its old class keeps it overfull for the next round
        j1, v1, v2 = _top2(xp, s, p, ev, None, rows)
        labels[ev] = xp.where(xp.isfinite(v1) & ~hopeless, j1, -1)
        with np.errstate(invalid="ignore"):
            mlb[ev] = xp.nan_to_num(v1 - v2, nan=xp.inf, posinf=xp.inf)
        work += int(ev.shape[0])
    else:
        log.debug("assign_capped: auction budget spent after %d rounds; repairing", rounds)
    labels = _repair(xp, s, p, labels, caps, rows)
    log.debug("assign_capped: %d auction rounds, %.1f row evaluations per row", rounds, work / n)
    return (labels, p) if return_prices else labels


def _margins(xp: Any, s: Any, p: Any, idx: Any, lab: Any, rows: int) -> Any:
    """Value at the row's own class minus its best other class (``+inf`` if none)."""
    _, vo, _ = _top2(xp, s, p, idx, lab, rows)
    own = s[idx, lab].astype(np.float64) - p[lab]
    with np.errstate(invalid="ignore"):
        return xp.nan_to_num(own - vo, nan=xp.inf, posinf=xp.inf)


def _candidates(
    xp: Any, lab: Any, lb: Any, excess: Any, k: int, scale: float, nb: int = 256
) -> Any:
    """Mask of the members that may be among the ``excess + 1`` weakest of their class.

    A per-class histogram of the margin bounds (bins on a squashed scale) gives the bin
    holding each class's ``excess + 1``-th weakest member; only members up to that bin are
    ranked exactly, so a round costs O(members) instead of a sort of all of them.
    """
    x = lb / scale
    with np.errstate(invalid="ignore"):
        g = 0.5 + 0.5 * x / (1.0 + xp.abs(x))
    g = xp.where(xp.isnan(g), 1.0, g)  # +inf margins
    b = xp.clip((g * nb).astype(np.int64), 0, nb - 1)
    h = xp.bincount(lab * nb + b, minlength=k * nb).reshape(k, nb)
    need = xp.maximum(excess, 0) + 1
    cut = xp.argmax((xp.cumsum(h, axis=1) >= need[:, None]).astype(np.int8), axis=1)
    return b <= cut[lab]


def _rank_members(xp: Any, lab: Any, margin: Any, idx: Any, k: int) -> tuple[Any, ...]:
    """Members sorted by (class, margin); the first index and rank of each within its class."""
    order = xp.lexsort(xp.stack([margin, lab.astype(np.float64)]))
    lab_s = lab[order]
    first = xp.searchsorted(lab_s, xp.arange(k))
    pos = xp.arange(lab_s.shape[0]) - first[lab_s]
    return lab_s, margin[order], idx[order], first, pos


def _mean_row_spread(xp: Any, s: Any, sample: int = 20000) -> float:
    """Mean over (up to ``sample`` evenly spaced) rows of max − min of the finite scores."""
    n = s.shape[0]
    tot, cnt = 0.0, 0
    if n:
        m = s[xp.linspace(0, n - 1, min(n, sample)).astype(np.int64)]
        fin = xp.isfinite(m)
        d = xp.where(fin, m, -xp.inf).max(axis=1) - xp.where(fin, m, xp.inf).min(axis=1)
        d = d[xp.isfinite(d)]
        tot = host_float(d.sum(dtype=np.float64))
        cnt = int(d.shape[0])
    return max(tot / cnt, 1e-12) if cnt and tot > 0 else 1.0


def _repair(
    xp: Any, s: Any, p: Any, labels: Any, caps: Any, rows: int, q: int = 8, rounds: int = 4
) -> Any:
    """Every class count ≤ cap: trim overfull classes, then place the rest where there is room.

    Placement: a few rounds of proposals (each row to its ``q`` best open classes, each class
    accepting at most its room, a row accepted twice keeping its best); whatever is left
    (rows with identical preferences cascade one class per round) is placed by one greedy
    sweep over the open classes, each taking the rows that lose least by going there.
    """
    n, k = s.shape
    labels = labels.copy()
    counts = xp.bincount(labels[labels >= 0], minlength=k)
    excess = counts - caps
    if host_bool(xp.any(excess > 0)):
        idx = xp.nonzero((labels >= 0) & (excess > 0)[xp.maximum(labels, 0)])[0]
        lab = labels[idx]
        margin = _margins(xp, s, p, idx, lab, rows)
        lab_s, _, idx_s, _, pos = _rank_members(xp, lab, margin, idx, k)
        labels[idx_s[pos < excess[lab_s]]] = -1  # the weakest members leave
    counts = xp.bincount(labels[labels >= 0], minlength=k)
    room = caps - counts  # ≥ 0 for every class from here on
    todo = xp.nonzero(labels < 0)[0]
    pf = xp.where(xp.isfinite(p), p, 0.0)
    for _ in range(rounds):
        if not todo.shape[0]:
            return labels
        if todo.shape[0] > max(n // 20, 1000):
            break  # a flood of rows with alike preferences: proposals would crawl
        cls, val, rank = _proposals(
            xp, s, pf, room > 0, todo, min(q, host_int((room > 0).sum())), rows
        )
        m = todo.shape[0]
        qq = cls.shape[1]
        cls, val, rank = cls.ravel(), val.ravel(), rank.ravel()
        who = xp.repeat(xp.arange(m), qq)
        # each class tentatively accepts its best proposals up to its room
        order = xp.lexsort(xp.stack([-val, cls.astype(np.float64)]))
        c_s = cls[order]
        pos = xp.arange(c_s.shape[0]) - xp.searchsorted(c_s, xp.arange(k))[c_s]
        acc = order[pos < room[c_s]]
        # a row accepted by several classes keeps its best-ranked one
        acc = acc[xp.lexsort(xp.stack([rank[acc].astype(np.float64), who[acc]]))]
        w = who[acc]
        keep = xp.ones(w.shape[0], dtype=bool)
        keep[1:] = w[1:] != w[:-1]
        acc = acc[keep]
        labels[todo[who[acc]]] = cls[acc]
        room -= xp.bincount(cls[acc], minlength=k)
        left = xp.ones(m, dtype=bool)
        left[who[acc]] = False
        todo = todo[left]
    if todo.shape[0]:
        labels[todo] = _sweep_fill(xp, s, pf, room, todo, rows)
    return labels


def _sweep_fill(xp: Any, s: Any, p: Any, room: Any, todo: Any, rows: int) -> Any:
    """Greedy fill: open classes in order of demand each take the rows losing least there."""
    k = s.shape[1]
    open_ = room > 0
    best, val, _ = _top2(xp, s, p - xp.where(open_, 0.0, -xp.inf), todo, None, rows)
    fin = xp.isfinite(val)
    lo = host_float(val[fin].min()) - 1.0 if host_bool(fin.any()) else 0.0
    val = xp.where(fin, val, lo)
    demand = xp.bincount(best, minlength=k) * open_
    out = xp.full(todo.shape[0], -1, dtype=np.int64)
    free = xp.ones(todo.shape[0], dtype=bool)
    left = int(todo.shape[0])
    for c in np.argsort(-to_host(demand), kind="stable").tolist():
        r = min(host_int(room[c]), left)
        if r <= 0:
            continue
        loss = val - (s[todo, c].astype(np.float64) - p[c])
        loss = xp.where(xp.isfinite(loss), loss, 1e300)  # a -inf class: only if nothing else
        loss = xp.where(free, loss, xp.inf)  # taken rows: never picked (r ≤ free rows)
        pick = xp.argsort(loss)[:r] if r == left else xp.argpartition(loss, r - 1)[:r]
        out[pick] = c
        free[pick] = False
        left -= r
        if left == 0:
            break
    return out


def _proposals(
    xp: Any, s: Any, p: Any, open_: Any, todo: Any, q: int, rows: int
) -> tuple[Any, Any, Any]:
    """Each row's ``q`` best open classes: (classes, values, rank 0 = best), shape (m, q).

    ``-inf`` scores of open classes become a floor below every finite value, so a row can
    always go to an open class.
    """
    m, k = todo.shape[0], s.shape[1]
    cls = xp.empty((m, q), dtype=np.int64)
    val = xp.empty((m, q), dtype=np.float64)
    shut = xp.where(open_, 0.0, -xp.inf)
    for a in range(0, m, rows):
        t = s[todo[a : a + rows]].astype(np.float64) - p
        fin = xp.isfinite(t)
        lo = host_float(t[fin].min()) - 1.0 if host_bool(fin.any()) else 0.0
        t = xp.where(fin, t, lo) + shut
        j = xp.argpartition(t, k - q, axis=1)[:, k - q :]
        cls[a : a + rows] = j
        val[a : a + rows] = xp.take_along_axis(t, j, axis=1)
    rank = xp.argsort(xp.argsort(-val, axis=1), axis=1)
    return cls, val, rank
