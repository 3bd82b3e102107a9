"""A strict, CuPy-like array module for tests: NumPy underneath, a device's rules on top.

Why not ``array-api-strict``: the classifier relies on what NumPy and CuPy share beyond the
Array API — complex64 arrays viewed as interleaved float32 (one real GEMM), ``bincount``,
``take_along_axis``, fancy indexing with integer arrays, ``fft.rfft2`` on a batch — so a run
against ``array-api-strict`` would test a rewrite, not the code the GPU runs. This module
instead behaves like CuPy where CuPy differs from NumPy, and is stricter where a GPU would be
slow or fail:

- ``np.asarray(dev)`` / ``np.some_function(dev)`` (a NumPy-only call on a device array),
  ``float(x)``, ``int(x)``, ``bool(x)``, ``x.item()``, ``x.tolist()``, iterating over a device
  array, using it as a NumPy index, mixing a host ndarray into device arithmetic or into an
  ``xp`` function: ``StrictError``.
- A float64/complex128 result of arithmetic whose array inputs were all 32-bit (a silent
  promotion, e.g. by an ``np.float64`` scalar): ``StrictError``. Explicit ``astype`` and
  ``dtype=`` requests are allowed.
- Element access returns 0-d device arrays (as CuPy), not host scalars.

Transfers are counted in ``COUNTS``: ``upload`` (``xp.asarray`` of host data, a host index
into a device array), ``download`` (``.get()``, what ``backend.to_host`` calls), ``sync``
(calls whose output size depends on data — ``nonzero``, boolean-mask indexing — which wait
for the device on CuPy).
"""

from __future__ import annotations

import sys
import types
from collections import Counter
from typing import Any

import numpy as np

COUNTS: Counter = Counter()
_SYNC_FUNCS = {"nonzero", "flatnonzero", "argwhere", "unique", "compress", "extract"}
_WIDE = (np.dtype(np.float64), np.dtype(np.complex128))
_NARROW = (np.dtype(np.float32), np.dtype(np.complex64))


class StrictError(AssertionError):
    """A call a GPU array would not allow (or would make slow)."""


def _is_host(a: Any) -> bool:
    return isinstance(a, np.ndarray) and not isinstance(a, StrictArray) and a.ndim > 0


def _unwrap(a: Any, *, allow_host: bool = False) -> Any:
    if isinstance(a, StrictArray):
        return a.view(np.ndarray)
    if _is_host(a) and not allow_host:
        raise StrictError(f"host ndarray {a.shape} {a.dtype} passed to a device function")
    if isinstance(a, (list, tuple)):
        return type(a)(_unwrap(v, allow_host=allow_host) for v in a)
    return a


def _wrap(a: Any) -> Any:
    if isinstance(a, np.ndarray):
        return a.view(StrictArray)
    if isinstance(a, np.generic):
        return np.asarray(a).view(StrictArray)
    if isinstance(a, tuple):
        return tuple(_wrap(v) for v in a)
    if isinstance(a, list):
        return [_wrap(v) for v in a]
    return a


def _narrow_inputs(args: Any) -> bool:
    """True when some array (or NumPy scalar) input is 32-bit floating/complex and none is
    64-bit (integer and bool inputs neither count nor promote)."""
    found = False
    for a in args:
        if isinstance(a, (list, tuple)):
            if not _narrow_inputs(a):
                return False
            continue
        if isinstance(a, (np.ndarray, np.generic)):
            if a.dtype in _WIDE:
                return False
            found = found or a.dtype in _NARROW
    return found


def _check_wide(name: str, args: Any, kwargs: dict, out: Any) -> None:
    if "dtype" in kwargs or name in ("astype", "asarray", "array", "zeros", "ones", "empty"):
        return
    outs = out if isinstance(out, tuple) else (out,)
    if any(isinstance(o, np.ndarray) and o.dtype in _WIDE for o in outs) and _narrow_inputs(args):
        raise StrictError(f"{name}: silent float64 promotion of 32-bit inputs")


