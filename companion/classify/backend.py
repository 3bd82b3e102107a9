"""The array module (NumPy or CuPy), device selection and host↔device moves.

Core functions take their array module from their inputs (:func:`get_array_module`), so
one process can run and test both paths; only this module decides where data lives.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def cupy_or_none() -> Any:
    """The cupy module when it imports and sees a GPU, else None."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:
        return None
    return None


def get_array_module(*arrays: Any) -> Any:
    """NumPy or CuPy, whichever owns the arrays (NumPy for scalars and lists)."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np


def to_host(a: Any) -> np.ndarray:
    """A NumPy copy of ``a`` (no-op for NumPy arrays)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)
