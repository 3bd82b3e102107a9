"""The E-step's particle coefficients, batch after batch, with the reading hidden behind the
scoring.

- CPU (NumPy): a read-ahead thread reads batch i + 1 from the on-disk cache (``pread``
  releases the GIL) while batch i is scored.
- GPU (CuPy): when the whole (N, F) coefficient array fits the free device memory (beside
  the batch work budget) it is uploaded once and kept resident: a batch is a gather on the
  device. Otherwise two pinned host buffers: the read-ahead thread reads batch i + 1 into
  one and starts its copy to the device on a side stream, which the compute stream waits
  for (an event) only when it takes the batch.

A reader thread lives for one batch: it ends when its read ends, so an exception or an
abort in the consumer leaves at most one read in flight, which :meth:`Batches.close` (also
called on exhaustion, ``with`` exit and garbage collection) waits for. An error in the
reader is raised in the consumer, at the batch it belongs to.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from companion.classify.backend import available_memory, is_cupy, to_device, work_budget

log = logging.getLogger(__name__)

#: resident on the device when the coefficients take at most this fraction of the device
#: memory left free beside two batch work budgets
RESIDENT_FRACTION = 0.5
THREAD_NAME = "companion-feed"


class _Read:
    """One batch read on its own thread; ``result()`` joins it and re-raises its error."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), name=THREAD_NAME,
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _run(self, fn: Any, args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # handed to the consumer
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return self._value

    def wait(self) -> None:
        self._thread.join()


class CoefficientFeed:
    """Coefficient batches of one prepared particle set on one device (see the module).

    ``coeffs``: an (N, F) row array (``coeffs[idx]`` reads rows, e.g. a
    :class:`diskcache.RowFile`); ``resident``: keep everything on the device (default: when
    it fits; never on the CPU, where the rows are read from the page cache anyway).
    """

    def __init__(self, coeffs: Any, xp: Any, *, resident: bool | None = None) -> None:
        self.coeffs, self.xp = coeffs, xp
        self.device = is_cupy(xp)
        self.shape = tuple(coeffs.shape)
        self.dtype = np.dtype(getattr(coeffs, "dtype", np.complex64))
        nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        if resident is None:
            resident = self.device and nbytes <= RESIDENT_FRACTION * max(
                0, available_memory(xp) - 2 * work_budget(xp)
            )
        self.resident = bool(resident and self.device)
        self._all: Any = None
        self._pinned: _Pinned | None = None
        if self.resident:
            log.info("particle coefficients resident on the device (%.2f GiB)", nbytes / 2**30)

    def _upload_all(self) -> Any:
        """The whole array on the device, read in slabs (host memory: one slab)."""
        xp = self.xp
        out = xp.empty(self.shape, self.dtype)
        n = self.shape[0]
        row = max(1, int(np.prod(self.shape[1:])) * self.dtype.itemsize)
        step = max(1, (256 << 20) // row)
        for s in range(0, n, step):
            rows = np.arange(s, min(n, s + step))
            out[s : s + step] = to_device(np.asarray(self.coeffs[rows]), xp)
        return out

    def batches(self, idx: np.ndarray, batch: int) -> Batches:
        """The coefficients of ``idx[s:s + batch]`` for s = 0, batch, 2·batch, … (device
        arrays, in that order)."""
        idx = np.asarray(idx)
        chunks = [idx[s : s + batch] for s in range(0, len(idx), max(int(batch), 1))]
        return Batches(self, chunks)

    # ------------------------------------------------------------------ per backend

    def _read_host(self, chunk: np.ndarray) -> np.ndarray:
        return np.asarray(self.coeffs[chunk])

    def _start(self, chunk: np.ndarray) -> Any:
        """Begin fetching ``chunk``: a handle for :meth:`_finish`."""
        if self.resident:
            if self._all is None:
                self._all = self._upload_all()
            return chunk
        if not self.device:
            return _Read(self._read_host, chunk)
        if self._pinned is None:
            self._pinned = _Pinned(self.xp, self.shape[1:], self.dtype)
        return self._pinned.start(self.coeffs, chunk)

    def _finish(self, handle: Any) -> Any:
        if self.resident:
            return self._all[to_device(handle, self.xp)]
        if not self.device:
            return handle.result()
        return self._pinned.finish(handle)

    def _abandon(self, handle: Any) -> None:
        if isinstance(handle, _Read):
            handle.wait()
        elif isinstance(handle, tuple) and handle and isinstance(handle[0], _Read):
            handle[0].wait()


class Batches(Iterator[Any]):
    """Iterator over one pass's batches, one batch read ahead (see :class:`CoefficientFeed`)."""

    def __init__(self, feed: CoefficientFeed, chunks: Sequence[np.ndarray]) -> None:
        self._feed, self._chunks = feed, list(chunks)
        self._i = 0
        self._pending: Any = feed._start(self._chunks[0]) if self._chunks else None

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Any:
        if self._pending is None:
            raise StopIteration
        handle, self._pending = self._pending, None
        self._i += 1
        try:
            value = self._feed._finish(handle)
        except BaseException:
            self.close()
            raise
        if self._i < len(self._chunks):  # read ahead while the caller scores this batch
            self._pending = self._feed._start(self._chunks[self._i])
        return value

    def close(self) -> None:
        """Wait for a read still in flight and drop it (idempotent)."""
        handle, self._pending = self._pending, None
        if handle is not None:
            self._feed._abandon(handle)
        self._i = len(self._chunks)

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class _Pinned:
    """Two pinned host buffers and a copy stream (CuPy): batch i + 1 is read into one buffer
    and copied to the device on the side stream while batch i is scored."""

    def __init__(self, xp: Any, row_shape: tuple, dtype: np.dtype) -> None:
        self.xp, self.row_shape, self.dtype = xp, tuple(row_shape), dtype
        self.device_id = xp.cuda.Device().id
        self.stream = xp.cuda.Stream(non_blocking=True)
        self.bufs: list[Any] = [None, None]
        self.copied: list[Any] = [None, None]  # event: the copy out of buffer s is done
        self.slot = 0

    def _buffer(self, slot: int, n: int) -> np.ndarray:
        buf = self.bufs[slot]
        if buf is None or buf.shape[0] < n:
            count = n * int(np.prod(self.row_shape, dtype=np.int64))
            mem = self.xp.cuda.alloc_pinned_memory(count * self.dtype.itemsize)
            buf = np.frombuffer(mem, self.dtype, count).reshape((n, *self.row_shape))
            self.bufs[slot] = buf
        return buf[:n]

    def _load(self, coeffs: Any, chunk: np.ndarray, slot: int, after: Any) -> tuple:
        xp = self.xp
        with xp.cuda.Device(self.device_id):
            if self.copied[slot] is not None:  # the buffer's previous copy has left it
                self.copied[slot].synchronize()
            host = self._buffer(slot, len(chunk))
            host[...] = coeffs[chunk]
            # the device block may be one the compute stream freed with work still queued
            self.stream.wait_event(after)
            with self.stream:
                dev = xp.empty(host.shape, self.dtype)
                dev.set(host, stream=self.stream)
                done = self.stream.record()
            self.copied[slot] = done
            return dev, done

    def start(self, coeffs: Any, chunk: np.ndarray) -> tuple:
        slot, self.slot = self.slot, 1 - self.slot
        after = self.xp.cuda.get_current_stream().record()
        return (_Read(self._load, coeffs, chunk, slot, after),)

    def finish(self, handle: tuple) -> Any:
        dev, done = handle[0].result()
        self.xp.cuda.get_current_stream().wait_event(done)
        return dev


def feed_for(owner: Any, coeffs: Any, xp: Any) -> CoefficientFeed:
    """The feed of ``coeffs`` kept on ``owner`` (one per run: a resident device copy is
    uploaded once, not per iteration)."""
    feed = owner.__dict__.get("_coefficient_feed")
    if feed is None or feed.coeffs is not coeffs or feed.xp is not xp:
        feed = CoefficientFeed(coeffs, xp)
        owner.__dict__["_coefficient_feed"] = feed
    return feed