def _index(key: Any) -> Any:
    """A device array's index: device arrays unwrapped, host arrays counted as uploads,
    boolean masks counted as syncs."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, StrictArray):
        if key.dtype == bool:
            COUNTS["sync"] += 1
        return key.view(np.ndarray)
    if _is_host(key):
        COUNTS["upload"] += 1
        if key.dtype == bool:
            COUNTS["sync"] += 1
    return key


class StrictArray(np.ndarray):
    """A device array: NumPy storage, CuPy's (and stricter) rules."""

    __module__ = "cupy_strict"

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        for a in inputs:
            if _is_host(a):
                raise StrictError(f"{ufunc.__name__}: host ndarray {a.shape} mixed with a "
                                  "device array")  # fmt: skip
        raw = [_unwrap(a) for a in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(_unwrap(o) for o in kwargs["out"])
        res = getattr(ufunc, method)(*raw, **kwargs)
        if method == "at":
            return None
        _check_wide(ufunc.__name__, raw, kwargs, res)
        return _wrap(res)

    def __array_function__(self, func, types, args, kwargs):
        raise StrictError(f"numpy.{func.__name__} called on a device array (use xp.)")

    def __array__(self, dtype=None, copy=None):
        raise StrictError("implicit device → host conversion (np.asarray of a device array)")

    def __getitem__(self, key):
        return _wrap(self.view(np.ndarray)[_index(key)])

    def __setitem__(self, key, value):
        if _is_host(value):
            COUNTS["upload"] += 1
        elif isinstance(value, StrictArray):
            value = value.view(np.ndarray)
        self.view(np.ndarray)[_index(key)] = value

    def _refuse(self, *a, **k):
        raise StrictError("implicit device → host conversion (float/int/bool/item/iter)")

    __float__ = __int__ = __bool__ = __index__ = __complex__ = _refuse
    __iter__ = item = tolist = _refuse

    def astype(self, dtype, *a, **k):
        return _wrap(self.view(np.ndarray).astype(dtype, *a, **k))

    def get(self) -> np.ndarray:
        """Download (counted)."""
        COUNTS["download"] += 1
        return np.array(self.view(np.ndarray))

    def __repr__(self) -> str:
        return f"StrictArray({self.view(np.ndarray)!r})"


def _function(name: str, fn: Any) -> Any:
    def call(*args, **kwargs):
        if name in _SYNC_FUNCS:
            COUNTS["sync"] += 1
        res = fn(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
        _check_wide(name, [*_unwrap(args), *_unwrap(list(kwargs.values()))], kwargs, res)
        return _wrap(res)

    call.__name__ = name
    return call


def asarray(a: Any, dtype: Any = None) -> StrictArray:
    """Host data → device (counted), or a device array (no copy)."""
    if isinstance(a, StrictArray):
        return a if dtype is None else a.astype(dtype, copy=False)
    if isinstance(a, (np.ndarray, list, tuple)) and np.size(a) > 1:
        COUNTS["upload"] += 1
    return np.asarray(a, dtype=dtype).view(StrictArray)


class _UFunc:
    """A ufunc that refuses host arrays (``xp.exp(host)``) and unwraps for ``.at``/``.reduce``."""

    def __init__(self, name: str, uf: np.ufunc) -> None:
        self._call, self._uf = _function(name, uf), uf

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return _function(f"{self._uf.__name__}.{attr}", getattr(self._uf, attr))


class _Namespace(types.ModuleType):
    def __init__(self, name: str, base: Any) -> None:
        super().__init__(name)
        self._base = base

    def __getattr__(self, attr: str) -> Any:
        obj = getattr(self._base, attr)
        if isinstance(obj, np.ufunc):
            wrapped = _UFunc(attr, obj)
        elif isinstance(obj, (type, types.ModuleType)) or not callable(obj):
            return obj
        else:
            wrapped = _function(attr, obj)
        setattr(self, attr, wrapped)
        return wrapped


class _Csr:
    """A device CSR matrix (scipy underneath): ``m @ dense`` with a device ``dense``."""

    def __init__(self, m: Any) -> None:
        COUNTS["upload"] += 1
        self._m = m
        self.shape = m.shape

    def __matmul__(self, dense: Any) -> Any:
        if not isinstance(dense, StrictArray):
            raise StrictError("sparse product with a host operand")
        res = self._m @ dense.view(np.ndarray)
        _check_wide("spmm", [dense.view(np.ndarray)], {}, res)
        return _wrap(np.asarray(res))


class _MemPool:
    def free_bytes(self) -> int:
        return 0


module = _Namespace("cupy_strict", np)
module.__version__ = "strict-" + np.__version__
module.asarray = asarray
module.array = asarray
module.ndarray = StrictArray
module.fft = _Namespace("cupy_strict.fft", np.fft)
module.linalg = _Namespace("cupy_strict.linalg", np.linalg)
module.cuda = types.SimpleNamespace(
    runtime=types.SimpleNamespace(
        memGetInfo=lambda: (2 << 30, 4 << 30), getDeviceCount=lambda: 1
    ),  # fmt: skip
    Device=lambda: types.SimpleNamespace(id=0),
)
module.get_default_memory_pool = _MemPool
module.csr_from_scipy = _Csr


def _csr_from_parts(data, indices, indptr, shape):
    import scipy.sparse as sp

    m = sp.csr_matrix(tuple(a.view(np.ndarray) for a in (data, indices, indptr)), shape=shape)
    COUNTS["upload"] -= 1  # built on the device from device arrays: no transfer
    return _Csr(m)


module.csr_from_parts = _csr_from_parts
sys.modules["cupy_strict"] = module
