"""The E-step's coefficient feed: the batches direct reads would give, in order, read ahead
of the consumer; reader errors reach the consumer; no reader thread outlives a pass that
ends early (an exception, an abort)."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import strict_xp
from classify_data import make_particles

from companion.classify import diskcache
from companion.classify.backend import to_host
from companion.classify.callbacks import Callbacks
from companion.classify.em import classify
from companion.classify.feed import THREAD_NAME, CoefficientFeed
from companion.errors import Aborted
from companion.params import ClassifyParams


def feed_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]


@pytest.fixture
def rows(tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(103, 17)) + 1j * rng.normal(size=(103, 17))).astype(np.complex64)
    f = diskcache.open_array(tmp_path / "c.c64", data.shape, np.complex64, what="test")
    f[np.arange(103)] = data
    return f, data


class Recording:
    """Rows that record which chunks were read (and can fail at one of them)."""

    def __init__(self, data: np.ndarray, fail_at: int | None = None) -> None:
        self.data, self.shape, self.dtype = data, data.shape, data.dtype
        self.fail_at, self.calls = fail_at, 0
        self.read = [threading.Event() for _ in range(64)]

    def __getitem__(self, idx):
        i, self.calls = self.calls, self.calls + 1
        if i == self.fail_at:
            raise OSError(f"cache.c64: short read at batch {i}")
        self.read[i].set()
        return self.data[idx]


@pytest.mark.parametrize("batch", [1, 10, 103, 500])
def test_batches_equal_direct_reads_in_order(rows, batch):
    f, data = rows
    idx = np.random.default_rng(1).permutation(103)[:97]
    got = list(CoefficientFeed(f, np).batches(idx, batch))
    want = [f[idx[s : s + batch]] for s in range(0, len(idx), batch)]
    assert len(got) == len(want) == -(-97 // batch)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(np.concatenate(got), data[idx])
    assert not feed_threads()


def test_next_batch_is_read_while_the_current_one_is_used(rows):
    _, data = rows
    src = Recording(data)
    xs = CoefficientFeed(src, np).batches(np.arange(103), 20)
    next(xs)
    assert src.read[1].wait(5.0)  # batch 1 was read without the consumer asking
    assert not src.read[2].is_set()  # one batch ahead, not more
    assert len(list(xs)) == 5


def test_reader_error_reaches_the_consumer_at_its_batch(rows):
    _, data = rows
    xs = CoefficientFeed(Recording(data, fail_at=2), np).batches(np.arange(103), 20)
    next(xs)
    next(xs)
    with pytest.raises(OSError, match="short read at batch 2"):
        next(xs)
    with pytest.raises(StopIteration):  # the pass is over, nothing left running
        next(xs)
    assert not feed_threads()


def test_no_reader_left_after_the_consumer_fails(rows):
    f, _ = rows

    def consume():
        for i, _x in enumerate(CoefficientFeed(f, np).batches(np.arange(103), 10)):
            if i == 3:
                raise RuntimeError("scoring failed")

    with pytest.raises(RuntimeError, match="scoring failed"):
        consume()
    gc.collect()
    assert not feed_threads()


def test_resident_feed_on_a_device_module(rows):
    """On a device (the strict CuPy-like module): one upload of everything, then each
    batch is a gather on the device; the values are the direct reads'."""
    f, data = rows
    xs_mod = strict_xp.module
    feed = CoefficientFeed(f, xs_mod)
    assert feed.resident  # 103 × 17 coefficients fit the module's 2 GiB
    strict_xp.COUNTS.clear()
    got = list(feed.batches(np.arange(103)[::-1], 25))
    assert all(type(g).__module__ == "cupy_strict" for g in got)
    np.testing.assert_array_equal(np.concatenate([to_host(g) for g in got]), data[::-1])
    assert strict_xp.COUNTS["upload"] == 1 + len(got)  # the array once, then batch indices
    strict_xp.COUNTS.clear()
    list(feed.batches(np.arange(10), 5))  # a second pass: nothing re-uploaded but indices
    assert strict_xp.COUNTS["upload"] == 2


@pytest.mark.gpu
@pytest.mark.parametrize("resident", [True, False])  # False: pinned double buffers
def test_gpu_feed_equals_direct_reads(rows, resident):
    import cupy

    f, data = rows
    idx = np.random.default_rng(2).permutation(103)
    got = [b.get() for b in CoefficientFeed(f, cupy, resident=resident).batches(idx, 16)]
    np.testing.assert_array_equal(np.concatenate(got), data[idx])
    assert not feed_threads()


def test_abort_mid_pass_leaves_no_reader(tmp_path):
    sim = make_particles(tmp_path / "d", n=120, n_classes=2, box=32, psize=3.0, seed=5)
    p = ClassifyParams(n_classes=2, max_resolution=8.0, online_iters=0, full_iters=2,
                       batch_size=16, seed=1, device="cpu")  # fmt: skip
    seen: list = []
    cb = Callbacks(progress=lambda *a: seen.append(a), should_stop=lambda: len(seen) >= 3)
    with pytest.raises(Aborted):
        classify(sim.particles, p, callbacks=cb)
    assert len(seen) == 3  # stopped inside the first pass, three batches in
    gc.collect()
    assert not feed_threads()
