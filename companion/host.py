"""The host interface: what companion needs from RELION or CryoSPARC, in one place.

A :class:`Host` reads particles, inspects them, writes a classification result in the
host's own format and names its External-job program. :func:`host_named` and
:func:`host_for_path` are the only places that map a name or a file suffix to a host;
``companion.run.run_classification`` dispatches on the Host, never on host strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from companion.classify.result import ClassResult
from companion.errors import InputError, ParameterError
from companion.particles import ParticleSet


@dataclass(frozen=True)
class Host:
    """One host: its package (``read_particles``, ``inspect_particles``), ``writer``
    (``module:function`` taking ``(out_dir, root, particles, result, iteration)``), its
    particle-file suffix and External-job module."""

    name: str
    package: str
    writer: str
    suffix: str
    external_job: str
    iterations_in_subdirectories: bool
    selector: str  # ``module:function`` writing the particles of chosen classes
    class_base: int  # class numbering users type: RELION 1-based, CryoSPARC 0-based

    def _mod(self) -> Any:
        return import_module(self.package)

    def read(self, path: str | Path, project_dir: str | Path | None = None) -> ParticleSet:
        """The particles of ``path``; InputError on the first fatal problem."""
        return self._mod().read_particles(path, project_dir)

    def inspect(
        self, path: str | Path, project_dir: str | Path | None = None
    ) -> tuple[ParticleSet | None, list[str]]:
        """``(particles or None, every problem found)`` without stopping at the first."""
        return self._mod().inspect_particles(path, project_dir)

    def write_result(
        self, out_dir: Path, root: str, particles: ParticleSet, result: ClassResult, iteration: int
    ) -> dict[str, Path]:
        """Write ``result`` in the host's format into ``out_dir``; ``{name: path}``."""
        module, func = self.writer.split(":")
        write = getattr(import_module(module), func)
        paths = write(out_dir, root, particles, result, iteration)
        return {key: Path(p) for key, p in (paths or {}).items()}

    def write_selection(
        self,
        out_dir: Path,
        particles: ParticleSet,
        result: ClassResult,
        keep: Any,
        paths: dict[str, Path],
        *,
        chosen: Any = None,
    ) -> dict[str, Path]:
        """Write the particles of the classes ``keep`` (bool per class) as the host's own
        class selection would — only those of ``chosen`` (bool per particle, e.g.
        ``Selection.particles``) when given; ``{name: path}`` (nothing when no class is
        kept)."""
        import logging

        if not keep.any():
            logging.getLogger("companion.run").warning(
                "--select: no class selected; no selection written"
            )
            return {}
        module, func = self.selector.split(":")
        out = getattr(import_module(module), func)(out_dir, particles, result, keep, paths,
                                                   chosen=chosen)  # fmt: skip
        return {key: Path(p) for key, p in out.items()}

    def iteration_dir(self, out_dir: Path, iteration: int) -> Path:
        """Where a kept intermediate iteration goes (RELION names files by iteration)."""
        if self.iterations_in_subdirectories:
            return out_dir / f"iteration_{iteration:03d}"
        return out_dir

    def external_job_main(self, argv: list[str] | None = None) -> int:
        """Run the host's External-job program (what its console script runs)."""
        return int(import_module(self.external_job).main(argv) or 0)


RELION = Host(
    "relion",
    "companion.relion",
    "companion.relion.class2d:write_class2d_outputs",
    ".star",
    "companion.relion.external_job",
    iterations_in_subdirectories=False,
    selector="companion.relion.class2d:write_selected",
    class_base=1,
)
CRYOSPARC = Host(
    "cryosparc",
    "companion.cryosparc",
    "companion.cryosparc.outputs:write_result",
    ".cs",
    "companion.cryosparc.external_job",
    iterations_in_subdirectories=True,  # its files carry no iteration in their names
    selector="companion.cryosparc.outputs:write_selection",
    class_base=0,
)
HOSTS = {h.name: h for h in (RELION, CRYOSPARC)}


def host_named(name: str) -> Host:
    """The Host called ``name`` (``ParticleSet.host``); ParameterError for any other."""
    host = HOSTS.get(name)
    if host is None:
        raise ParameterError(
            f"particles come from host {name!r}; companion writes results for 'relion' or "
            "'cryosparc' inputs only — read them with companion.relion or companion.cryosparc"
        )
    return host


def host_for_path(path: str | Path) -> Host:
    """The Host whose particle files end like ``path``; InputError otherwise."""
    p = Path(path)
    for host in HOSTS.values():
        if p.suffix.lower() == host.suffix:
            return host
    raise InputError(
        f"{p}: unknown particle file type {p.suffix or '(no suffix)'!r} — give a RELION "
        "particles .star file or a CryoSPARC .cs file"
    )
