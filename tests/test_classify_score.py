"""E-step scoring against a direct per-pose computation, the fast search against the
exhaustive one, the M-step on a tiny problem, and the backend helpers."""

from __future__ import annotations

import numpy as np
import pytest
from classify_data import blob_image

from companion.classify import fourier as fo
from companion.classify import score as sc
from companion.classify.backend import (
    batch_size,
    describe_device,
    scatter_add_rows,
    select_device,
    to_host,
)
from companion.classify.mstep import Accumulator, reconstruct
from companion.errors import DeviceError


def tiny(xp, k=2, psi_step=45.0, max_shift=0.1, mode="exhaustive", n=5, seed=0):
    g = fo.Geometry.create(24, 4.0, 8.0, None)
    search = sc.Search.create(g, psi_step, max_shift, 1.0, mode, xp)
    rng = np.random.default_rng(seed)
    refs = rng.normal(size=(k, g.work_box, g.work_box)).astype(np.float32)
    proj = fo.Projector(g, search.n_rot, xp=xp)
    a = proj.project(xp.asarray(refs))
    xc = rng.normal(size=(n, g.n_coef)) + 1j * rng.normal(size=(n, g.n_coef))
    c2s = rng.uniform(0.2, 2.0, size=(n, g.n_coef))
    return g, search, a, xp.asarray(xc.astype(np.complex64)), xp.asarray(c2s.astype(np.float32))


def direct_ll(xc, c2s, a, phases) -> np.ndarray:
    """ll[b, k, r, t] by explicit loops (the definition)."""
    xc, c2s, a, phases = (to_host(v).astype(np.complex128) for v in (xc, c2s, a, phases))
    b, k, r, t = xc.shape[0], a.shape[0], a.shape[1], phases.shape[0]
    out = np.empty((b, k, r, t))
    for i in range(b):
        for j in range(k):
            for m in range(r):
                for s in range(t):
                    y = xc[i] * phases[s]
                    out[i, j, m, s] = np.sum((np.conj(y) * a[j, m]).real) - 0.5 * np.sum(
                        c2s[i].real * np.abs(a[j, m]) ** 2
                    )
    return out


