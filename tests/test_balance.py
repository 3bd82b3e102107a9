"""Capacity-constrained assignment: caps hold, near-optimal totals, Sinkhorn projection."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from companion.classify import balance
from companion.classify.backend import to_host
from companion.classify.balance import (
    _mean_row_spread,
    assign_capped,
    sinkhorn_capped,
    sinkhorn_capped_blocks,
)

# HYPO_EXAMPLES=2000 for a longer search
FAST = settings(
    max_examples=int(os.environ.get("HYPO_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def problems(draw, allow_neginf: bool = True, ties: bool = True):
    """(scores (N, K) float64, caps (K,) int64 with sum ≥ N)."""
    n = draw(st.integers(1, 40))
    k = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["normal", "ties", "peaked", "rowconst"] if ties else ["normal"]))
    if kind == "ties":
        s = rng.integers(0, 3, size=(n, k)).astype(np.float64)
    elif kind == "peaked":
        s = rng.normal(size=(n, k)) * 1000.0
        s[:, 0] += 3000.0  # everyone's favourite
    elif kind == "rowconst":
        s = rng.normal(size=(n, 1)) * 50 + rng.normal(size=(1, k)) + 0.01 * rng.normal(size=(n, k))
    else:
        s = rng.normal(size=(n, k))
    if allow_neginf and draw(st.booleans()):
        s[rng.random((n, k)) < 0.3] = -np.inf
    mode = draw(st.sampled_from(["equal", "exact", "hetero", "loose"]))
    if mode == "exact" or k == 1:  # cap exactly N/K where divisible, else ceil
        caps = np.full(k, -(-n // k), np.int64)
    elif mode == "equal":
        caps = np.full(k, -(-n // k) + draw(st.integers(0, 3)), np.int64)
    elif mode == "hetero":
        w = rng.random(k) + 0.05
        caps = np.floor(w / w.sum() * n).astype(np.int64)
        for _ in range(n - int(caps.sum())):  # sum exactly N
            caps[rng.integers(0, k)] += 1
    else:
        caps = rng.integers(0, n + 1, size=k).astype(np.int64)
        caps[rng.integers(0, k)] += max(0, n - int(caps.sum()))
    assert caps.sum() >= n
    return s, caps


def optimum(s: np.ndarray, caps: np.ndarray) -> float:
    """Exact optimum by linear assignment on the class slots (finite scores)."""
    cols = np.repeat(np.arange(s.shape[1]), caps)
    r, c = linear_sum_assignment(s[:, cols], maximize=True)
    return float(s[r, cols[c]].sum())


# ------------------------------------------------------------------------------ hard


@FAST
@given(problems())
def test_assign_capped_never_exceeds_cap(prob):
    s, caps = prob
    lab = assign_capped(s, caps)
    assert lab.dtype == np.int64 and lab.shape == (s.shape[0],)
    assert lab.min() >= 0 and lab.max() < s.shape[1]
    assert (np.bincount(lab, minlength=s.shape[1]) <= caps).all()


@FAST
@given(problems(), st.booleans())
def test_assign_capped_float32_and_scalar_cap(prob, scalar):
    s, caps = prob
    cap = int(caps.max()) if scalar else caps
    lab = assign_capped(s.astype(np.float32), cap)
    assert (np.bincount(lab, minlength=s.shape[1]) <= np.broadcast_to(cap, caps.shape)).all()


@FAST
@given(problems(allow_neginf=False))
def test_assign_capped_near_optimal(prob):
    """Total ≥ optimum − N·eps, the ε-optimality bound of the auction (documented)."""
    s, caps = prob
    eps = 1e-3 * _mean_row_spread(np, s)  # the default
    lab = assign_capped(s, caps)
    got = float(s[np.arange(s.shape[0]), lab].sum())
    best = optimum(s, caps)
    assert got >= best - s.shape[0] * eps - 1e-9 * (1 + abs(best))


def test_assign_capped_gap_on_medium_random_cases():
    """N=2000, K=20: within 0.1 % of the optimum's margin over a random assignment."""
    rng = np.random.default_rng(7)
    for _ in range(2):
        n, k = 2000, 20
        s = rng.normal(size=(n, k))
        s[:, :3] += 1.5  # three attractor classes
        caps = np.full(k, n // k)
        lab = assign_capped(s, caps)
        assert (np.bincount(lab, minlength=k) <= caps).all()
        best = optimum(s, caps)
        got = float(s[np.arange(n), lab].sum())
        base = float(s.mean(axis=1).sum())  # what a random balanced labelling scores
        assert best - got <= 1e-3 * (best - base)


def test_assign_capped_dual_certificate():
    """Prices ≥ 0 are positive only on full classes and every row is ε-best at them."""
    rng = np.random.default_rng(3)
    s = rng.normal(size=(500, 12))
    s[:, 0] += 2
    caps = np.full(12, 45)
    eps = 1e-3
    lab, p = assign_capped(s, caps, eps=eps, return_prices=True)
    counts = np.bincount(lab, minlength=12)
    assert (p >= 0).all() and (counts[p > 0] == caps[p > 0]).all()
    v = s - p
    assert (v.max(axis=1) - v[np.arange(500), lab] <= eps + 1e-9).all()


@FAST
@given(problems(ties=False, allow_neginf=False))
def test_assign_capped_uncapped_is_argmax(prob):
    s, _ = prob
    n, k = s.shape
    lab = assign_capped(s, np.full(k, n))
    assert (lab == s.argmax(axis=1)).all()


def test_assign_capped_rows_without_finite_class_still_placed():
    s = np.full((6, 3), -np.inf)
    s[:3, 0] = 1.0  # three rows can only go to class 0, which holds two
    lab = assign_capped(s, np.array([2, 2, 2]))
    assert (np.bincount(lab, minlength=3) <= 2).all()
    assert (lab[:3] == 0).sum() == 2


def test_assign_capped_zero_cap_class_stays_empty():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(50, 4))
    s[:, 2] += 10  # everyone wants the closed class
    lab = assign_capped(s, np.array([20, 20, 0, 20]))
    assert (lab != 2).all()


