"""``RelionTables``: a particle STAR file's own tables, kept whole for passthrough.

Columns stay as read (strings stay strings). A RELION 3.0 single-table file is converted
the way RELION 3.1 converts it (``StarConverter::convert_3p0_particlesTo_3p1``): optics
groups are the distinct combinations of the per-particle optics values, which move to an
optics table (magnification and detector pixel size become ``rlnImagePixelSize``), each
particle gains ``rlnOpticsGroup``, and pixel offsets become Å offsets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

# RELION 3.1's order of the per-particle labels that move to the optics table
LEGACY_OPTICS_LABELS = (
    "rlnAmplitudeContrast",
    "rlnBeamTiltX",
    "rlnBeamTiltY",
    "rlnSphericalAberration",
    "rlnVoltage",
    "rlnDetectorPixelSize",
    "rlnMagnification",
)
LEGACY_OFFSETS = {
    "rlnOriginX": "rlnOriginXAngst",
    "rlnOriginY": "rlnOriginYAngst",
    "rlnOriginZ": "rlnOriginZAngst",
    "rlnOriginXPrior": "rlnOriginXPriorAngst",
    "rlnOriginYPrior": "rlnOriginYPriorAngst",
    "rlnOriginZPrior": "rlnOriginZPriorAngst",
    "rlnHelicalTrackLength": "rlnHelicalTrackLengthAngst",
}


@dataclass
class RelionTables:
    """The optics and particle tables of a RELION particle file (3.1 layout).

    Attributes:
        optics: ``data_optics`` (one row per optics group).
        particles: ``data_particles`` (one row per particle, in the ParticleSet's order).
        version: the ``# version`` of the source (``"30001"``, ``"50001"``; ``"30000"`` for a
            converted RELION 3.0 file).
        particles_block: the source's name for the particle table.
        legacy: True when converted from the RELION 3.0 single-table layout.
        relion_version: the RELION version outputs are written for ("3.1", "4.0", "5.0"),
            set by the External job; None: 5.0 for a 50001 source, else the project's.
    """

    optics: pd.DataFrame
    particles: pd.DataFrame
    version: str = "30001"
    particles_block: str = "particles"
    legacy: bool = False
    relion_version: str | None = None

    def __len__(self) -> int:
        return len(self.particles)

    def take(self, idx: np.ndarray) -> RelionTables:
        """The tables of particles ``idx`` (optics table unchanged)."""
        rows = self.particles.iloc[np.asarray(idx)].reset_index(drop=True)
        return replace(self, particles=rows)

    @property
    def output_version(self) -> str:
        """The version to write: 50001 kept, everything else written as 30001 (3.1/4.0)."""
        return "50001" if self.version == "50001" else "30001"


def convert_legacy(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(optics, particles) in the 3.1 layout from a RELION 3.0 particle table."""
    present = [lab for lab in LEGACY_OPTICS_LABELS if lab in table.columns]
    if present:
        keys = table[present].astype(np.float64)
        group = keys.groupby(present, sort=False, dropna=False).ngroup().to_numpy() + 1
    else:
        group = np.ones(len(table), dtype=np.int64)
    first = pd.Series(np.arange(len(table))).groupby(group).first().to_numpy()
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": np.arange(1, len(first) + 1, dtype=np.int64),
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, len(first) + 1)],
        }
    )
    for lab in present:
        optics[lab] = table[lab].to_numpy()[first]
    if "rlnDetectorPixelSize" in optics and "rlnMagnification" in optics:
        optics["rlnImagePixelSize"] = (
            1e4 * optics["rlnDetectorPixelSize"].astype(np.float64) / optics["rlnMagnification"]
        )
        optics = optics.drop(columns=["rlnDetectorPixelSize", "rlnMagnification"])
    particles = table.drop(columns=present)
    particles["rlnOpticsGroup"] = group.astype(np.int64)
    if "rlnImagePixelSize" in optics:
        apix = optics["rlnImagePixelSize"].to_numpy(np.float64)[group - 1]
        for old, new in LEGACY_OFFSETS.items():
            if old in particles:
                particles[new] = particles[old].to_numpy(np.float64) * apix
        particles = particles.drop(columns=[c for c in LEGACY_OFFSETS if c in particles])
    return optics, particles
