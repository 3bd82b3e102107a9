"""Offline CryoSPARC outputs of a 2D classification: what CryoSPARC's own 2D job would save.

``particles.cs`` (uid + every ``alignments2D/*`` field; join it with the input on uid, as
CryoSPARC joins a job's output with its passthrough), ``class_averages.mrc`` (K images,
float32, pixel size in the header) and ``class_averages.cs`` (the ``template`` output:
``blob/idx`` = class index = image in the .mrc). All three appear together or not at all.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import ExitStack
from pathlib import Path

import mrcfile
import numpy as np
from cryosparc.dataset import Dataset

from companion.classify.result import ClassResult
from companion.cryosparc import conventions as cv
from companion.cryosparc.dataset_io import mix64, particle_uids
from companion.particles import ParticleSet

PARTICLES_NAME = "particles.cs"
AVERAGES_MRC_NAME = "class_averages.mrc"
AVERAGES_CS_NAME = "class_averages.cs"


def write_class2d_outputs(
    out_dir: str | Path, particles: ParticleSet, result: ClassResult
) -> dict[str, Path]:
    """Write the three files into ``out_dir``; returns ``{"particles", "class_averages",
    "class_averages_mrc"}`` → path. Nothing is left half-written if any step fails."""
    out = Path(out_dir)
    psize = particles.pixel_size
    uids = particle_uids_for(particles)
    parts = Dataset([("uid", uids), *cv.alignments2d_fields(particles, result).items()])
    templates = Dataset(
        [
            ("uid", template_uids(uids, result.n_classes)),
            *cv.class_average_fields(result, AVERAGES_MRC_NAME, psize).items(),
        ]
    )
    paths = {
        "particles": out / PARTICLES_NAME,
        "class_averages": out / AVERAGES_CS_NAME,
        "class_averages_mrc": out / AVERAGES_MRC_NAME,
    }
    out.mkdir(parents=True, exist_ok=True)
    # every file goes to a temporary name first; renames happen only after all three exist
    with ExitStack() as stack:
        tmp = {key: stack.enter_context(_deferred(path)) for key, path in paths.items()}
        write_mrc_stack(tmp["class_averages_mrc"], result.averages, psize)
        parts.save(str(tmp["particles"]))
        templates.save(str(tmp["class_averages"]))
    return paths


SELECTED_NAME = "particles_selected.cs"


def write_selected_particles(
    out_dir: str | Path, particles: ParticleSet, result: ClassResult, keep: np.ndarray
) -> Path:
    """``particles_selected.cs``: the rows of ``particles.cs`` whose class is in ``keep``
    (bool per class), what CryoSPARC's Select 2D saves as particles_selected."""
    path = Path(out_dir) / SELECTED_NAME
    rows = np.flatnonzero(np.asarray(keep, dtype=bool)[np.asarray(result.class_id)])
    fields = cv.alignments2d_fields(particles, result)
    ds = Dataset([("uid", particle_uids_for(particles)[rows]),
                  *((k, v[rows]) for k, v in fields.items())])  # fmt: skip
    with _deferred(path) as tmp:
        ds.save(str(tmp))
    return path


def particle_uids_for(particles: ParticleSet) -> np.ndarray:
    """The input's own uids for a CryoSPARC dataset, else :func:`particle_uids`."""
    if isinstance(particles.passthrough, Dataset):
        return np.array(particles.passthrough["uid"], dtype=np.uint64)
    return particle_uids(particles)


def template_uids(particle_uids: np.ndarray, k: int) -> np.ndarray:
    """K deterministic template uids derived from the particles' uids."""
    digest = hashlib.blake2b(np.ascontiguousarray(particle_uids).tobytes(), digest_size=8)
    seed = np.uint64(int.from_bytes(digest.digest(), "little"))
    return mix64(seed ^ mix64(np.arange(k, dtype=np.uint64)))


def write_mrc_stack(path: str | Path, images: np.ndarray, psize: float) -> None:
    """A valid MRC2014 image stack (ispg 0, float32, voxel size ``psize``) at ``path``."""
    data = np.ascontiguousarray(np.asarray(images), dtype=np.float32)
    if data.ndim == 2:
        data = data[np.newaxis]
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
        mrc.voxel_size = float(psize)
        mrc.update_header_stats()


class _deferred:
    """Context manager: a temp path for ``path``, renamed by the ExitStack only on success.

    Unlike ``dataset_io.atomic_path`` (one file), the rename waits until every file of the set
    has been written: on any failure all temporaries are removed and no target changes.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif self.tmp.exists():
            self.tmp.unlink()
        return False
