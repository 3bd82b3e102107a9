"""ParticleSet: the one in-memory model every source produces and every sink consumes.

Metadata is held as flat NumPy arrays (one entry per particle) so a million particles
cost tens of megabytes; images stay on disk and are read lazily, grouped by stack file,
through memory maps (see :mod:`companion.stacks`).

Units and conventions are RELION's throughout (the host readers convert):
defocus in Å (positive = underfocus), angles in degrees, voltage in kV, Cs in mm,
pixel size in Å/px, image indices 0-based. Images are returned with protein *white*
(RELION's convention): ``contrast`` records the sign that turns stored pixels into that.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from companion.errors import InputError

CTF_FIELDS = (
    "defocus_u",
    "defocus_v",
    "defocus_angle",
    "voltage",
    "cs",
    "amp_contrast",
    "phase_shift",
    "bfactor",
    "scale",
)


@dataclass
class CtfParams:
    """Per-particle CTF parameters (float32 arrays of length N), RELION units."""

    defocus_u: np.ndarray  # Å
    defocus_v: np.ndarray  # Å
    defocus_angle: np.ndarray  # degrees
    voltage: np.ndarray  # kV
    cs: np.ndarray  # mm
    amp_contrast: np.ndarray  # fraction (Q0)
    phase_shift: np.ndarray  # degrees
    bfactor: np.ndarray  # Å^2
    scale: np.ndarray  # dimensionless

    def __post_init__(self) -> None:
        for name in CTF_FIELDS:
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.float32))

    def take(self, idx: np.ndarray) -> CtfParams:
        return CtfParams(**{k: getattr(self, k)[idx] for k in CTF_FIELDS})

    def as_dict(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in CTF_FIELDS}


@dataclass
class ParticleSet:
    """Particles from one source: metadata arrays plus lazy image access.

    Attributes:
        source_path: the file the particles were read from (STAR or .cs).
        project_dir: directory image paths are resolved against.
        stack_paths: unique stack files (absolute paths), indexed by ``stack_index``.
        stack_index: int32[N], index into ``stack_paths`` per particle.
        image_index: int64[N], 0-based image index inside its stack.
        box: image side in pixels (all particles share one box).
        psize: float32[N] pixel size in Å/px.
        optics_group: int32[N], 1-based optics / exposure group id.
        ctf: per-particle CTF parameters.
        contrast: float32[N]; stored pixels times this give protein-white images.
        ctf_premultiplied: bool[N], images were already multiplied by their CTF.
        phase_flipped: bool[N], images were phase-flipped.
        host: the host that wrote the source (``"relion"`` or ``"cryosparc"``).
        passthrough: the source's own tables (host-specific; only the host package reads it;
            must offer ``take(idx)`` returning the subset).
        source_row: int64[N], 0-based row of each particle in the source table (for errors).
        problems: non-fatal problems found while reading (for ``companion info``).
        group: int32[N], 0-based index into ``group_names``: the particle's group (RELION's
            micrograph group: rlnGroupName, else rlnMicrographName, else the optics group).
            Noise spectra and intensity scale are estimated per group.
        group_names: the group names (tuple of str); default: one group per optics group.
    """

    source_path: Path
    project_dir: Path
    stack_paths: list[Path]
    stack_index: np.ndarray
    image_index: np.ndarray
    box: int
    psize: np.ndarray
    optics_group: np.ndarray
    ctf: CtfParams
    contrast: np.ndarray
    ctf_premultiplied: np.ndarray
    phase_flipped: np.ndarray
    host: str
    passthrough: Any = None
    source_row: np.ndarray | None = None
    problems: list[str] = field(default_factory=list)
    group: np.ndarray | None = None
    group_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.image_index)
        self.stack_index = np.ascontiguousarray(self.stack_index, dtype=np.int32)
        self.image_index = np.ascontiguousarray(self.image_index, dtype=np.int64)
        self.psize = _full(self.psize, n, np.float32)
        self.optics_group = _full(self.optics_group, n, np.int32)
        self.contrast = _full(self.contrast, n, np.float32)
        self.ctf_premultiplied = _full(self.ctf_premultiplied, n, bool)
        self.phase_flipped = _full(self.phase_flipped, n, bool)
        self.stack_paths = [Path(p) for p in self.stack_paths]
        if self.source_row is None:
            self.source_row = np.arange(n, dtype=np.int64)
        self.source_row = _full(self.source_row, n, np.int64)
        if self.group is None:
            self.group, self.group_names = groups_from_names(
                np.array([f"opticsGroup{g}" for g in self.optics_group.tolist()], dtype=object)
            )
        self.group = _full(self.group, n, np.int32)
        self.group_names = tuple(str(g) for g in self.group_names)
        if n and (self.group.min() < 0 or self.group.max() >= len(self.group_names)):
            raise ValueError(f"group indices outside 0..{len(self.group_names) - 1}")

    def __len__(self) -> int:
        return len(self.image_index)

    @property
    def n(self) -> int:
        return len(self)

    @property
    def pixel_size(self) -> float:
        """The common pixel size; raises InputError when particles disagree."""
        lo, hi = float(self.psize.min()), float(self.psize.max())
        if hi - lo > 1e-3 * hi:
            raise InputError(
                f"{self.source_path}: particles have pixel sizes from {lo:.4f} to {hi:.4f} Å; "
                "2D classification needs one pixel size — rescale or select one optics group"
            )
        return float(np.median(self.psize))

    def image_paths(self) -> np.ndarray:
        """Per-particle stack path (object array of str), for writers and reports."""
        paths = np.array([str(p) for p in self.stack_paths], dtype=object)
        return paths[self.stack_index]

    def subset(self, idx: np.ndarray) -> ParticleSet:
        """A new ParticleSet holding particles ``idx`` (passthrough is subset by the host)."""
        idx = np.asarray(idx)
        return replace(
            self,
            stack_index=self.stack_index[idx],
            image_index=self.image_index[idx],
            psize=self.psize[idx],
            optics_group=self.optics_group[idx],
            ctf=self.ctf.take(idx),
            contrast=self.contrast[idx],
            ctf_premultiplied=self.ctf_premultiplied[idx],
            phase_flipped=self.phase_flipped[idx],
            source_row=self.source_row[idx],
            group=self.group[idx],
            passthrough=None if self.passthrough is None else self.passthrough.take(idx),
            problems=list(self.problems),
        )

    def read_images(self, idx: np.ndarray, *, normalise_contrast: bool = True) -> np.ndarray:
        """Images of particles ``idx`` (in that order) as float32[len(idx), box, box]."""
        from companion.stacks import read_images

        return read_images(self, np.asarray(idx), normalise_contrast=normalise_contrast)

    def iter_batches(
        self, batch_size: int, idx: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(particle_indices, images)`` batches in file order, bounded memory."""
        from companion.stacks import iter_batches

        yield from iter_batches(self, batch_size, idx)

    def check_images(self) -> list[str]:
        """Problems with the image files (missing stacks, indices past the end, box mismatch)."""
        from companion.stacks import check_stacks

        return check_stacks(self)


def groups_from_names(names: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """(0-based group index per particle, group names in order of first appearance) from
    one name per particle — RELION numbers its groups the same way."""
    codes, uniques = pd.factorize(np.asarray(names, dtype=object))
    return codes.astype(np.int32), tuple(str(u) for u in uniques)


def _full(value: Any, n: int, dtype: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        arr = np.full(n, arr, dtype=dtype)
    if arr.shape != (n,):
        raise ValueError(f"expected {n} values, got shape {arr.shape}")
    return np.ascontiguousarray(arr)