@pytest.mark.parametrize("noise", [0.0, 1e-3, 0.3])
def test_assign_capped_cascade_falls_back_within_budget(monkeypatch, noise):
    """Alike preferences in every row cascade; past the budget the greedy repair still
    fills every class exactly to the cap and keeps most of the optimum's margin."""
    monkeypatch.setattr(balance, "_MIN_WORK", 0.0)
    rng = np.random.default_rng(1)
    n, k = 600, 30
    s = rng.normal(size=(n, 1)) * 100 + np.arange(k)[None, ::-1] + noise * rng.normal(size=(n, k))
    lab = assign_capped(s, n // k, max_work=1.0)
    assert (np.bincount(lab, minlength=k) == n // k).all()
    if noise:
        best = optimum(s, np.full(k, n // k))
        got = float(s[np.arange(n), lab].sum())
        base = float(s.mean(axis=1).sum())
        assert best - got <= 0.5 * (best - base)


def test_assign_capped_rejects_infeasible_caps():
    with pytest.raises(ValueError):
        assign_capped(np.zeros((10, 3)), 3)


# ------------------------------------------------------------------------------ soft


@st.composite
def soft_problems(draw):
    n = draw(st.integers(1, 60))
    k = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 30.0, 1000.0]))
    L = rng.normal(size=(n, k)) * scale
    L[:, 0] += scale * draw(st.floats(0, 3))
    if draw(st.booleans()):
        L[rng.random((n, k)) < 0.3] = -np.inf
        L[np.arange(n), rng.integers(0, k, n)] = rng.normal(size=n)  # one finite entry a row
    w = rng.random(k) + 0.1
    slack = draw(st.floats(1.0, 1.5))
    caps = w / w.sum() * n * slack  # fractional, heterogeneous, sum ≥ N
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return L.astype(dtype), caps


@FAST
@given(soft_problems())
def test_sinkhorn_rows_one_and_columns_capped(prob):
    L, caps = prob
    w = sinkhorn_capped(L, caps)
    assert w.shape == L.shape and w.dtype == L.dtype
    tol = 1e-4 if L.dtype == np.float32 else 1e-9
    assert (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=tol * 10)
    assert (w.sum(axis=0, dtype=np.float64) <= caps * (1 + 1e-3) + tol * L.shape[0]).all()


@FAST
@given(soft_problems())
def test_sinkhorn_uncapped_is_softmax(prob):
    L, _ = prob
    n, k = L.shape
    w = sinkhorn_capped(L, np.full(k, float(n)))
    m = L.astype(np.float64)
    ref = np.exp(m - m.max(axis=1, keepdims=True))
    ref /= ref.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(w, ref, atol=1e-5)


def test_sinkhorn_is_the_kl_projection():
    """W = Q·exp(−a_i − b_k) with b ≥ 0, b > 0 only on columns at their cap."""
    rng = np.random.default_rng(5)
    n, k = 400, 10
    L = rng.normal(size=(n, k)) * 3
    L[:, :2] += 4  # two attractors
    caps = np.full(k, n / k * 1.1)
    w, b = sinkhorn_capped(L, caps, tol=1e-6, n_iter=100, return_dual=True)
    col = w.sum(axis=0)
    assert (b >= 0).all() and b[:2].min() > 0
    np.testing.assert_allclose(col[b > 0], caps[b > 0], rtol=1e-5)
    q = np.exp(L - b[None])
    np.testing.assert_allclose(w, q / q.sum(axis=1, keepdims=True), atol=1e-6)


def test_sinkhorn_peaked_posteriors_converge():
    """Near-hard posteriors (log-likelihood differences in the thousands) stay stable."""
    rng = np.random.default_rng(2)
    n, k = 3000, 30
    L = (rng.normal(size=(n, k)) * 500).astype(np.float32)
    L[:, :3] += 2000
    caps = np.full(k, n / k)
    w, b = sinkhorn_capped(L, caps, return_dual=True)
    assert np.isfinite(w).all()
    assert w.sum(axis=0).max() <= caps[0] * (1 + 1e-3)
    assert w.max(axis=1).mean() > 0.9  # still nearly hard
    # warm start from the prices converges at once to the same weights
    w2 = sinkhorn_capped(L, caps, dual=b)
    np.testing.assert_allclose(w2, w, atol=2e-3)


def test_sinkhorn_bad_warm_start_falls_back():
    """Prices from another problem (far off) still end at the projection."""
    rng = np.random.default_rng(4)
    n, k = 2000, 20
    L = rng.normal(size=(n, k)) * 200
    L[:, :2] += 600
    caps = np.full(k, n / k)
    cold = sinkhorn_capped(L, caps, tol=1e-6, n_iter=100)
    bad = rng.uniform(0, 5000, size=k)
    warm = sinkhorn_capped(L, caps, tol=1e-6, n_iter=100, dual=bad)
    np.testing.assert_allclose(warm, cold, atol=1e-3)
    assert warm.sum(axis=0).max() <= caps[0] * (1 + 1e-9)


def _block_problem(seed: int, sizes=(5, 3, 4), n=300):
    """A (n, Σ sizes) log posterior that is -inf outside each row's block, blocks drawn at
    random (rows shuffled), with one attractor class per block."""
    rng = np.random.default_rng(seed)
    k = sum(sizes)
    starts = np.cumsum((0,) + tuple(sizes))
    owner = rng.integers(0, len(sizes), n)
    L = np.full((n, k), -np.inf)
    for p_ in range(len(sizes)):
        r = np.flatnonzero(owner == p_)
        k0, k1 = starts[p_], starts[p_ + 1]
        L[np.ix_(r, np.arange(k0, k1))] = rng.normal(size=(len(r), k1 - k0)) * 4
        L[r, k0] += 6
    blocks = [(np.flatnonzero(owner == p_), int(starts[p_]), int(starts[p_ + 1]))
              for p_ in range(len(sizes))]  # fmt: skip
    return L, blocks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sinkhorn_blocks_is_the_dense_projection(seed):
    """Block by block is the dense problem's solution (its constraints do not couple the
    blocks), prices included."""
    L, blocks = _block_problem(seed)
    n, k = L.shape
    # feasible per block: each block's caps hold its rows with room
    caps = np.empty(k)
    for r, k0, k1 in blocks:
        caps[k0:k1] = 1.2 * len(r) / (k1 - k0)
    kw = {"tol": 1e-7, "n_iter": 200}
    dense, bd = sinkhorn_capped(L, caps, return_dual=True, **kw)
    w, b = sinkhorn_capped_blocks(L, caps, blocks, return_dual=True, **kw)
    np.testing.assert_allclose(w, dense, atol=1e-5)
    np.testing.assert_allclose(b, bd, atol=1e-4)
    assert (b > 0).sum() >= len(blocks)  # the attractors are priced: the caps bind


def test_sinkhorn_blocks_infeasible_block_stays_inside():
    """A block whose caps cannot hold its rows gets them raised just enough; no weight ever
    reaches a class outside a row's block (the dense rounding would spread it anywhere)."""
    L, blocks = _block_problem(3, sizes=(4, 4), n=200)
    k = L.shape[1]
    (r0, a0, z0), (r1, a1, z1) = blocks
    caps = np.full(k, 1.1 * max(len(r0), len(r1)) / 4)
    caps[a0:z0] = 0.8 * len(r0) / 4  # block 0 cannot hold its rows
    prior = np.zeros(k)
    prior[a1] = 2.0  # a warm price on block 1's attractor
    kw = {"tol": 1e-7, "n_iter": 200}
    w, b = sinkhorn_capped_blocks(L, caps, blocks, dual=prior, return_dual=True, **kw)
    assert (w[~np.isfinite(L)] == 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)
    col = w.sum(axis=0)
    np.testing.assert_allclose(col[a0:z0].sum(), len(r0), rtol=1e-6)
    assert col[a0:z0].max() <= len(r0) / 4 * (1 + 1e-3)  # raised to exactly hold them
    assert (col[a1:z1] <= caps[a1:z1] * (1 + 1e-3)).all()
    # a class of no block keeps its price and gets nothing
    only1 = [(np.arange(len(r1)), a1, z1)]
    w2, b2 = sinkhorn_capped_blocks(L[r1], caps, only1, dual=prior + 1.0, return_dual=True,
                                    **kw)  # fmt: skip
    assert (b2[a0:z0] == 1.0).all() and (w2[:, a0:z0] == 0).all()
    np.testing.assert_allclose(w2, w[r1], atol=1e-3)  # block 1 does not depend on block 0


def test_sinkhorn_converges_on_a_near_hard_subrun_batch(caplog):
    """A real batch of the --subclassify sub-run (tests/data/README.md): log-posterior
    spreads in the hundreds, a parent whose rows overfill its caps. The solver reaches its
    tolerance (without the Newton trust region it did not, in 20 of 240 such batches), and
    the weights stay inside each particle's parent, rows summing to 1, columns within caps."""
    import logging
    from pathlib import Path

    z = np.load(Path(__file__).parent / "data" / "subclassify_batch_logpost.npz")
    L, rows, nrows = z["L"], z["rows"], z["nrows"]
    cuts = np.cumsum(nrows)[:-1]
    blocks = [(r, int(a), int(b))
              for r, a, b in zip(np.split(rows, cuts), z["k0"], z["k1"], strict=True)]  # fmt: skip
    with caplog.at_level(logging.DEBUG, logger="companion.classify.balance"):
        w, b = sinkhorn_capped_blocks(L, float(z["caps"]), blocks, dual=z["dual"],
                                      return_dual=True)  # fmt: skip
    assert not [r for r in caplog.records if "not converged" in r.getMessage()]
    assert (w[~np.isfinite(L)] == 0).all() and np.isfinite(b).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)
    col = w.sum(axis=0, dtype=np.float64)
    for r, a, k1 in blocks:
        cap = max(float(z["caps"]), len(r) / (k1 - a))  # raised where the parent overfills
        assert col[a:k1].max() <= cap * (1 + 1e-4)


# ------------------------------------------------------------------------------ devices


def test_backends_agree(xp):
    rng = np.random.default_rng(11)
    s = rng.normal(size=(700, 16))
    s[:, :2] += 2
    caps = np.full(16, 44)
    lab = to_host(assign_capped(xp.asarray(s), caps))
    np.testing.assert_array_equal(lab, assign_capped(s, caps))
    kw = {"tol": 1e-9, "n_iter": 100}  # both converged: no stopping-rule differences
    w = to_host(sinkhorn_capped(xp.asarray(s * 5), caps.astype(float), **kw))
    np.testing.assert_allclose(w, sinkhorn_capped(s * 5, caps.astype(float), **kw), atol=1e-6)
