"""The blocked coarse pass and the grouped fine pass against the implementation they
replaced (tests/score_reference.py): the same poses, the same refined pairs and scores
within float32 rounding, whatever the block sizes."""

from __future__ import annotations

import numpy as np
import pytest
from score_reference import score_fast_reference

from companion.classify import fourier as fo
from companion.classify import score as sc
from companion.classify.backend import to_host
from companion.subclassify import Allowed


def problem(xp, seed: int, k: int = 5, n: int = 23, psi_step: float = 20.0):
    """Particles that are noisy rotated/shifted copies of random-ish references (so the
    refined pairs are a mix of near and far classes), with CTF-like weights."""
    g = fo.Geometry.create(32, 4.0, 8.0, None)
    search = sc.Search.create(g, psi_step, 0.12, 1.0, "fast", xp)
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(k, g.work_box, g.work_box)).astype(np.float32)
    proj = fo.Projector(g, search.n_rot, xp=xp)
    a = proj.project(xp.asarray(base))
    cls = rng.integers(0, k, n)
    rot = rng.integers(0, search.n_rot, n)
    t = rng.integers(0, search.n_shift, n)
    x = a[xp.asarray(cls), xp.asarray(rot)] * xp.conj(search.phases[xp.asarray(t)])
    noise = rng.normal(size=(n, g.n_coef)) + 1j * rng.normal(size=(n, g.n_coef))
    x = x + xp.asarray((3.0 * noise).astype(np.complex64))
    c2s = xp.asarray(rng.uniform(0.2, 2.0, size=(n, g.n_coef)).astype(np.float32))
    shell = g.s_max
    refs = sc.RotatedRefs.create(a, search, g.prefix(shell),
                                 g.prefix(sc.Search.coarse_shell(shell)))  # fmt: skip
    return (x * c2s).astype(np.complex64), c2s, refs, search


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("marginal", [False, True])
@pytest.mark.parametrize("tile", [None, 20_000])  # default tiles; tiny ones: many blocks
@pytest.mark.parametrize("psi_step", [20.0, 90.0])  # 90°: the fine window is every rotation
@pytest.mark.parametrize("group_min", [1, 10**9])  # CPU: every pair in window GEMMs / none
@pytest.mark.parametrize("quad_table", [True, False])  # quadratic term: one GEMM / per pair
def test_blocked_search_equals_the_reference(xp, monkeypatch, seed, marginal, tile, psi_step,
                                             group_min, quad_table):  # fmt: skip
    if tile is not None:
        monkeypatch.setattr(sc, "CPU_TILE_BYTES", tile)
        monkeypatch.setattr(sc, "GPU_TILE_BYTES", tile)
    monkeypatch.setattr(sc, "GROUP_MIN", group_min)
    monkeypatch.setattr(sc, "QUAD_TABLE_RATIO", 10**9 if quad_table else 0)
    tables = []
    table = sc._quad_table
    monkeypatch.setattr(sc, "_quad_table", lambda *a: tables.append(table(*a)) or tables[-1])
    xc, c2s, refs, search = problem(xp, seed, psi_step=psi_step)
    u = 3.0
    new = sc.score(xc, c2s, refs, search, u, marginal)
    old = score_fast_reference(xc, c2s, refs, search, u, marginal)
    assert [t is not None for t in tables] == [quad_table]
    assert 0 < new.n_fine == old.n_fine < xc.shape[0] * refs.A.shape[0]  # some refined
    np.testing.assert_array_equal(to_host(new.rot), to_host(old.rot))
    np.testing.assert_array_equal(to_host(new.shift), to_host(old.shift))
    assert new.rot.dtype == np.int32 and new.shift.dtype == np.int32
    # float32 scores are sums of F products with cancellation, so their rounding scales with
    # the largest score, not with each one; the orders of summation differ (GEMM kernels).
    # Worst measured (seeds 0-5, 1 and 2 BLAS threads, OpenBLAS 0.3.31 on AVX-512): 1.5e-6 x
    # scale beyond rtol, and 2.5e-5 in the weights; 1e-6 x scale and 2e-5, set on an AVX2
    # machine, failed here.
    scale = float(np.abs(to_host(old.best)).max())
    for name in ("best", "ev_u", "ev_1"):
        np.testing.assert_allclose(to_host(getattr(new, name)), to_host(getattr(old, name)),
                                   rtol=1e-5, atol=1e-5 * scale)  # fmt: skip
    if marginal:
        for a, b in zip(new.pairs, old.pairs, strict=True):
            np.testing.assert_array_equal(to_host(a), to_host(b))
        np.testing.assert_array_equal(to_host(new.local_rot), to_host(old.local_rot))
        np.testing.assert_array_equal(to_host(new.local_t0), to_host(old.local_t0))
        np.testing.assert_allclose(to_host(new.local_w), to_host(old.local_w), atol=1e-4)


