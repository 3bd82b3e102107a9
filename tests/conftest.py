"""Shared fixtures: the array-module fixture ``xp`` and paths to the real host files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

REAL_DATA = Path(__file__).resolve().parent / "data"


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


HAS_GPU = gpu_available()


def pytest_collection_modifyitems(config, items):
    has_relion = shutil.which("relion_star_handler") is not None
    skip_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs CuPy and a CUDA GPU")
    skip_relion = pytest.mark.skipif(
        not has_relion, reason="needs Debian's RELION (apt-get install -y relion)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if "relion" in item.keywords:
            item.add_marker(skip_relion)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module under test: NumPy always, CuPy where a GPU exists."""
    if request.param == "numpy":
        return np
    import cupy

    return cupy


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Directory of real RELION/CryoSPARC metadata files (tests/data, see its README.md)."""
    if not REAL_DATA.is_dir():
        pytest.fail(f"real host files not found at {REAL_DATA}")
    return REAL_DATA
