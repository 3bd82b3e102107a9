"""The one MRC stack writer (CryoSPARC's class_averages.mrc, RELION's classes.mrcs)."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np

from companion.io.atomic import atomic_path


def write_mrc_stack(
    path: str | Path, images: np.ndarray, psize: float, *, single_section_cell: bool = False
) -> None:
    """A valid MRC2014 image stack (ispg 0, float32, voxel size ``psize`` Å, header
    statistics filled in) at ``path``, written atomically.

    ``single_section_cell``: the cell spans one section (``mz`` 1, cell z = ``psize``), as
    RELION writes a 2D stack, so the pixel size reads the same on all three axes."""
    data = np.ascontiguousarray(np.asarray(images), dtype=np.float32)
    if data.ndim == 2:
        data = data[np.newaxis]
    with atomic_path(path) as tmp, mrcfile.new(str(tmp), overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
        mrc.voxel_size = float(psize)
        if single_section_cell:
            h = mrc.header
            h.mz = 1
            h.cella = (h.nx * float(psize), h.ny * float(psize), float(psize))
        mrc.update_header_stats()
