"""RELION pipeline conventions for External jobs: version detection, output nodes, exit files.

RELION runs an External job from the project directory and waits for one of the exit files
``RELION_JOB_EXIT_SUCCESS`` / ``_FAILURE`` / ``_ABORTED`` in the job directory; before
``SUCCESS`` the job lists its outputs in ``RELION_OUTPUT_NODES.star``, with node types that
differ by version (3.1 integers, 4.0 and 5.0 labels).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from companion.errors import InputError, ParameterError
from companion.io.atomic import atomic_write_text
from companion.relion.star import format_star

log = logging.getLogger(__name__)

VERSIONS = ("3.1", "4.0", "5.0")
DEFAULT_VERSION = "4.0"

EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
EXIT_FILES = (EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED)
ABORT_NOW = "RELION_JOB_ABORT_NOW"
OUTPUT_NODES = "RELION_OUTPUT_NODES.star"

# Node kinds this project writes -> type per RELION version (3.1: integer, 4.0/5.0: label).
# None: the version has no node of that kind (the file is not listed there).
NODE_TYPES: dict[str, dict[str, int | str | None]] = {
    # run_itNNN_data.star of a 2D classification
    "particles": {
        "3.1": 3,
        "4.0": "ParticlesData.star.relion.class2d",
        "5.0": "ParticleGroupMetadata.star.relion.class2d",
    },
    # run_itNNN_optimiser.star: what 4.0/5.0 Subset selection opens
    "optimiser": {
        "3.1": None,
        "4.0": "ProcessData.star.relion.optimiser.class2d",
        "5.0": "OptimiserData.star.relion.class2d",
    },
    # run_itNNN_model.star: what 3.1 Subset selection opens (NODE_MODEL)
    "model": {"3.1": 8, "4.0": None, "5.0": None},
    # particles.star of the selected classes (like a Select job's output)
    "selected_particles": {
        "3.1": 3,
        "4.0": "ParticlesData.star.relion",
        "5.0": "ParticleGroupMetadata.star.relion",
    },
    # class_averages.star of the selected classes
    "class_averages": {
        "3.1": 5,
        "4.0": "ImagesData.star.relion.classaverages",
        "5.0": "Image2DGroupMetadata.star.relion.classaverages",
    },
}


def normalise_version(value: str | float | int) -> str:
    """'3', '3.1', '4', '4.0', '5', '5.0', 30001, 50001 -> '3.1' | '4.0' | '5.0'."""
    text = str(value).strip().lower().removeprefix("relion").strip().lstrip("-_ v")
    table = {
        "3": "3.1",
        "3.1": "3.1",
        "31": "3.1",
        "4": "4.0",
        "4.0": "4.0",
        "40": "4.0",
        "5": "5.0",
        "5.0": "5.0",
        "50": "5.0",
        "50001": "5.0",
    }
    if text in table:
        return table[text]
    m = re.fullmatch(r"(\d)\.(\d)(\.\d+)?", text)
    if m and f"{m.group(1)}.{m.group(2)}" in VERSIONS:
        return f"{m.group(1)}.{m.group(2)}"
    raise ParameterError(
        f"--relion_version: unknown RELION version {value!r} — use 3.1, 4.0 or 5.0"
    )


def detect_version(project_dir: str | Path = ".", override: str | None = None) -> str:
    """The RELION version of a project, from its ``default_pipeline.star``.

    ``# version 50001`` → 5.0; ``_rlnPipeLineNodeTypeLabel`` (or ``...ProcessTypeLabel``)
    → 4.0; ``_rlnPipeLineNodeType`` (or ``...ProcessType``) integers → 3.1. Without a
    pipeline file (or one that says nothing) the default is 4.0, with a log line.
    ``override`` (e.g. from ``--relion_version``) wins.
    """
    if override:
        version = normalise_version(override)
        log.info("RELION version %s (set by --relion_version)", version)
        return version
    path = Path(project_dir) / "default_pipeline.star"
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        log.info(
            "no %s: assuming RELION %s (set --relion_version to change)", path, DEFAULT_VERSION
        )
        return DEFAULT_VERSION
    except OSError as exc:
        raise InputError(f"{path}: cannot read the pipeline file ({exc})") from None
    if re.search(r"^#\s*version\s+5\d{4}\b", text, re.M):
        version = "5.0"
    elif re.search(r"^_rlnPipeLine(Node|Process)TypeLabel\b", text, re.M):
        version = "4.0"
    elif re.search(r"^_rlnPipeLine(Node|Process)Type\b", text, re.M):
        version = "3.1"
    else:
        log.info("%s names no version: assuming RELION %s", path, DEFAULT_VERSION)
        return DEFAULT_VERSION
    log.info("RELION version %s (from %s)", version, path)
    return version


def node_type(kind: str, version: str) -> int | str | None:
    """The node type of ``kind`` for ``version`` (None: not a node in that version)."""
    try:
        return NODE_TYPES[kind][normalise_version(version)]
    except KeyError:
        raise ValueError(f"unknown node kind {kind!r}; known: {sorted(NODE_TYPES)}") from None


def format_output_nodes(nodes: Sequence[tuple[str, str]], version: str) -> str:
    """The text of ``RELION_OUTPUT_NODES.star`` for ``(node_name, kind)`` pairs."""
    version = normalise_version(version)
    rows = [(name, node_type(kind, version)) for name, kind in nodes]
    rows = [(name, t) for name, t in rows if t is not None]
    label = "rlnPipeLineNodeType" if version == "3.1" else "rlnPipeLineNodeTypeLabel"
    table = pd.DataFrame({"rlnPipeLineNodeName": [n for n, _ in rows], label: [t for _, t in rows]})
    return format_star({"output_nodes": table}, star_version(version))


def star_version(version: str) -> str:
    """The ``# version`` number RELION ``version`` writes in its STAR files."""
    return "50001" if normalise_version(version) == "5.0" else "30001"