def test_coarse_blocks_equal_one_block(monkeypatch):
    """The coarse max/argmax does not depend on how particles and classes are blocked."""
    xc, c2s, refs, search = problem(np, 3, k=7, n=31)
    one = sc.coarse_best(xc, c2s, refs, search)
    monkeypatch.setattr(sc, "CPU_TILE_BYTES", 5_000)
    many = sc.coarse_best(xc, c2s, refs, search)
    np.testing.assert_array_equal(one[1], many[1])
    np.testing.assert_array_equal(one[2], many[2])
    np.testing.assert_allclose(one[0], many[0], rtol=1e-5, atol=1e-3)
    assert one[1].dtype == np.int32 and one[2].dtype == np.int32


def test_tf32_is_a_noop_on_numpy(caplog, monkeypatch):
    from companion.classify import backend

    monkeypatch.setattr(backend, "_TF32_NOTED", set())
    xc, c2s, refs, search = problem(np, 4)
    plain = sc.score(xc, c2s, refs, search, 2.0, False)
    search.tf32 = True
    with caplog.at_level("INFO"):
        fast = sc.score(xc, c2s, refs, search, 2.0, False)
        sc.score(xc, c2s, refs, search, 2.0, False)
    np.testing.assert_array_equal(fast.best, plain.best)
    assert sum("--tf32: no effect" in r.getMessage() for r in caplog.records) == 1  # once


