"""Offline CryoSPARC outputs of a 2D classification: what CryoSPARC's own 2D job would save.

``particles.cs`` (uid + every ``alignments2D/*`` field, and the ``posteriors/*`` slot with
``--posteriors``; join it with the input on uid, as
CryoSPARC joins a job's output with its passthrough), ``class_averages.mrc`` (K images,
float32, pixel size in the header) and ``class_averages.cs`` (the ``template`` output:
``blob/idx`` = class index = image in the .mrc; ``blob/path`` relative to the particles'
project directory, as CryoSPARC paths are). All three appear together or not at all.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from cryosparc.dataset import Dataset

from companion.classify.result import ClassResult
from companion.cryosparc import conventions as cv
from companion.cryosparc.dataset_io import mix64, particle_uids
from companion.io.atomic import atomic_path, atomic_paths
from companion.io.mrc import write_mrc_stack
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
    parts = Dataset([("uid", uids), *particle_fields(particles, result).items()])
    templates = Dataset(
        [
            ("uid", template_uids(uids, result.n_classes)),
            *cv.class_average_fields(
                result, project_path(out / AVERAGES_MRC_NAME, particles.project_dir), psize
            ).items(),
        ]
    )
    paths = {
        "particles": out / PARTICLES_NAME,
        "class_averages": out / AVERAGES_CS_NAME,
        "class_averages_mrc": out / AVERAGES_MRC_NAME,
    }
    out.mkdir(parents=True, exist_ok=True)
    # every file goes to a temporary name first; renames happen only after all three exist
    with atomic_paths(paths) as tmp:
        write_mrc_stack(tmp["class_averages_mrc"], result.averages, psize)
        parts.save(str(tmp["particles"]))
        templates.save(str(tmp["class_averages"]))
    return paths


def particle_fields(particles: ParticleSet, result: ClassResult) -> dict[str, np.ndarray]:
    """Every field of ``particles.cs`` but uid: ``alignments2D/*``, then ``posteriors/*``
    (with --posteriors), ``lineage/*`` (--subclassify) and ``stability/*`` (--stability)."""
    return {**cv.alignments2d_fields(particles, result), **cv.posterior_fields(result),
            **cv.companion_fields(result)}  # fmt: skip


def project_path(path: Path, project_dir: str | Path) -> str:
    """``path`` as a CryoSPARC ``blob/path``: relative to the project directory when it lies
    inside it, else absolute (CryoSPARC resolves relative paths against the project)."""
    full = Path(os.path.abspath(path))
    try:
        return full.relative_to(Path(os.path.abspath(project_dir))).as_posix()
    except ValueError:
        return full.as_posix()


def write_result(
    out_dir: str | Path, root: str, particles: ParticleSet, result: ClassResult, iteration: int
) -> dict[str, Path]:
    """:func:`write_class2d_outputs` with the Host writer's arguments (CryoSPARC's file
    names carry neither ``root`` nor ``iteration``)."""
    return write_class2d_outputs(out_dir, particles, result)


SELECTED_NAME = "particles_selected.cs"


def write_selected_particles(
    out_dir: str | Path, particles: ParticleSet, result: ClassResult, keep: np.ndarray,
    chosen: np.ndarray | None = None,
) -> Path:  # fmt: skip
    """``particles_selected.cs``: the rows of ``particles.cs`` whose class is in ``keep``
    (bool per class; only those of ``chosen``, bool per particle, when given), what
    CryoSPARC's Select 2D saves as particles_selected."""
    path = Path(out_dir) / SELECTED_NAME
    member = np.asarray(keep, dtype=bool)[np.asarray(result.class_id)]
    if chosen is not None:
        member &= np.asarray(chosen, dtype=bool)
    rows = np.flatnonzero(member)
    fields = particle_fields(particles, result)
    ds = Dataset([("uid", particle_uids_for(particles)[rows]),
                  *((k, v[rows]) for k, v in fields.items())])  # fmt: skip
    with atomic_path(path) as tmp:
        ds.save(str(tmp))
    return path


def write_selection(
    out_dir: Path, particles: ParticleSet, result: ClassResult, keep: np.ndarray,
    paths: dict[str, Path], *, chosen: np.ndarray | None = None,
) -> dict[str, Path]:  # fmt: skip
    """The Host selection writer: ``particles_selected.cs``."""
    path = write_selected_particles(out_dir, particles, result, keep, chosen)
    return {"selected_particles": path}


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
