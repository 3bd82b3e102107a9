"""Open particles from any host: dispatch by file suffix to the RELION or CryoSPARC reader.

``.star`` → :mod:`companion.relion`, ``.cs`` → :mod:`companion.cryosparc`. Nothing here knows
a host field name; the host packages report problems as one-line messages.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from companion.contrast import ContrastCheck, measure_contrast
from companion.errors import InputError
from companion.host import host_for_path
from companion.particles import ParticleSet

log = logging.getLogger("companion.sources")

MAX_REPEATS_LISTED = 3


def host_of(path: str | Path) -> str:
    """``"relion"`` or ``"cryosparc"`` from the file suffix; InputError otherwise."""
    return host_for_path(path).name


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: file not found — check the path")
    if path.is_dir():
        raise InputError(f"{path}: is a directory — give the particles .star or .cs file")


def open_particles(path: str | Path, project_dir: str | Path | None = None) -> ParticleSet:
    """Read the particles in ``path`` (STAR or .cs); InputError on the first fatal problem."""
    path = Path(path)
    host = host_for_path(path)
    _check_exists(path)
    particles = host.read(path, project_dir)
    dup = duplicate_images(particles)
    if dup:
        log.warning("%s", dup)
    return particles


def duplicate_images(particles: ParticleSet) -> str | None:
    """A one-line note when some image (stack, index) is listed more than once, else None."""
    n = len(particles)
    if n < 2:
        return None
    key = particles.stack_index.astype(np.int64) * (1 << 32) + particles.image_index
    order = np.argsort(key, kind="stable")
    same = np.flatnonzero(key[order][1:] == key[order][:-1]) + 1
    if same.size == 0:
        return None
    rows = np.sort(particles.source_row[order[same]]) + 1
    return (
        f"{particles.source_path}: {same.size} duplicate particle(s): the same image is listed "
        f"more than once (first repeat at row {rows[0]}) — each copy counts as a separate "
        "particle and weighs twice in the averages; remove the duplicate rows"
    )


@dataclass
class Inspection:
    """What :func:`inspect_report` found: the particles (if readable) and every problem.

    ``blocking`` is True when classification cannot run on this input (unreadable file,
    a fatal metadata error, or images that cannot be read).
    """

    path: Path
    host: str | None
    particles: ParticleSet | None
    problems: list[str] = field(default_factory=list)
    blocking: bool = False
    measured_contrast: ContrastCheck | None = None


def inspect_report(path: str | Path, project_dir: str | Path | None = None) -> Inspection:
    """Read ``path`` like :func:`open_particles`, but collect every problem instead of stopping.

    The strict reader runs first; if it succeeds its notes are non-fatal, and only image
    problems (missing stacks, indices past the end, box mismatch, mixed pixel sizes) block.
    If it fails the host's inspector collects every problem, and the input is blocking.
    """
    path = Path(path)
    try:
        host = host_for_path(path)
        _check_exists(path)
    except InputError as exc:
        return Inspection(path, None, None, [str(exc)], blocking=True)
    try:
        particles = host.read(path, project_dir)
    except InputError as exc:
        particles, problems = host.inspect(path, project_dir)
        if not problems:
            problems = [str(exc)]
        return Inspection(path, host.name, particles, _dedupe(problems), blocking=True)
    notes = list(particles.problems)
    dup = duplicate_images(particles)
    if dup:
        notes.append(dup)
    blocking = _summarise_repeats(path, particles.check_images())
    if len(particles) == 0:
        blocking.append(f"{path}: no particles — nothing to classify")
    else:
        try:
            particles.pixel_size  # noqa: B018 - raises on mixed pixel sizes
        except InputError as exc:
            blocking.append(str(exc))
    measured = None
    if not blocking:
        measured = measure_contrast(particles)
        if measured.verdict == "dark":
            notes.append(
                f"{path}: images read protein dark on average (sign test z = {measured.z:.1f} "
                f"over {measured.n_sampled} particles) although the file declares the contrast "
                "as read — the convention looks inverted; class averages would come out "
                "negative (for a .cs file, pass --contrast to override blob/sign)"
            )
    # blocking problems first: the closing error line names the first problem
    return Inspection(
        path, host.name, particles, _dedupe(blocking + notes), bool(blocking), measured
    )


def inspect(
    path: str | Path, project_dir: str | Path | None = None
) -> tuple[ParticleSet | None, list[str]]:
    """``(particles or None, every problem found)`` for ``path`` (STAR or .cs)."""
    report = inspect_report(path, project_dir)
    return report.particles, report.problems


def _dedupe(problems: list[str]) -> list[str]:
    return list(dict.fromkeys(problems))


def _summarise_repeats(path: Path, problems: list[str]) -> list[str]:
    """The same stack problem on many stacks: the first few lines, then one count line."""
    groups: dict[str, list[str]] = {}
    for p in problems:
        key = re.sub(r"row \d+", "row #", re.sub(r"\S+\.mrcs?\b", "STACK", p))
        groups.setdefault(key, []).append(p)
    out: list[str] = []
    for lines in groups.values():
        out += lines[:MAX_REPEATS_LISTED]
        if len(lines) > MAX_REPEATS_LISTED:
            rest = len(lines) - MAX_REPEATS_LISTED
            out.append(f"{path}: {rest} more image stacks with the same problem as the line above")
    return out
