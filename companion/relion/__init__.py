"""RELION host package: particle STAR files in and out, and STAR helpers for RELION outputs.

Public API:
    read_particles(path, project_dir=None) -> ParticleSet
    inspect_particles(path, project_dir=None) -> (ParticleSet | None, problems)
    write_particles(path, particles, columns=None, *, optics_columns=None, image_root=None)
    read_star(path) -> {block: DataFrame | dict};  write_star(path, blocks, version_comment)
    RelionTables: the passthrough tables (optics, particles, version, take(idx)).
    write_class2d_outputs: re-exported from companion.relion.class2d.
"""

from __future__ import annotations

from typing import Any

from companion.relion.reading import inspect_particles, read_particles
from companion.relion.star import read_star, write_star
from companion.relion.tables import RelionTables
from companion.relion.writing import write_particles

__all__ = [
    "RelionTables",
    "inspect_particles",
    "read_particles",
    "read_star",
    "write_class2d_outputs",
    "write_particles",
    "write_star",
]


def __getattr__(name: str) -> Any:
    # lazy: class2d builds on this package, so it cannot be imported at package import time
    if name == "write_class2d_outputs":
        from companion.relion.class2d import write_class2d_outputs

        return write_class2d_outputs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
