"""Metrics against hand-computed values and brute-force pair-counting definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from companion import metrics


def _brute_ari(a, b) -> float:
    """scikit-learn's formula from the pair confusion matrix, counted pair by pair."""
    tp = fp = fn = tn = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        same_a, same_b = a[i] == a[j], b[i] == b[j]
        tp += same_a and same_b
        fn += same_a and not same_b
        fp += same_b and not same_a
        tn += not same_a and not same_b
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def _brute_nmi(a, b) -> float:
    n = len(a)
    pa = {x: sum(1 for v in a if v == x) / n for x in set(a)}
    pb = {y: sum(1 for v in b if v == y) / n for y in set(b)}
    mi = 0.0
    for x in pa:
        for y in pb:
            pxy = sum(1 for u, v in zip(a, b, strict=True) if u == x and v == y) / n
            if pxy > 0:
                mi += pxy * math.log(pxy / (pa[x] * pb[y]))
    ha = -sum(p * math.log(p) for p in pa.values())
    hb = -sum(p * math.log(p) for p in pb.values())
    if len(pa) == len(pb) == 1:
        return 1.0
    if mi <= 0 or ha + hb == 0:
        return 0.0
    return mi / ((ha + hb) / 2)


def test_ari_hand_computed():
    # contingency [[2,1,0],[0,1,2]]: index 2, row pairs 6, column pairs 3, all pairs 15
    # expected 6*3/15 = 1.2, max 4.5 -> (2 - 1.2) / (4.5 - 1.2)
    a = [0, 0, 0, 1, 1, 1]
    b = [0, 0, 1, 1, 2, 2]
    assert metrics.ari(a, b) == pytest.approx(0.8 / 3.3, abs=1e-12)
    assert metrics.ari(a, b) == pytest.approx(0.24242424242424246, abs=1e-12)


def test_nmi_hand_computed():
    # MI = 2/3 log 2, H(a) = log 2, H(b) = log 3 -> NMI = (4/3 log 2) / log 6
    a = [0, 0, 0, 1, 1, 1]
    b = [0, 0, 1, 1, 2, 2]
    assert metrics.nmi(a, b) == pytest.approx(4 / 3 * math.log(2) / math.log(6), abs=1e-12)
    assert metrics.mutual_information(a, b) == pytest.approx(2 / 3 * math.log(2), abs=1e-12)


def test_perfect_and_permuted_labels():
    a = np.array([0, 0, 1, 1, 2, 2, 2])
    b = np.array([5, 5, 3, 3, 9, 9, 9])  # same partition, other names
    assert metrics.ari(a, b) == 1.0
    assert metrics.nmi(a, b) == pytest.approx(1.0)


def test_independent_labels():
    a = [0, 0, 1, 1]
    b = [0, 1, 0, 1]
    assert metrics.nmi(a, b) == 0.0
    assert metrics.ari(a, b) == pytest.approx(-0.5)  # from the pair-counting definition
    assert _brute_ari(a, b) == pytest.approx(-0.5)


def test_degenerate_single_cluster():
    assert metrics.ari([0, 0, 0], [1, 1, 1]) == 1.0
    assert metrics.nmi([0, 0, 0], [1, 1, 1]) == 1.0
    assert metrics.ari([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
    assert metrics.nmi([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), min_size=2, max_size=25),
)
def test_ari_nmi_match_brute_force(pairs):
    a = [p[0] for p in pairs]
    b = [p[1] for p in pairs]
    assert metrics.ari(a, b) == pytest.approx(_brute_ari(a, b), abs=1e-9)
    assert metrics.nmi(a, b) == pytest.approx(_brute_nmi(a, b), abs=1e-9)
    assert metrics.ari(a, b) == pytest.approx(metrics.ari(b, a), abs=1e-12)
    assert 0.0 <= metrics.nmi(a, b) <= 1.0


def test_contingency_counts():
    c = metrics.contingency(["x", "y", "x", "x"], [1, 1, 2, 2])
    np.testing.assert_array_equal(c, [[1, 2], [1, 0]])
    with pytest.raises(ValueError):
        metrics.contingency([0, 1], [0])


def test_junk_metrics():
    # class 0: 3 junk + 1 good (junk-majority); class 1: 1 junk + 3 good; class 2: 2 good
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    junk = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
    expected = [True, False, False, False]
    np.testing.assert_array_equal(metrics.junk_classes(labels, junk, 4), expected)
    assert metrics.junk_recall(labels, junk) == pytest.approx(3 / 4)
    # good classes 1 and 2 hold 6 particles, one of them junk
    assert metrics.junk_in_good_classes(labels, junk) == pytest.approx(1 / 6)
    assert math.isnan(metrics.junk_recall(labels, np.zeros(10, bool)))
    # exactly half junk is not a junk-majority class
    assert metrics.junk_recall([0, 0], [True, False]) == 0.0


def test_size_metrics():
    labels = np.array([0] * 10 + [1] * 9 + [2] * 1)  # K = 4: mean 5, 10% = 0.5
    assert metrics.small_classes(labels, 4) == 1  # class 3 is empty
    assert metrics.small_classes(labels, 4, fraction=0.3) == 2  # 1 < 1.5
    assert metrics.largest_class_fraction(labels, 4) == pytest.approx(0.5)
    np.testing.assert_array_equal(metrics.class_sizes(labels, 4), [10, 9, 1, 0])


def test_purity_and_majority():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2])
    state = np.array(["a", "a", "b", "b", "b", "b", "a", "c"])
    assert metrics.purity(labels, state) == pytest.approx((2 + 3 + 1) / 8)
    mask = np.array([1, 1, 0, 1, 1, 1, 1, 1], dtype=bool)
    assert metrics.purity(labels, state, mask) == pytest.approx((2 + 3 + 1) / 7)
    best, share = metrics.majority(labels, state, 4)
    np.testing.assert_array_equal(best, [0, 1, 2, -1])  # indices into ["a", "b", "c"]
    np.testing.assert_allclose(share, [2 / 3, 3 / 4, 1.0, 0.0])
    assert metrics.classes_per_value(labels, state, 4) == {"a": 1, "b": 1, "c": 1}


def _blob_image(box: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:box, 0:box] - box // 2
    img = np.exp(-((x - 6) ** 2 + (y + 2) ** 2) / 18.0) + 0.6 * np.exp(
        -((x + 5) ** 2 + (y - 7) ** 2) / 8.0
    )
    return img.astype(np.float32)


def test_best_correlation_finds_rotation_and_shift():
    ref = _blob_image()
    rotated = metrics._rotate_stack(ref, np.array([30.0]))[0]
    moved = np.roll(rotated, (3, -2), axis=(0, 1))
    assert metrics.best_correlation(moved, ref, psi_step=2.0) > 0.97
    # without rotations or shifts in the search the match is much worse
    assert metrics.best_correlation(moved, ref, psi_step=90.0, max_shift=0) < 0.8
    assert metrics.best_correlation(ref, ref) == pytest.approx(1.0, abs=1e-9)
    noise = np.random.default_rng(0).normal(size=ref.shape)
    assert metrics.best_correlation(noise, ref, psi_step=10.0) < 0.4


def test_rotate_is_counter_clockwise():
    img = np.zeros((9, 9))
    img[4, 7] = 1.0  # on +x (column) axis
    out = metrics._rotate_stack(img, np.array([90.0]))[0]
    assert np.unravel_index(out.argmax(), out.shape) == (7, 4)  # moved to +y (row)
