"""The numeric core run on a strict CuPy-like module (tests/strict_xp.py): no NumPy-only call
on a device array, no implicit host conversion, no silent float64 promotion, and a fixed
number of host<->device transfers per batch (not per class)."""

from __future__ import annotations

import numpy as np
import pytest
import strict_xp
from classify_data import make_particles

from companion.classify import classify
from companion.classify import em as em_mod
from companion.params import ClassifyParams

XS = strict_xp.module


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_particles(tmp_path_factory.mktemp("strict"), n=160, n_classes=3, box=32,
                          psize=3.0, snr=1.0, seed=0)  # fmt: skip


def params(**kw) -> ClassifyParams:
    base = dict(n_classes=3, max_resolution=8.0, online_iters=2, batch_per_class=40,
                full_iters=1, anneal_start=1, anneal_iters=1, seed=1, device="gpu")  # fmt: skip
    return ClassifyParams(**(base | kw))


def run_strict(monkeypatch, particles, **kw):
    monkeypatch.setattr(em_mod, "select_device", lambda name: XS)
    strict_xp.COUNTS.clear()
    return classify(particles, params(**kw))


@pytest.mark.parametrize(
    "mode",
    [
        {},
        {"pose_mode": "marginal"},
        {"search": "exhaustive"},
        {"search": "exhaustive", "pose_mode": "marginal"},
        {"balance": "equal"},
    ],  # fmt: skip
)
def test_classify_runs_strict(monkeypatch, small, mode):
    r = run_strict(monkeypatch, small.particles, **mode)
    assert r.class_id.shape == (160,)
    ref = classify(small.particles, params(device="cpu", **mode))
    np.testing.assert_array_equal(r.class_id, ref.class_id)


def one_batch(k: int, mode: str, pose_mode: str, n: int = 12):
    """Counts of transfers for one E-step + M-step batch and for the per-iteration work
    (rotating references, back-rotation, reconstruction) at ``k`` classes."""
    from companion.classify import fourier as fo
    from companion.classify import score as sc
    from companion.classify.estep import softmax as _softmax
    from companion.classify.mstep import Accumulator, reconstruct, shell_power

    xp = XS
    g = fo.Geometry.create(24, 4.0, 8.0, None)
    search = sc.Search.create(g, 30.0, 0.1, 1.0, mode, xp)
    proj = fo.Projector(g, search.n_rot, xp=xp)
    rng = np.random.default_rng(0)
    refs = xp.asarray(rng.normal(size=(k, g.work_box, g.work_box)).astype(np.float32))
    x = xp.asarray((rng.normal(size=(n, g.n_coef)) + 1j * rng.normal(size=(n, g.n_coef)))
                   .astype(np.complex64))  # fmt: skip
    c2s = xp.asarray(rng.uniform(0.2, 2.0, size=(n, g.n_coef)).astype(np.float32))
    half = xp.asarray((np.arange(n) % 2).astype(np.int64))
    group = xp.asarray(np.zeros(n, np.int64))
    tau2 = shell_power(fo.to_kept(refs, g), g)
    strict_xp.COUNTS.clear()
    rr = sc.RotatedRefs.create(proj.project(refs), search)
    acc = Accumulator(k, search.n_rot, g, 1, xp)
    per_iter = dict(strict_xp.COUNTS)
    strict_xp.COUNTS.clear()
    s = sc.score(x * c2s, c2s, rr, search, 2.0, pose_mode == "marginal")
    post = _softmax(s.ev_u)
    acc.add(s, post, search, rr, x=x, xc=x * c2s, c2s=c2s, cm=c2s, v=c2s, half=half,
            group=group, pose_mode=pose_mode)  # fmt: skip
    per_batch = dict(strict_xp.COUNTS)
    strict_xp.COUNTS.clear()
    res = acc.finish(proj)
    reconstruct(res["num"], res["den"], tau2, 2.0, g)
    for key, val in strict_xp.COUNTS.items():
        per_iter[key] = per_iter.get(key, 0) + val
    return per_batch, per_iter


@pytest.mark.parametrize("mode", ["fast", "exhaustive"])
@pytest.mark.parametrize("pose_mode", ["max", "marginal"])
def test_transfers_per_batch_fixed_and_independent_of_k(mode, pose_mode):
    batch2, iter2 = one_batch(2, mode, pose_mode)
    batch7, iter7 = one_batch(7, mode, pose_mode)
    assert batch2 == batch7 and iter2 == iter7  # nothing per class
    # constant tables (Geometry, Search) are on the device already: no upload per batch
    assert batch2.get("upload", 0) == 0, batch2
    assert batch2.get("sync", 0) + batch2.get("download", 0) <= 10, batch2
    print(mode, pose_mode, batch2, iter2)


def test_reseed_and_balance_strict():
    """Re-seeding and both balanced-assignment solvers on the strict module give NumPy's
    results (no host conversion inside them beyond the explicit, counted reads)."""
    from companion.classify import balance
    from companion.classify.backend import to_host
    from companion.classify.reseed import reseed_empty

    rng = np.random.default_rng(0)
    refs = rng.normal(size=(6, 16, 16)).astype(np.float32) + 1.0
    sizes = np.array([300, 2, 900, 0, 250, 148], dtype=np.int64)
    got = reseed_empty(XS.asarray(refs), XS.asarray(sizes), 0.1, np.random.default_rng(3))
    want = reseed_empty(refs, sizes, 0.1, np.random.default_rng(3))
    np.testing.assert_allclose(to_host(got.refs), want.refs, rtol=1e-6)
    np.testing.assert_array_equal(got.pairs, want.pairs)
    scores = rng.normal(size=(300, 5)).astype(np.float32) * 3
    scores[:, 0] += 2  # class 0 over its cap
    w = balance.sinkhorn_capped(XS.asarray(scores), 70.0)
    np.testing.assert_allclose(to_host(w), balance.sinkhorn_capped(scores, 70.0), rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    lab = balance.assign_capped(XS.asarray(scores), 70)
    np.testing.assert_array_equal(to_host(lab), balance.assign_capped(scores, 70))
    # --subclassify's per-parent blocks: rows 0-149 to classes 0-1, rows 150-299 to 2-4
    masked = scores.copy()
    masked[:150, 2:] = -np.inf
    masked[150:, :2] = -np.inf
    rows = [np.arange(150), np.arange(150, 300)]
    wb = balance.sinkhorn_capped_blocks(
        XS.asarray(masked), 80.0, [(XS.asarray(rows[0]), 0, 2), (XS.asarray(rows[1]), 2, 5)]
    )
    want = balance.sinkhorn_capped_blocks(masked, 80.0, [(rows[0], 0, 2), (rows[1], 2, 5)])
    np.testing.assert_allclose(to_host(wb), want, rtol=1e-5, atol=1e-6)
