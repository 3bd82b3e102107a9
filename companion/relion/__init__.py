"""RELION host package: particle STAR files in and out, and STAR helpers for RELION outputs.

Public API:
    read_particles(path, project_dir=None) -> ParticleSet
    inspect_particles(path, project_dir=None) -> (ParticleSet | None, problems)
    write_particles(path, particles, columns=None, *, optics_columns=None, image_root=None)
    read_star(path) -> {block: DataFrame | dict};  write_star(path, blocks, version_comment)
    RelionTables: the passthrough tables (optics, particles, version, take(idx)).
    write_class2d_outputs: re-exported from companion.relion.class2d.

The names load on first use, so ``python -m companion.relion.external_job`` can set the
thread count before NumPy is imported.
"""

from __future__ import annotations

from companion.lazy import lazy_getattr

_EXPORTS = {
    "RelionTables": "companion.relion.tables",
    "inspect_particles": "companion.relion.reading",
    "read_particles": "companion.relion.reading",
    "read_star": "companion.relion.star",
    "write_class2d_outputs": "companion.relion.class2d",
    "write_particles": "companion.relion.writing",
    "write_star": "companion.relion.star",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