def write_output_nodes(
    job_dir: str | Path,
    nodes: Sequence[tuple[str | Path, str]],
    version: str,
    project_dir: str | Path = ".",
) -> Path:
    """Write ``RELION_OUTPUT_NODES.star`` listing ``(path, kind)`` nodes; returns its path.

    Paths are written relative to ``project_dir`` (RELION's node names). Every listed file
    must exist: a missing one raises (a node file must never name a file that is not there).
    """
    job_dir = Path(job_dir)
    project = Path(os.path.abspath(project_dir))
    named: list[tuple[str, str]] = []
    for path, kind in nodes:
        p = Path(path)
        full = p if p.is_absolute() else project / p
        if not full.is_file():
            raise InputError(f"{full}: output node file is missing — not listing it")
        named.append((node_name(full, project), kind))
    out = job_dir / OUTPUT_NODES
    atomic_write_text(out, format_output_nodes(named, version))
    return out


def node_name(path: str | Path, project_dir: str | Path = ".") -> str:
    """``path`` as RELION names it: relative to the project directory when inside it
    (symbolic links are kept: job directories are often links to scratch space)."""
    full = Path(os.path.abspath(path))
    try:
        return full.relative_to(Path(os.path.abspath(project_dir))).as_posix()
    except ValueError:
        return full.as_posix()


# --- exit and abort files -------------------------------------------------------------


def clear_exit_files(job_dir: str | Path) -> None:
    """Remove stale exit files (RELION does this before 'continue'; be safe when it did not)."""
    for name in EXIT_FILES:
        (Path(job_dir) / name).unlink(missing_ok=True)


def write_exit_file(job_dir: str | Path, status: str) -> Path:
    """Touch the exit file for ``status`` ('success' | 'failure' | 'aborted'), removing others."""
    names = {"success": EXIT_SUCCESS, "failure": EXIT_FAILURE, "aborted": EXIT_ABORTED}
    if status not in names:
        raise ValueError(f"unknown exit status {status!r}")
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    for name in EXIT_FILES:
        if name != names[status]:
            (job_dir / name).unlink(missing_ok=True)
    path = job_dir / names[status]
    path.touch()
    return path


class AbortWatcher:
    """Polls for ``RELION_JOB_ABORT_NOW`` (the GUI's abort button) in a job directory.

    Use :meth:`requested` as a classifier ``should_stop`` callback; call :meth:`clear`
    once the run has stopped (RELION expects the program to remove the file).
    """

    def __init__(self, job_dir: str | Path) -> None:
        self.path = Path(job_dir) / ABORT_NOW
        self.seen = False

    def requested(self) -> bool:
        if self.path.exists():
            self.seen = True
        return self.seen

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