def test_quad_table_only_when_it_pays_and_fits():
    """The (B, K·R) table of the quadratic term is built when the pairs use at least
    1/QUAD_TABLE_RATIO of its entries and it takes at most a quarter of the budget."""
    xc, c2s, refs, search = problem(np, 0)
    b, kr = xc.shape[0], refs.power.shape[0]
    c2half = c2s[:, : refs.n] * np.float32(0.5)
    enough = -(-b * kr // sc.QUAD_TABLE_RATIO)
    table = sc._quad_table(c2half, refs, enough, None)
    want = np.einsum("bf,rf->br", c2half.astype(np.float64), refs.power.astype(np.float64))
    np.testing.assert_allclose(table, want, rtol=1e-5)
    assert sc._quad_table(c2half, refs, enough - 1, None) is None
    assert sc._quad_table(c2half, refs, enough, 16 * b * kr) is not None
    assert sc._quad_table(c2half, refs, enough, 16 * b * kr - 4) is None


@pytest.mark.parametrize("seed", [0, 1])
def test_allowed_classes_only_are_refined(xp, seed):
    """``segments`` (``--subclassify``): the coarse margin is taken over a particle's own
    classes and no other class is refined; an allowed class refined either way gets the
    same pose and score as without the mask (the fine pass of a pair does not depend on
    the other pairs)."""
    xc, c2s, refs, search = problem(xp, seed, k=6, n=40)
    u = 3.0
    rng = np.random.default_rng(seed)
    parent = rng.integers(0, 2, 40)
    allowed_h = parent[:, None] == np.array([0, 0, 0, 1, 1, 1])[None, :]
    segs = Allowed(parent, np.array([0, 0, 0, 1, 1, 1])).segments(np.arange(40), xp)
    full = sc.score(xc, c2s, refs, search, u, True)
    own = sc.score(xc, c2s, refs, search, u, True, None, segs)
    bi, ki = (to_host(a) for a in own.pairs)
    assert own.n_fine == len(bi) > 0 and allowed_h[bi, ki].all()
    assert own.n_fine < full.n_fine  # the other parents' classes were refined without it
    best = to_host(own.best)
    assert np.isneginf(best[~allowed_h]).all() and np.isfinite(best[allowed_h]).all()
    fb, fk = (to_host(a) for a in full.pairs)
    both = np.zeros(allowed_h.shape, bool)
    both[fb, fk] = True
    mine = np.zeros(allowed_h.shape, bool)
    mine[bi, ki] = True
    both &= mine
    assert both.any()
    np.testing.assert_array_equal(to_host(own.rot)[both], to_host(full.rot)[both])
    np.testing.assert_array_equal(to_host(own.shift)[both], to_host(full.shift)[both])
    scale = float(np.abs(to_host(full.best)).max())
    np.testing.assert_allclose(best[both], to_host(full.best)[both], rtol=1e-5,
                               atol=1e-5 * scale)  # fmt: skip


@pytest.mark.parametrize("mode", ["fast", "exhaustive"])
@pytest.mark.parametrize("marginal", [False, True])
def test_disallowed_classes_get_minus_inf_in_both_modes(xp, mode, marginal):
    """``score(…, segments)``: score and evidence of the classes a particle may not go to
    are -inf, of the others finite, in both search modes (the E-step masks nothing else)."""
    xc, c2s, refs, search = problem(xp, 4, k=6, n=30)
    search.mode = mode
    parent = np.random.default_rng(4).integers(0, 3, 30)
    allowed_h = parent[:, None] == np.array([0, 0, 1, 1, 2, 2])[None, :]
    segs = Allowed(parent, np.array([0, 0, 1, 1, 2, 2])).segments(np.arange(30), xp)
    out = sc.score(xc, c2s, refs, search, 2.0, marginal, None, segs)
    for name in ("best", "ev_u", "ev_1"):
        a = to_host(getattr(out, name))
        assert a.dtype == np.float32, name
        assert np.isneginf(a[~allowed_h]).all() and np.isfinite(a[allowed_h]).all(), name


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("tile", [None, 20_000])
def test_coarse_segments_score_only_their_classes(xp, monkeypatch, seed, tile):
    """``segments`` (``--subclassify``: each parent's particles against its own contiguous
    sub-classes): the coarse pass gives those (particle, class) entries the scores and poses
    of the whole pass and -inf elsewhere; the fast search then refines own classes only."""
    if tile is not None:
        monkeypatch.setattr(sc, "CPU_TILE_BYTES", tile)
    xc, c2s, refs, search = problem(xp, seed, k=7, n=45)
    parent = np.random.default_rng(seed).integers(0, 3, 45)
    al = Allowed(parent, np.array([0, 0, 1, 1, 1, 2, 2]))
    chunk = np.arange(45)
    segs = al.segments(chunk, xp)
    assert sorted(k0 for _, k0, _ in segs) == [0, 2, 5]
    allowed_h = parent[:, None] == np.array([0, 0, 1, 1, 1, 2, 2])[None, :]
    assert np.array_equal(to_host(sc.segments_mask(segs, 45, 7, xp)), allowed_h)
    whole = [to_host(a) for a in sc.coarse_best(xc, c2s, refs, search)]
    part = [to_host(a) for a in sc.coarse_best(xc, c2s, refs, search, None, segs)]
    assert np.isneginf(part[0][~allowed_h]).all()
    scale = float(np.abs(whole[0]).max())
    np.testing.assert_allclose(part[0][allowed_h], whole[0][allowed_h], rtol=1e-5,
                               atol=1e-5 * scale)  # fmt: skip
    for a, b in zip(part[1:], whole[1:], strict=True):
        np.testing.assert_array_equal(a[allowed_h], b[allowed_h])
    cut = sc.score(xc, c2s, refs, search, 3.0, True, None, segs)
    bi, ki = (to_host(a) for a in cut.pairs)
    assert allowed_h[bi, ki].all()  # only own classes refined


def test_segments_refuse_a_parent_whose_classes_are_not_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        Allowed(np.array([0, 1]), np.array([0, 1, 0])).segments(np.arange(2), np)
