"""Re-seeding of nearly empty classes by splitting a donor class."""

from __future__ import annotations

import numpy as np
import pytest

from companion.classify.backend import to_host
from companion.classify.reseed import find_empty, reseed_empty, reseed_references


def refs_and_sizes(k: int = 6, box: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    refs = rng.normal(size=(k, box, box)).astype(np.float32) + 1.0
    sizes = np.array([300, 2, 900, 0, 250, 148], dtype=np.int64)[:k]
    return refs, sizes


def test_find_empty_threshold():
    sizes = np.array([100, 9, 10, 0, 81])  # mean 40
    np.testing.assert_array_equal(find_empty(sizes, 0.25), [1, 3])  # below 10
    np.testing.assert_array_equal(find_empty(sizes, 0.0), [])
    assert find_empty(np.zeros(4), 0.5).size == 0  # nothing to compare with


def test_reseed_splits_the_largest_class():
    refs, sizes = refs_and_sizes()
    res = reseed_empty(refs, sizes, 0.1, np.random.default_rng(1))  # mean 266.7 → < 26.7
    assert res is not None
    # class 1 splits the largest (2: 900 → 450 + 450); class 3 then the largest again (a tie
    # of 450: the lower index, class 1)
    np.testing.assert_array_equal(res.pairs, [[1, 2], [3, 1]])
    # each split makes opposite perturbations of the donor: 2 → (2−, 1+), then 1+ → (1, 3)
    first_split = (res.refs[1] + res.refs[3]) / 2
    np.testing.assert_allclose((res.refs[2] + first_split) / 2, refs[2], rtol=1e-4, atol=1e-4)
    assert not np.allclose(res.refs[1], res.refs[2])
    rel = np.linalg.norm(res.refs[2] - refs[2]) / np.linalg.norm(refs[2])
    assert 0.005 < rel < 0.2  # small
    # untouched classes keep their references; the input is not modified
    for c in (0, 4, 5):
        np.testing.assert_array_equal(res.refs[c], refs[c])
    assert not np.shares_memory(res.refs, refs)
    np.testing.assert_array_equal(refs, refs_and_sizes()[0])
    # shares: 900 → 450 (class 2) and 450 → 225 + 225 (classes 1 and 3), the 2 members of
    # the re-seeded classes handed back in proportion
    assert res.sizes.sum() == pytest.approx(sizes.sum())
    assert res.sizes[1] == pytest.approx(res.sizes[3])
    assert res.sizes[2] == pytest.approx(2 * res.sizes[1])
    assert res.sizes[2] == pytest.approx(450, rel=0.01)


def test_reseed_is_deterministic_given_rng():
    refs, sizes = refs_and_sizes()
    a = reseed_empty(refs, sizes, 0.1, np.random.default_rng(5))
    b = reseed_empty(refs, sizes, 0.1, np.random.default_rng(5))
    c = reseed_empty(refs, sizes, 0.1, np.random.default_rng(6))
    np.testing.assert_array_equal(a.refs, b.refs)
    assert not np.array_equal(a.refs, c.refs)


def test_reseed_perturbation_is_smooth():
    refs = np.ones((2, 64, 64), np.float32)
    res = reseed_references(refs, np.array([100, 0]), [1], np.random.default_rng(0))
    z = res.refs[1] - 1.0
    # neighbouring pixels are strongly correlated: a low-pass field, not white noise
    corr = np.corrcoef(z[:, :-1].ravel(), z[:, 1:].ravel())[0, 1]
    assert corr > 0.8


def test_reseed_least_coherent_donor():
    refs, sizes = refs_and_sizes()
    coherence = np.array([0.1, 0.0, 0.9, 0.0, 0.5, 0.05])
    res = reseed_references(refs, sizes, [3], np.random.default_rng(0), coherence=coherence)
    # among classes at least as big as the mean (0 and 2; class 5 is small), class 0 is the
    # least coherent
    np.testing.assert_array_equal(res.pairs, [[3, 0]])


def test_reseed_uses_half_set_averages():
    refs, sizes = refs_and_sizes()
    rng = np.random.default_rng(0)
    half_a, half_b = rng.normal(size=refs.shape), rng.normal(size=refs.shape)
    res = reseed_references(refs, sizes, [1, 3], np.random.default_rng(0), halves=(half_a, half_b))
    np.testing.assert_array_equal(res.pairs, [[1, 2], [3, 1]])
    np.testing.assert_allclose(res.refs[2], half_a[2], rtol=1e-6)
    # class 1 already came from a split: its own split is a perturbation of half_b[2]
    np.testing.assert_allclose((res.refs[1] + res.refs[3]) / 2, half_b[2], rtol=1e-4, atol=1e-4)


def test_reseed_nothing_to_do():
    refs, _ = refs_and_sizes()
    assert reseed_empty(refs, np.full(6, 50), 0.5, np.random.default_rng(0)) is None
    assert reseed_empty(refs, np.array([1, 0, 1, 0, 1, 0]), 0.9, np.random.default_rng(0)) is None


def test_reseed_complex_references():
    rng = np.random.default_rng(0)
    refs = (rng.normal(size=(3, 50)) + 1j * rng.normal(size=(3, 50))).astype(np.complex64)
    res = reseed_empty(refs, np.array([0, 80, 40]), 0.2, np.random.default_rng(2))
    assert res.refs.dtype == np.complex64
    np.testing.assert_array_equal(res.pairs, [[0, 1]])
    np.testing.assert_allclose((res.refs[0] + res.refs[1]) / 2, refs[1], rtol=1e-5, atol=1e-5)


def test_reseed_backends_agree(xp):
    refs, sizes = refs_and_sizes()
    res = reseed_empty(xp.asarray(refs), xp.asarray(sizes), 0.1, np.random.default_rng(3))
    ref = reseed_empty(refs, sizes, 0.1, np.random.default_rng(3))
    np.testing.assert_allclose(to_host(res.refs), ref.refs, rtol=1e-6)
    np.testing.assert_array_equal(res.pairs, ref.pairs)


def test_reseed_in_the_em_loop(tmp_path, caplog):
    """--reseed-empty: classes that empty out during EM are re-seeded from a donor."""
    import logging

    from companion.classify import classify
    from companion.metrics import small_classes
    from companion.params import ClassifyParams
    from companion.simulate import simulate
    from companion.sources import open_particles

    simulate(tmp_path, 400, box=48, psize=4.0, snr=0.3, seed=3, n_views=2, n_states=1,
             junk_fraction=0.0, progress=False)  # fmt: skip
    particles = open_particles(tmp_path / "particles.star")
    base = dict(n_classes=10, online_iters=6, batch_per_class=40, full_iters=1,
                max_resolution=12.0, seed=1)  # fmt: skip
    plain = classify(particles, ClassifyParams(**base))
    assert small_classes(plain.class_id, 10) > 0  # two views, ten classes: some starve
    with caplog.at_level(logging.INFO, logger="companion.classify.output"):
        res = classify(particles, ClassifyParams(**base, reseed_empty=0.3))
    assert "re-seeded" in caplog.text
    assert res.class_sizes.sum() == 400
    assert abs(float(res.class_distribution.sum()) - 1.0) < 1e-5
    assert small_classes(res.class_id, 10) <= small_classes(plain.class_id, 10)
