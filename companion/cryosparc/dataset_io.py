"""Read and write CryoSPARC particle datasets (``.cs`` files) as :class:`ParticleSet`.

Reading needs only the metadata: image stacks are opened lazily when images are read. The
ParticleSet's ``passthrough`` is the loaded :class:`cryosparc.dataset.Dataset` itself (it
offers ``take(idx)``), so writing keeps every input field. Unit and sign conversions live in
:mod:`companion.cryosparc.conventions`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cryosparc.dataset import Dataset

from companion.cryosparc import conventions as cv
from companion.io.atomic import atomic_path
from companion.io.problems import ProblemReport
from companion.particles import CtfParams, ParticleSet, groups_from_names

log = logging.getLogger(__name__)

REQUIRED_BLOB = ("blob/path", "blob/idx", "blob/shape", "blob/psize_A")
REQUIRED_CTF = ("ctf/df1_A", "ctf/df2_A", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast")
# optional ctf fields and the value assumed when a file lacks them
OPTIONAL_CTF = {"ctf/df_angle_rad": 0.0, "ctf/phase_shift_rad": 0.0, "ctf/bfactor": 0.0}
OPTIONAL_CTF_SCALE = 1.0


# ----------------------------------------------------------------------------- reading


def read_particles(
    path: str | Path,
    project_dir: str | Path | None = None,
    *,
    contrast: str | float | None = None,
) -> ParticleSet:
    """Particles of a CryoSPARC ``.cs`` file; raises InputError on the first problem.

    ``blob/path`` is relative to ``project_dir`` (``>`` prefix stripped). Without
    ``project_dir``: the .cs file's directory or the first of its parents in which the
    first referenced stack exists (else the .cs directory). ``contrast`` overrides the
    ``blob/sign`` rule (see :func:`conventions.contrast_from_sign`).
    """
    particles = _read(Path(path), project_dir, contrast, ProblemReport(strict=True))
    assert particles is not None  # strict mode raises instead
    return particles


def inspect_particles(
    path: str | Path,
    project_dir: str | Path | None = None,
    *,
    contrast: str | float | None = None,
    check_images: bool = True,
) -> tuple[ParticleSet | None, list[str]]:
    """``(particles or None, every problem found)`` — for ``companion info``.

    Problems are one-line messages (file, row or field, what to do). With ``check_images``
    the stacks are checked too (missing files, indices past the end, box mismatch).
    """
    report = ProblemReport(strict=False)
    particles = _read(Path(path), project_dir, contrast, report)
    problems = report.errors + report.notes
    if particles is not None and check_images:
        problems += particles.check_images()
    return particles, problems


def read_dataset(
    dset: Dataset,
    label: str,
    project_dir: str | Path,
    *,
    contrast: str | float | None = None,
) -> ParticleSet:
    """Particles of a Dataset already in memory (e.g. a job's output loaded through the API),
    checked like :func:`read_particles`; messages and ``source_path`` name ``label``."""
    particles = _read(Path(label), project_dir, contrast, ProblemReport(strict=True), dset)
    assert particles is not None  # strict mode raises instead
    return particles


def _read(
    path: Path,
    project_dir: str | Path | None,
    contrast: Any,
    report: ProblemReport,
    dset: Dataset | None = None,
) -> ParticleSet | None:
    if dset is None:
        dset = _load(path, report)
    if dset is None:
        return None
    fields = set(dset.fields())
    n = len(dset)
    ok = True
    if n == 0:
        report.error(
            f"{path}: holds no particles (0 rows) — export a particle output that has particles"
        )
        ok = False
    ok &= _check_fields(path, fields, report)
    ok &= _check_dtypes(path, dset, fields, report)
    if not ok:
        return None
    _check_duplicate_uids(path, dset, fields, report)

    box = _box(path, np.asarray(dset["blob/shape"]), report)
    psize = np.array(dset["blob/psize_A"], dtype=np.float32)
    _check_rows(
        path,
        "blob/psize_A",
        ~(np.isfinite(psize) & (psize > 0)),
        "is not positive",
        "fix the pixel size (re-import with the right value)",
        report,
    )
    ctf = _ctf(path, dset, fields, report)

    if "blob/sign" in fields:
        sign = np.array(dset["blob/sign"], dtype=np.float32)
        bad_sign = ~np.isin(sign, np.float32([-1.0, 1.0]))
        fix_sign = "set it to -1 (protein white, CryoSPARC's usual value) or +1 (protein dark)"
        _check_rows(path, "blob/sign", bad_sign, "is not -1 or +1", fix_sign, report)
    else:
        sign = np.full(n, -1.0, dtype=np.float32)
        report.note(f"{path}: no blob/sign field — assumed -1 (CryoSPARC's usual value)")
    contrast_arr = cv.contrast_from_sign(sign, contrast)

    if "ctf/exp_group_id" in fields:
        optics = cv.optics_group_from_exp_group(dset["ctf/exp_group_id"])
    else:
        optics = np.ones(n, dtype=np.int32)

    raw_paths = np.asarray(dset["blob/path"], dtype=object)
    codes, uniques = pd.factorize(raw_paths)
    stripped = [cv.strip_path_prefix(str(p)) for p in uniques]
    codes2, rel_paths = pd.factorize(np.array(stripped, dtype=object))
    stack_index = codes2[codes]
    root = _project_dir(path, project_dir, [str(p) for p in rel_paths], report)
    stack_paths = [Path(os.path.abspath(root / p)) for p in rel_paths]
    if "location/micrograph_uid" in fields:  # one group per micrograph, as RELION forms them
        group, group_names = groups_from_names(
            np.asarray(dset["location/micrograph_uid"]).astype(str).astype(object)
        )
    else:
        group, group_names = groups_from_names(np.asarray(stripped, dtype=object)[codes])
    _check_inside(path, root, stack_paths, [str(p) for p in rel_paths], project_dir, report)

    return ParticleSet(
        source_path=path,
        project_dir=root,
        stack_paths=stack_paths,
        stack_index=stack_index,
        image_index=np.asarray(dset["blob/idx"], dtype=np.int64),
        box=box,
        psize=psize,
        optics_group=optics,
        ctf=ctf,
        contrast=contrast_arr,
        ctf_premultiplied=False,
        phase_flipped=False,
        host="cryosparc",
        passthrough=dset,
        problems=list(report.notes),
        group=group,
        group_names=group_names,
    )


def _load(path: Path, report: ProblemReport) -> Dataset | None:
    fix = "pass a particle .cs file written by CryoSPARC (exported or from a job directory)"
    if not path.exists():
        report.error(f"{path}: file not found — check the path")
        return None
    if not path.is_file():
        report.error(f"{path}: not a file — {fix}")
        return None
    if path.stat().st_size == 0:
        report.error(f"{path}: file is empty — {fix}")
        return None
    try:
        return Dataset.load(path)
    except Exception as exc:  # DatasetLoadError wraps whatever numpy/the parser raised
        cause = str(exc.__cause__ or exc).splitlines()[0]
        if path.suffix.lower() == ".star":
            fix = "this is a STAR file: read it as RELION particles"
        report.error(f"{path}: not a CryoSPARC .cs dataset ({cause}) — {fix}")
        return None


def _check_fields(path: Path, fields: set[str], report: ProblemReport) -> bool:
    ok = True
    for prefix, required, what in (
        ("blob", REQUIRED_BLOB, "particle images"),
        ("ctf", REQUIRED_CTF, "CTF parameters"),
    ):
        present = sorted(f for f in fields if f.startswith(prefix + "/"))
        missing = [f for f in required if f not in fields]
        if not present:
            have = sorted({f.split("/")[0] for f in fields if f != "uid"})
            report.error(
                f"{path}: no {prefix}/* fields ({what}); it has {', '.join(have) or 'only uid'}"
                f" — use a particle output that has the {prefix} slot (Extract, Import, "
                "2D Classification, Select 2D, refinements), or join it with one"
            )
            ok = False
        elif missing:
            report.error(
                f"{path}: field {missing[0]} missing"
                + (f" (and {', '.join(missing[1:])})" if len(missing) > 1 else "")
                + f" — the {prefix} slot is incomplete; re-export the particles from CryoSPARC"
            )
            ok = False
    return ok


# field -> (numpy kinds accepted, trailing shape) for every field the reader uses
FIELD_TYPES: dict[str, tuple[str, tuple[int, ...]]] = {
    "uid": ("ui", ()),
    "blob/path": ("OUS", ()),
    "blob/idx": ("ui", ()),
    "blob/shape": ("ui", (2,)),
    "blob/psize_A": ("uif", ()),
    "blob/sign": ("uif", ()),
    "ctf/exp_group_id": ("ui", ()),
    **{f: ("uif", ()) for f in (*REQUIRED_CTF, *OPTIONAL_CTF, "ctf/scale")},
}


def _check_dtypes(path: Path, dset: Dataset, fields: set[str], report: ProblemReport) -> bool:
    """Every field the reader uses has a usable type and shape (one error per bad field)."""
    ok = True
    for name, (kinds, shape) in FIELD_TYPES.items():
        if name not in fields:
            continue
        arr = np.asarray(dset[name])
        if arr.dtype.kind in kinds and arr.shape[1:] == shape:
            continue
        want = {"ui": "integers", "OUS": "text", "uif": "numbers"}[kinds]
        got = f"{arr.dtype}" + (f" of shape {arr.shape[1:]}" if arr.shape[1:] != shape else "")
        need = f"{want}" + (f" of shape {shape}" if shape else "")
        report.error(
            f"{path}: field {name} holds {got}, not {need} — the file was not written by "
            "CryoSPARC or was edited: re-export the particles from CryoSPARC"
        )
        ok = False
    return ok


def _check_duplicate_uids(
    path: Path, dset: Dataset, fields: set[str], report: ProblemReport
) -> None:
    """A note (never fatal) when some uids occur more than once."""
    if "uid" not in fields:
        return
    uid = np.asarray(dset["uid"])
    uniq, first, counts = np.unique(uid, return_index=True, return_counts=True)
    if len(uniq) == len(uid):
        return
    repeat = np.ones(len(uid), dtype=bool)
    repeat[first] = False
    msg = (
        f"{path}: {len(uid) - len(uniq)} duplicate particle uid(s) (first repeat at row "
        f"{np.flatnonzero(repeat)[0] + 1}) — the same particle would be classified more than "
        "once; remove the duplicates in CryoSPARC (e.g. a Particle Sets Tool intersection)"
    )
    report.note(msg)
    if report.strict:
        log.warning("%s", msg)


def _check_inside(
    path: Path,
    root: Path,
    stacks: list[Path],
    raw: list[str],
    project_dir: str | Path | None,
    report: ProblemReport,
) -> None:
    """blob/path is relative: never absolute, and with an explicit ``--project-dir`` it must
    stay inside it (no ``../`` escape). Without one, ``..`` is allowed: companion itself
    writes paths relative to the .cs file when the stacks lie beside its directory."""
    for stack, rel in zip(stacks, raw, strict=True):
        escapes = project_dir is not None and os.path.commonpath([root, stack]) != str(root)
        if os.path.isabs(rel) or escapes:
            report.error(
                f"{path}: blob/path {rel!r} points outside the project directory {root} — "
                "refused; fix the path or pass the right --project-dir"
            )
            return


def _check_rows(
    path: Path, field: str, bad: np.ndarray, what: str, fix: str, report: ProblemReport
) -> None:
    """Report rows where ``bad`` holds (1-based row of the first, and the count)."""
    if not np.any(bad):
        return
    rows = np.flatnonzero(bad)
    more = f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else ""
    report.error(f"{path}: row {rows[0] + 1}{more}: {field} {what} — {fix}")


def _box(path: Path, shape: np.ndarray, report: ProblemReport) -> int:
    shape = shape.reshape(len(shape), -1)
    uniq, counts = np.unique(shape, axis=0, return_counts=True)
    best = uniq[np.argmax(counts)]
    if len(uniq) > 1:
        odd = np.flatnonzero(np.any(shape != best, axis=1))
        report.error(
            f"{path}: row {odd[0] + 1}: blob/shape {tuple(int(v) for v in shape[odd[0]])} differs"
            f" from {tuple(int(v) for v in best)} of most particles ({len(odd)} rows differ) —"
            " 2D classification needs one box size: re-extract or select one box"
        )
    if best[0] != best[-1]:
        report.error(
            f"{path}: row 1: blob/shape {tuple(int(v) for v in best)} is not square — "
            "re-extract the particles with a square box"
        )
    return int(best[-1])


def _ctf(path: Path, dset: Dataset, fields: set[str], report: ProblemReport) -> CtfParams:
    n = len(dset)

    def col(name: str, default: float) -> np.ndarray:
        if name in fields:
            return np.array(dset[name], dtype=np.float32)
        report.note(f"{path}: no {name} field — assumed {default:g}")
        return np.full(n, default, dtype=np.float32)

    df1 = np.array(dset["ctf/df1_A"], dtype=np.float32)
    df2 = np.array(dset["ctf/df2_A"], dtype=np.float32)
    fix = "re-run CTF estimation for these particles or remove them"
    for name, values in (("ctf/df1_A", df1), ("ctf/df2_A", df2)):
        _check_rows(path, name, np.isnan(values), "is NaN", fix, report)
        _check_rows(path, name, np.isinf(values), "is infinite", fix, report)
        _check_rows(path, name, values < 0, "is negative", fix, report)
    voltage = np.array(dset["ctf/accel_kv"], dtype=np.float32)
    _check_rows(
        path,
        "ctf/accel_kv",
        ~((voltage > 0) & np.isfinite(voltage)),
        "is not a finite positive number",
        "fix the voltage (re-import with the microscope's kV)",
        report,
    )
    amp = np.array(dset["ctf/amp_contrast"], dtype=np.float32)
    _check_rows(
        path,
        "ctf/amp_contrast",
        ~((amp >= 0) & (amp < 1)),
        "is outside [0, 1)",
        "fix the amplitude contrast (usually 0.07-0.1)",
        report,
    )
    cs = np.array(dset["ctf/cs_mm"], dtype=np.float32)
    _check_rows(
        path,
        "ctf/cs_mm",
        ~np.isfinite(cs),
        "is not a number",
        "fix the spherical aberration",
        report,
    )
    rest = {"ctf/df_angle_rad": col("ctf/df_angle_rad", 0.0)}
    rest["ctf/phase_shift_rad"] = col("ctf/phase_shift_rad", 0.0)
    rest["ctf/bfactor"] = col("ctf/bfactor", 0.0)
    for name, values in rest.items():
        _check_rows(path, name, ~np.isfinite(values), "is not a finite number", fix, report)
    return CtfParams(
        defocus_u=df1,
        defocus_v=df2,
        defocus_angle=cv.deg_from_rad(rest["ctf/df_angle_rad"]),
        voltage=voltage,
        cs=cs,
        amp_contrast=amp,
        phase_shift=cv.deg_from_rad(rest["ctf/phase_shift_rad"]),
        bfactor=rest["ctf/bfactor"],
        scale=col("ctf/scale", OPTIONAL_CTF_SCALE),
    )


def _project_dir(
    path: Path, project_dir: str | Path | None, rel_paths: list[str], report: ProblemReport
) -> Path:
    if project_dir is not None:
        root = Path(os.path.abspath(project_dir))
        if not root.is_dir():
            report.error(f"{root}: project directory not found — check --project-dir")
        return root
    here = Path(os.path.abspath(path)).parent
    if rel_paths:
        first = rel_paths[0]
        for cand in (here, *here.parents):
            if (cand / first).is_file():
                return cand
    return here


# ----------------------------------------------------------------------------- writing


def write_particles(
    path: str | Path,
    particles: ParticleSet,
    fields: dict[str, np.ndarray] | None = None,
    *,
    project_dir: str | Path | None = None,
) -> None:
    """Write ``particles`` as a .cs file that ``cryosparc.dataset.Dataset.load`` reads.

    When ``particles.passthrough`` is a CryoSPARC Dataset every input field is kept, in
    order, and only ``fields`` (name → array of N rows) are added or replaced. Otherwise uid,
    ``blob/*`` (paths relative to ``project_dir``, default the output file's directory) and
    ``ctf/*`` are generated with CryoSPARC's dtypes, then ``fields``. Written atomically.
    """
    path = Path(path)
    n = len(particles)
    extra = _normalise_fields(fields, n)
    base = particles.passthrough
    if isinstance(base, Dataset):
        if len(base) != n:
            raise ValueError(f"passthrough has {len(base)} rows, particle set has {n}")
        columns = {name: base[name] for name in base.fields()}
    else:
        root = Path(os.path.abspath(project_dir if project_dir is not None else path.parent))
        columns = generated_fields(particles, root)
    columns.update(extra)
    dset = Dataset(list(columns.items()))
    with atomic_path(path) as tmp:
        dset.save(str(tmp))


def generated_fields(particles: ParticleSet, root: Path) -> dict[str, np.ndarray]:
    """uid, ``blob/*`` and ``ctf/*`` for a ParticleSet from another host (CryoSPARC dtypes)."""
    n = len(particles)
    if particles.ctf_premultiplied.any() or particles.phase_flipped.any():
        log.warning(
            "%s: images are CTF-premultiplied or phase-flipped; a .cs file cannot say so — "
            "CryoSPARC will treat them as plain images",
            particles.source_path,
        )
    rel = np.array([os.path.relpath(p, root) for p in particles.stack_paths], dtype=object)
    ctf = particles.ctf
    zeros = np.zeros(n, dtype=np.float32)
    out: dict[str, Any] = {
        "uid": particle_uids(particles),
        "blob/path": rel[particles.stack_index] if n else np.array([], dtype=object),
        "blob/idx": particles.image_index,
        "blob/shape": np.tile(np.array([particles.box, particles.box]), (n, 1)),
        "blob/psize_A": particles.psize,
        "blob/sign": cv.sign_from_contrast(particles.contrast),
        "blob/import_sig": np.full(n, _hash64(str(particles.source_path))),
        "ctf/type": np.full(n, "imported", dtype=object),
        "ctf/exp_group_id": cv.exp_group_from_optics_group(particles.optics_group),
        "ctf/accel_kv": ctf.voltage,
        "ctf/cs_mm": ctf.cs,
        "ctf/amp_contrast": ctf.amp_contrast,
        "ctf/df1_A": ctf.defocus_u,
        "ctf/df2_A": ctf.defocus_v,
        "ctf/df_angle_rad": cv.rad_from_deg(ctf.defocus_angle),
        "ctf/phase_shift_rad": cv.rad_from_deg(ctf.phase_shift),
        "ctf/scale": ctf.scale,
        "ctf/scale_const": zeros,
        "ctf/bfactor": ctf.bfactor,
    }
    result: dict[str, np.ndarray] = {"uid": out["uid"].astype(np.uint64)}
    for name, dtype, shape in cv.BLOB_FIELDS + cv.CTF_FIELDS:
        value = out.get(name)
        if value is None:
            value = np.zeros((n, *shape), dtype=dtype)
        result[name] = np.asarray(value).astype(dtype).reshape((n, *shape))
    return result


def particle_uids(particles: ParticleSet) -> np.ndarray:
    """Deterministic uint64 uids: a hash of (stack path relative to the project, index).

    The same particle gets the same uid wherever the output goes; rows naming the same
    image twice are told apart by their row number.
    """
    rel = [os.path.relpath(p, particles.project_dir) for p in particles.stack_paths]
    path_hash = np.array([_hash64(r) for r in rel], dtype=np.uint64)
    key = path_hash[particles.stack_index] if len(particles) else np.zeros(0, np.uint64)
    uids = mix64(key ^ mix64(particles.image_index.astype(np.uint64)))
    if len(np.unique(uids)) < len(uids):
        uids = mix64(uids ^ mix64(np.arange(1, len(uids) + 1, dtype=np.uint64)))
    return uids


def _hash64(text: str) -> np.uint64:
    return np.uint64(
        int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    )


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (uint64 arithmetic wraps)."""
    x = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _normalise_fields(fields: dict[str, Any] | None, n: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, value in (fields or {}).items():
        arr = np.asarray(value)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)  # .cs has no boolean type
        elif arr.dtype.kind in "US":
            arr = arr.astype(object)
        if arr.ndim == 0 or arr.shape[0] != n:
            raise ValueError(f"field {name!r} has shape {arr.shape}, expected {n} rows")
        out[name] = arr
    return out
