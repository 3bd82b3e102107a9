"""The M-step's per-(half, class, rotation) sums for one pose per (particle, class), against
the definition written as ``np.add.at`` (float64), and their independence of the blocking."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from companion.classify import fourier as fo
from companion.classify import mstep
from companion.classify import score as sc


def _batch(seed: int, b: int, k: int, r: int, t: int, f: int):
    rng = np.random.default_rng(seed)
    xc = (rng.standard_normal((b, f)) + 1j * rng.standard_normal((b, f))).astype(np.complex64)
    c2s = rng.random((b, f), dtype=np.float32)
    post = rng.dirichlet(np.full(k, 0.3), size=b).astype(np.float32)  # some below PRUNE
    rot = rng.integers(0, r, (b, k)).astype(np.int32)
    shift = rng.integers(0, t, (b, k)).astype(np.int32)
    half = rng.integers(0, 2, b).astype(np.int8)
    phases = np.exp(-2j * np.pi * rng.random((t, f))).astype(np.complex64)
    scores, search = SimpleNamespace(rot=rot, shift=shift), SimpleNamespace(phases=phases)
    return xc, c2s, post, scores, half, search


def _reference(xc, c2s, post, scores, half, search, k, r):
    f = xc.shape[1]
    sums = np.zeros((2, k * r, f), np.complex128)
    weights = np.zeros((2, k * r, f), np.float64)
    keep = post >= mstep.PRUNE * post.max(axis=1, keepdims=True)
    bi, ki = np.nonzero(keep)
    w = post[bi, ki].astype(np.float64)
    slot = ki * r + scores.rot[bi, ki]
    rows = xc[bi].astype(np.complex128) * search.phases[scores.shift[bi, ki]] * w[:, None]
    np.add.at(sums, (half[bi], slot), rows)
    np.add.at(weights, (half[bi], slot), c2s[bi] * w[:, None])
    return sums, weights


@pytest.mark.parametrize("tile", [None, 1])  # a cache-sized block of classes; one class each
@pytest.mark.parametrize("dense", [0.0, 2.0])  # blocks of all rows / kept pairs only
def test_add_max_matches_definition(monkeypatch, tile, dense):
    geom = fo.Geometry.create(32, 3.0, 8.0, None)
    f = geom.n_coef
    b, k, r, t = 37, 7, 12, 9
    monkeypatch.setattr(mstep, "DENSE_FRACTION", dense)
    if tile is not None:
        monkeypatch.setattr(sc, "CPU_TILE_BYTES", tile)
    xc, c2s, post, scores, half, search = _batch(0, b, k, r, t, f)
    acc = mstep.Accumulator(k, r, geom, 1, np)
    acc._add_max(scores, post, search, xc, c2s, half)
    acc._add_max(scores, post, search, xc, c2s, half)  # sums accumulate over batches
    ref_s, ref_w = _reference(xc, c2s, post, scores, half, search, k, r)
    got_s = np.ascontiguousarray(acc.sums).view(np.complex64)
    scale = np.abs(ref_s).max()
    np.testing.assert_allclose(got_s, 2 * ref_s, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(acc.weights, 2 * ref_w, rtol=0, atol=1e-5 * ref_w.max())
    # slots no kept pair points at stay exactly zero
    empty = ref_w.sum(axis=2) == 0
    assert empty.any()
    assert not np.asarray(acc.stats).reshape(2, k * r, -1)[empty].any()


@pytest.mark.parametrize("dense", [0.0, 2.0])  # blocks of all rows / kept pairs only
def test_add_max_same_sums_whatever_the_block(dense):
    """Blocking over classes (or chunking the kept pairs) changes which rows go into one
    product, not the sums' order: one class (pair) per block and all in one block give
    identical bits."""
    geom = fo.Geometry.create(32, 3.0, 8.0, None)
    b, k, r, t = 50, 5, 8, 6
    xc, c2s, post, scores, half, search = _batch(3, b, k, r, t, geom.n_coef)
    out = []
    for tile in (1, 1 << 30):
        acc = mstep.Accumulator(k, r, geom, 1, np)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sc, "CPU_TILE_BYTES", tile)
            mp.setattr(mstep, "DENSE_FRACTION", dense)
            acc._add_max(scores, post, search, xc, c2s, half)
        out.append(np.asarray(acc.stats).copy())
    np.testing.assert_array_equal(out[0], out[1])