def test_exhaustive_gemm_equals_direct_per_pose(xp):
    g, search, a, xc, c2s = tiny(xp)
    refs = sc.RotatedRefs.create(a, search)
    ll = direct_ll(xc, c2s, a, search.phases)
    best = ll.max(axis=(2, 3))
    out = sc.score(xc, c2s, refs, search, 1.0, marginal=False)
    np.testing.assert_allclose(to_host(out.best), best, rtol=1e-4, atol=1e-2)
    flat = ll.reshape(ll.shape[0], ll.shape[1], -1).argmax(axis=2)
    np.testing.assert_array_equal(to_host(out.rot), flat // ll.shape[3])
    np.testing.assert_array_equal(to_host(out.shift), flat % ll.shape[3])
    # marginal: log-mean-exp over poses at u, and normalised pose weights
    u = 2.0
    m = sc.score(xc, c2s, refs, search, u, marginal=True)
    lme = np.log(np.exp((ll - best[..., None, None]) / u).mean(axis=(2, 3))) + best / u
    np.testing.assert_allclose(to_host(m.ev_u), lme, rtol=1e-4, atol=1e-2)
    w = to_host(m.dense_w)  # (B, T, K, R)
    np.testing.assert_allclose(w.sum(axis=(1, 3)), 1.0, rtol=1e-4)


def test_fast_search_finds_the_exhaustive_pose_on_clean_particles(xp):
    """Noise-free particles made by rotating and shifting known references: the coarse-fine
    search must find the same (rotation, shift) as the exhaustive one."""
    g = fo.Geometry.create(48, 3.0, 8.0, None)
    ex = sc.Search.create(g, 6.0, 0.1, 1.0, "exhaustive", xp)
    fast = sc.Search.create(g, 6.0, 0.1, 1.0, "fast", xp)
    ref = blob_image(g.work_box)
    refs = np.stack([ref, ref[::-1].copy()])
    proj = fo.Projector(g, ex.n_rot, xp=xp)
    a = proj.project(xp.asarray(refs))
    rng = np.random.default_rng(4)
    n = 40
    rot = rng.integers(0, ex.n_rot, n)
    t = rng.integers(0, ex.n_shift, n)
    cls = rng.integers(0, 2, n)
    # particle shifted by +t matches A[cls, rot]: X = A * conj(phase_t)
    x = a[xp.asarray(cls), xp.asarray(rot)] * xp.conj(ex.phases[xp.asarray(t)])
    c2s = xp.ones((n, g.n_coef), xp.float32)
    shell = 14
    r_ex = sc.RotatedRefs.create(a, ex, g.prefix(shell))
    r_fast = sc.RotatedRefs.create(
        a, fast, g.prefix(shell), g.prefix(sc.Search.coarse_shell(shell))
    )
    e = sc.score(x, c2s, r_ex, ex, 1.0, False)
    f = sc.score(x, c2s, r_fast, fast, 1.0, False)
    ar = np.arange(n)
    assert np.mean(to_host(e.rot)[ar, cls] == rot) == 1.0
    assert np.mean(to_host(e.shift)[ar, cls] == t) == 1.0
    assert np.mean(to_host(f.rot)[ar, cls] == rot) >= 0.95
    assert np.mean(to_host(f.shift)[ar, cls] == t) >= 0.95
    np.testing.assert_allclose(to_host(f.best)[ar, cls], to_host(e.best)[ar, cls], rtol=1e-3)
    # the true class wins in both
    assert np.all(to_host(f.best).argmax(axis=1) == cls)


def test_mstep_on_a_tiny_problem_recovers_the_reference(xp):
    """Noise-free particles with known poses: weighted sums, back-rotation and the Wiener
    filter (weak prior) give the reference back."""
    g = fo.Geometry.create(48, 3.0, 8.0, None)
    search = sc.Search.create(g, 6.0, 0.1, 1.0, "exhaustive", xp)
    ref = blob_image(g.work_box)
    proj = fo.Projector(g, search.n_rot, xp=xp)
    a = proj.project(xp.asarray(ref[None]))
    refs = sc.RotatedRefs.create(a, search)
    rng = np.random.default_rng(5)
    n = 60
    rot = rng.integers(0, search.n_rot, n)
    t = rng.integers(0, search.n_shift, n)
    kx, ky = g.freqs_A()
    df = rng.uniform(10000, 20000, n)
    ctf = xp.asarray(ctf_values(kx, ky, df))
    x = ctf * a[0, xp.asarray(rot)] * xp.conj(search.phases[xp.asarray(t)])
    c2s = ctf * ctf
    batch = sc.score(x * ctf, c2s, refs, search, 1.0, False)
    assert np.mean(to_host(batch.rot)[:, 0] == rot) == 1.0
    acc = Accumulator(1, search.n_rot, g, 1, xp)
    post = xp.ones((n, 1), xp.float32)
    acc.add(batch, post, search, refs, x=x, xc=x * ctf, c2s=c2s, cm=ctf,
            v=xp.ones_like(c2s), half=xp.asarray(np.arange(n) % 2), group=xp.zeros(n, xp.int64),
            pose_mode="max")  # fmt: skip
    res = acc.finish(proj)
    rec = reconstruct(res["num"], res["den"], np.full((1, g.s_max + 1), 1e6), 2.0, g)
    direct = to_host(fo.to_kept(xp.asarray(ref[None]), g))[0]
    got = to_host(rec.coef)[0]
    low = g.prefix(12)  # the CTF leaves little at the highest shells
    assert np.linalg.norm(got[:low] - direct[:low]) / np.linalg.norm(direct[:low]) < 0.05
    assert np.all(to_host(rec.frc)[0, 1:9] > 0.99)
    # the residual noise estimate is ~0 for noise-free particles
    assert float(to_host(res["noise_num"]).sum()) < 1e-3 * float(to_host(res["noise_den"]).sum())


def ctf_values(kx, ky, df) -> np.ndarray:
    from companion.classify.ctf import ctf_2d

    return ctf_2d(kx, ky, df, df, 0.0, 300.0, 2.7, 0.1).astype(np.float32)


def test_broadcast_classes_gives_the_owner_the_weights(xp):
    g, search, a, xc, c2s = tiny(xp, k=1, mode="fast")
    refs = sc.RotatedRefs.create(a, search, g.n_coef, g.prefix(sc.Search.coarse_shell(g.s_max)))
    one = sc.score(xc, c2s, refs, search, 1.0, True)
    owner = xp.asarray(np.array([2, 0, 1, 2, 0]))
    out = sc.broadcast_classes(one, owner, 3)
    assert out.best.shape == (5, 3)
    np.testing.assert_array_equal(to_host(out.rot)[:, 2], to_host(one.rot)[:, 0])
    np.testing.assert_array_equal(to_host(out.pairs[1]), to_host(owner)[to_host(one.pairs[0])])


def test_scatter_add_rows_matches_add_at(xp):
    rng = np.random.default_rng(6)
    idx = rng.integers(0, 7, 40)
    rows = rng.random((40, 9)).astype(np.float32)
    ref = np.zeros((7, 9), np.float32)
    np.add.at(ref, idx, rows)
    got = xp.zeros((7, 9), xp.float32)
    scatter_add_rows(got, xp.asarray(idx), xp.asarray(rows))
    np.testing.assert_allclose(to_host(got), ref, rtol=1e-6)


def test_batch_size_and_devices():
    assert batch_size(1000, np, budget=1_000_000) == 512  # power of two ≤ 1000
    assert batch_size(1e12, np, budget=1_000_000) == 1
    assert select_device("cpu") is np
    assert describe_device(np).startswith("cpu")
    from tests.conftest import HAS_GPU

    if HAS_GPU:
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="--device gpu"):
        select_device("gpu")
    assert select_device("auto") is np


