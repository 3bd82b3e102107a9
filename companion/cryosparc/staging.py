"""Particle images for a CryoSPARC job: checked in the mounted project, or copied via the API.

With ``--project-dir`` images are read in place; :func:`check_project_dir` checks every stack
before a job is created. Without it :func:`stage_images` copies the needed images once into
one local stack, downloading one stack file at a time (``project.download_file``; the client
holds that one file in memory) and deleting it after use; :func:`check_disk` checks the space
first.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from companion.cryosparc.client import Source, call
from companion.cryosparc.joblog import JobLog
from companion.errors import InputError
from companion.particles import ParticleSet


def check_project_dir(particles: ParticleSet, project_dir: Path, server_dir: str) -> None:
    """Every stack under ``--project-dir`` present and consistent, else one InputError."""
    if not project_dir.is_dir():
        raise InputError(
            f"--project-dir {project_dir}: not a directory — mount the CryoSPARC "
            f"project directory ({server_dir} on the server) or leave --project-dir"
            " out to read images through the CryoSPARC API"
        )
    problems = particles.check_images()
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise InputError(
            f"{problems[0]}{more} — --project-dir must be project "
            f"{server_dir} as mounted here, or leave it out to read images "
            "through the CryoSPARC API"
        )


def stage_images(source: Source, particles: ParticleSet, root: Path,
                 joblog: JobLog) -> ParticleSet:  # fmt: skip
    """Copy the particles' images into one local stack through the API; bounded memory.

    Stacks are downloaded one at a time (``project.download_file``) into ``root/download``,
    the needed images copied into ``root/particles.mrcs`` (file order) and the download
    deleted. Returns the same particles reading from the local stack.
    """
    import mrcfile
    from tqdm import tqdm

    n, box = len(particles), particles.box
    local = root / "particles.mrcs"
    tmp_dir = root / "download"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    order = np.lexsort((particles.image_index, particles.stack_index))
    new_index = np.empty(n, dtype=np.int64)
    new_index[order] = np.arange(n)
    bounds = np.flatnonzero(np.diff(particles.stack_index[order])) + 1
    groups = np.split(order, bounds)
    done_bytes = 0
    with mrcfile.new_mmap(local, shape=(n, box, box), mrc_mode=2, overwrite=True) as out:
        bar = tqdm(groups, desc="downloading stacks", unit="stack", file=sys.stderr, disable=None)
        for i, group in enumerate(bar):
            s = int(particles.stack_index[group[0]])
            path = particles.stack_paths[s]
            rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
            target = tmp_dir / f"stack_{i}.mrc"
            call(
                source.project.download_file,
                rel,
                target=str(target),
                url=source.url,
                what=f"downloading {rel}",
            )
            done_bytes += target.stat().st_size
            with mrcfile.mmap(target, mode="r", permissive=True) as mrc:
                data = mrc.data if mrc.data.ndim == 3 else mrc.data[np.newaxis]
                idx = particles.image_index[group]
                if data.shape[1:] != (box, box) or idx.max() >= data.shape[0]:
                    row = int(particles.source_row[group[0]]) + 1
                    raise InputError(
                        f"{rel} (downloaded from {source.project.uid}): holds "
                        f"{data.shape[0]} images of {data.shape[-1]} px but row {row} of "
                        f"{source.label} asks for image {int(idx.max()) + 1} of {box} px — "
                        "the particle output and its stacks do not match"
                    )
                out.data[new_index[group]] = data[idx]
            target.unlink()
            joblog.update(
                "download",
                f"Reading particle images through the CryoSPARC API: "
                f"{i + 1}/{len(groups)} stacks "
                f"({done_bytes / 1e9:.2f} GB downloaded)",
                force=i + 1 == len(groups),
            )
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return replace(
        particles,
        stack_paths=[local],
        stack_index=np.zeros(n, dtype=np.int32),
        image_index=new_index,
    )


def check_disk(particles: ParticleSet, root: Path) -> None:
    need = len(particles) * particles.box**2 * 4 * 1.05 + 512e6
    free = shutil.disk_usage(root).free
    if free < need:
        raise InputError(
            f"{root}: copying {len(particles)} particle images through the CryoSPARC API needs "
            f"{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free — use --cache-dir on a larger disk "
            "or mount the project and pass --project-dir"
        )
