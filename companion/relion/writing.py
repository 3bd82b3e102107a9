"""Write a ParticleSet as a RELION 3.1-layout particle STAR file (optics + particles)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from companion.particles import ParticleSet
from companion.relion.star import write_star
from companion.relion.tables import RelionTables

log = logging.getLogger(__name__)


def write_particles(
    path: str | Path,
    particles: ParticleSet,
    columns: Mapping[str, np.ndarray] | None = None,
    *,
    optics_columns: Mapping[str, np.ndarray] | None = None,
    image_root: str | Path | None = None,
    version: str | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Write ``particles`` to ``path`` (RELION 3.1 layout), atomically; returns the optics
    table written and each particle's ``rlnOpticsGroup`` in it (int64).

    When ``particles.passthrough`` holds RELION tables, every input column is kept in order
    and ``columns`` (``{"rlnClassNumber": array, ...}``, one value per particle) are replaced
    in place or appended; ``optics_columns`` (one value per optics row) likewise.
    ``rlnImageName`` is kept as read (relative to the RELION project directory) unless
    ``image_root`` is given, in which case it is rewritten relative to ``image_root``.
    Otherwise (particles from another host or the simulator) the optics and particle tables
    are generated from the ParticleSet, image paths relative to ``image_root`` (default: the
    output file's directory). ``version``: the ``# version`` header (default: the source's,
    30001 for generated tables).

    Columns read from the input are written so they read back exactly; values in
    ``columns`` exactly when a short form exists, else at RELION's precision (6 decimals).
    """
    path = Path(path)
    version_override = version
    tables = particles.passthrough
    if isinstance(tables, RelionTables):
        if len(tables) != len(particles):
            raise ValueError(
                f"passthrough has {len(tables)} rows for {len(particles)} particles; "
                "use ParticleSet.subset so both are taken together"
            )
        optics = tables.optics.copy(deep=False)
        table = tables.particles.copy(deep=False)
        if image_root is not None:
            table["rlnImageName"] = _image_names(particles, Path(image_root))
        version = tables.output_version
    else:
        optics, table = _generate(particles, Path(image_root) if image_root else path.parent)
        version = "30001"
    _warn_conventions(particles)
    table = _with_columns(table, columns, "columns")
    optics = _with_columns(optics, optics_columns, "optics_columns")
    new = {str(k).lstrip("_") for k in (columns or {})} | {
        str(k).lstrip("_") for k in (optics_columns or {})
    }
    write_star(
        path,
        {"optics": optics, "particles": table},
        version_comment=version_override or version,
        approximate=new,
    )
    ids = pd.to_numeric(table["rlnOpticsGroup"], errors="coerce").fillna(0).to_numpy(np.int64)
    return optics, ids


def _with_columns(
    df: pd.DataFrame, columns: Mapping[str, np.ndarray] | None, what: str
) -> pd.DataFrame:
    if not columns:
        return df
    df = df.copy(deep=False)
    for name, values in columns.items():
        label = str(name).lstrip("_")
        arr = values if isinstance(values, pd.Categorical) else np.asarray(values)
        if len(arr) != len(df):
            raise ValueError(f"{what}[{label!r}] has {len(arr)} values for {len(df)} rows")
        df[label] = arr
    return df


def _relative_stacks(particles: ParticleSet, root: Path) -> list[str]:
    base = os.path.abspath(root)
    return [os.path.relpath(os.path.abspath(p), base) for p in particles.stack_paths]


def _image_names(particles: ParticleSet, root: Path) -> list[str]:
    rel = _relative_stacks(particles, root)
    return [
        f"{i:06d}@{rel[s]}"
        for i, s in zip(
            (particles.image_index + 1).tolist(), particles.stack_index.tolist(), strict=True
        )
    ]


def _generate(particles: ParticleSet, root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Optics and particle tables built from ParticleSet metadata alone."""
    n = len(particles)
    ctf = particles.ctf
    keys = pd.DataFrame(
        {
            "group": particles.optics_group,
            "voltage": ctf.voltage,
            "cs": ctf.cs,
            "q0": ctf.amp_contrast,
            "psize": particles.psize,
            "premult": particles.ctf_premultiplied,
        }
    )
    # one optics row per distinct (group, optics values): RELION keeps these per group
    gid = keys.groupby(list(keys.columns), sort=True).ngroup().to_numpy()
    first = pd.Series(np.arange(n)).groupby(gid).first().to_numpy()
    ids = np.arange(1, len(first) + 1, dtype=np.int64)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": ids,
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in ids],
            "rlnVoltage": ctf.voltage[first],
            "rlnSphericalAberration": ctf.cs[first],
            "rlnAmplitudeContrast": ctf.amp_contrast[first],
            "rlnImagePixelSize": particles.psize[first],
            "rlnImageSize": np.full(len(first), particles.box, dtype=np.int64),
            "rlnImageDimensionality": np.full(len(first), 2, dtype=np.int64),
        }
    )
    if particles.ctf_premultiplied.any():
        optics["rlnCtfDataAreCtfPremultiplied"] = particles.ctf_premultiplied[first]
    rel = _relative_stacks(particles, root)
    mic_codes, mic_names = pd.factorize(np.array([_micrograph(r) for r in rel], dtype=object))
    table = pd.DataFrame(
        {
            "rlnImageName": _image_names(particles, root),
            "rlnMicrographName": pd.Categorical.from_codes(
                mic_codes[particles.stack_index], categories=mic_names
            ),
            "rlnOpticsGroup": ids[gid],
            "rlnDefocusU": ctf.defocus_u,
            "rlnDefocusV": ctf.defocus_v,
            "rlnDefocusAngle": ctf.defocus_angle,
            "rlnPhaseShift": ctf.phase_shift,
            "rlnCtfBfactor": ctf.bfactor,
            "rlnCtfScalefactor": ctf.scale,
        }
    )
    return optics, table


def _micrograph(stack: str) -> str:
    """Micrograph name for a per-micrograph stack: ``mic.mrcs`` → ``mic.mrc``."""
    return stack[:-1] if stack.endswith(".mrcs") else stack


def _warn_conventions(particles: ParticleSet) -> None:
    if len(particles) and np.any(particles.contrast != 1.0):
        log.warning(
            "some stacks store protein black; RELION expects protein white — invert them "
            "(relion_image_handler --multiply_constant -1) before using this STAR in RELION"
        )
    if len(particles) and particles.phase_flipped.any():
        log.warning("images are phase-flipped; tell RELION (--ctf_phase_flipped) when using them")