def test_fine_pass_memory_stays_within_the_coarse_pass():
    """The E-step batch is sized for the coarse pass; the fine pass's chunks take no more
    than the coarse arrays it frees, whatever budget score() is handed (a larger budget on
    top of the batch's would break --memory-limit), and chunking does not change scores."""
    import tracemalloc

    g = fo.Geometry.create(64, 3.0, 6.0, None)
    search = sc.Search.create(g, 6.0, 0.1, 1.0, "fast", np)
    k, b = 20, 32
    rng = np.random.default_rng(0)
    a = rng.normal(size=(k, search.n_rot, g.n_coef)) + 1j * rng.normal(
        size=(k, search.n_rot, g.n_coef)
    )
    refs = sc.RotatedRefs.create(a.astype(np.complex64), search, g.n_coef,
                                 g.prefix(sc.Search.coarse_shell(g.s_max)))  # fmt: skip
    xc = (rng.normal(size=(b, g.n_coef)) + 1j * rng.normal(size=(b, g.n_coef))).astype(np.complex64)
    c2s = rng.uniform(0.2, 2.0, size=(b, g.n_coef)).astype(np.float32)
    tc, rc = int(search.coarse_shift_idx.shape[0]), refs.coarse.shape[0] // k
    coarse = b * tc * (refs.fc * 8 + k * rc * 4 + k * 12)  # yc, llc, m1, a1

    def run(budget):
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        out = sc.score(xc, c2s, refs, search, 1e4, True, budget)  # u large: all pairs refined
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        return out, peak

    small, peak_small = run(coarse)
    big, peak_big = run(1 << 30)
    assert big.n_fine == b * k
    # the unchunked fine pass needs several times the coarse arrays: a 1 GiB budget must not
    assert peak_big <= 1.1 * peak_small
    np.testing.assert_allclose(big.ev_u, small.ev_u, rtol=1e-5, atol=1e-2)
    np.testing.assert_array_equal(big.rot, small.rot)


@pytest.mark.parametrize("pose_mode", ["max", "marginal"])
def test_accumulating_flat_posteriors_stays_within_the_budget(pose_mode):
    """With flat posteriors every (particle, class) pair is accumulated: B·K rows of 3F
    floats, which the per-particle E-step batch does not cover; they are added in chunks
    that fit half the work budget (and give the sums of one unchunked pass)."""
    import tracemalloc

    from companion.classify import backend

    g = fo.Geometry.create(64, 3.0, 6.0, None)
    search = sc.Search.create(g, 6.0, 0.1, 1.0, "fast", np)
    k, b, f = 16, 128, g.n_coef
    rng = np.random.default_rng(1)
    a = rng.normal(size=(k, search.n_rot, f)) + 1j * rng.normal(size=(k, search.n_rot, f))
    refs = sc.RotatedRefs.create(a.astype(np.complex64), search, f,
                                 g.prefix(sc.Search.coarse_shell(g.s_max)))  # fmt: skip
    x = (rng.normal(size=(b, f)) + 1j * rng.normal(size=(b, f))).astype(np.complex64)
    c2s = rng.uniform(0.2, 2.0, size=(b, f)).astype(np.float32)
    half, group = np.arange(b) % 2, np.zeros(b, np.int64)
    s = sc.score(x * c2s, c2s, refs, search, 1e4, pose_mode == "marginal", 1 << 30)
    post = np.full((b, k), 1.0 / k, np.float32)  # flat: no pair is pruned

    def add(limit):
        acc = Accumulator(k, search.n_rot, g, 1, np)
        with backend.memory_limit(limit):
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            acc.add(s, post, search, refs, x=x, xc=x * c2s, c2s=c2s, cm=c2s, v=c2s,
                    half=half, group=group, pose_mode=pose_mode)  # fmt: skip
            peak = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.stop()
        return acc.stats, peak

    unchunked = b * k * f * 48  # ~200 MiB of pair rows at once
    stats_small, peak_small = add(96 << 20)  # work budget 48 MiB: pair chunks of 24 MiB
    stats_big, _ = add(64 << 30)
    assert peak_small < 64 << 20 < unchunked
    np.testing.assert_allclose(stats_small, stats_big, rtol=1e-4, atol=1e-3)
