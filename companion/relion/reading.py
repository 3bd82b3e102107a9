"""Read RELION particle STAR files (3.1+ and the 3.0 single-table layout) into a ParticleSet.

``read_particles`` stops at the first problem a user must fix (InputError, one line naming
the file, row or field, and the fix); ``inspect_particles`` reads as far as it can and
returns every problem it finds (for ``companion info``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pandas as pd

from companion.errors import InputError
from companion.io.problems import ProblemReport as _Report
from companion.io.problems import StopReading as _Stop
from companion.particles import CtfParams, ParticleSet, groups_from_names
from companion.relion.star import StarFile, check_text, crlf_message, parse_star, read_bytes
from companion.relion.tables import RelionTables, convert_legacy

PARTICLE_FILE_HINT = (
    "give a particles STAR file (Extract/jobNNN/particles.star, Select/jobNNN/particles.star "
    "or a Class2D run_itNNN_data.star)"
)


def read_particles(path: str | Path, project_dir: str | Path | None = None) -> ParticleSet:
    """Particles of a RELION STAR file; InputError on the first problem a user must fix.

    ``project_dir``: directory the image paths are relative to. None: the first directory
    in which the first referenced stack exists among the working directory, the STAR file's
    directory and its parents (the STAR file's directory when none has it). Stacks need not
    exist to read the metadata. Non-fatal problems are listed in ``ParticleSet.problems``.
    """
    particles, _ = _read(Path(path), project_dir, _Report(strict=True))
    assert particles is not None
    return particles


def inspect_particles(
    path: str | Path, project_dir: str | Path | None = None, *, check_images: bool = True
) -> tuple[ParticleSet | None, list[str]]:
    """Read as much as possible and return ``(particles or None, every problem found)``.

    With ``check_images``, problems with the stacks (missing files, indices past the end,
    wrong box) are included too.
    """
    report = _Report(strict=False)
    try:
        particles, problems = _read(Path(path), project_dir, report)
    except (_Stop, InputError) as exc:
        if isinstance(exc, InputError):
            report.problems.append(str(exc))
        return None, report.problems
    if check_images and particles.box > 0:
        problems.extend(_summarise_missing(Path(path), particles.check_images()))
        particles.problems = list(problems)
    return particles, problems


def _summarise_missing(path: Path, problems: list[str], keep: int = 3) -> list[str]:
    """At most ``keep`` 'stack not found' lines, then one line counting the rest."""
    missing = [p for p in problems if "not found" in p]
    if len(missing) <= keep:
        return problems
    rest = [p for p in problems if "not found" not in p]
    more = f"{path}: {len(missing) - keep} more image stacks not found — check --project-dir"
    return missing[:keep] + [more] + rest


def _read(
    path: Path, project_dir: str | Path | None, rep: _Report
) -> tuple[ParticleSet, list[str]]:
    data = read_bytes(path)
    if not data or data.isspace():
        rep.stop(f"{path}: empty file — {PARTICLE_FILE_HINT}")
    check_text(path, data)
    if b"\r" in data:
        rep.error(crlf_message(path, data))
    star = parse_star(path, data, allow_crlf=True)
    for note in star.notes:
        rep.note(note)
    tables = _tables(path, star, rep)
    particles = _particle_set(path, tables, project_dir, rep)
    return particles, rep.problems


def _tables(path: Path, star: StarFile, rep: _Report) -> RelionTables:
    loops = {k: b for k, b in star.blocks.items() if isinstance(b, pd.DataFrame)}
    named = [k for k, b in loops.items() if "rlnImageName" in b.columns]
    if "particles" in loops and "particles" not in named:
        rep.stop(
            f"{path}: data_particles has no rlnImageName column — each particle needs its "
            "image (NNNNNN@stack.mrcs); re-extract the particles or add the column"
        )
    if not named:
        rep.stop(_not_particles_message(path, star, loops))
    pname = "particles" if "particles" in named else named[0]
    if len(named) > 1:
        rep.note(
            f"{path}: {len(named)} particle tables ({', '.join('data_' + k for k in named)}); "
            f"using data_{pname}"
        )
    ptable = loops[pname]
    if len(ptable) == 0:
        rep.stop(f"{path}: data_{pname} holds no particles — {PARTICLE_FILE_HINT}")
    oname = _optics_block(loops, pname)
    if oname is None:
        optics, particles = convert_legacy(ptable)
        return RelionTables(optics, particles, star.version or "30000", pname, legacy=True)
    optics = loops[oname]
    if len(optics) == 0:
        rep.stop(
            f"{path}: data_{oname} has no rows — each optics group needs one (rlnOpticsGroup, "
            "rlnImagePixelSize, rlnVoltage, ...); restore the optics table from the job that "
            "wrote the file"
        )
    if "rlnOpticsGroup" not in ptable.columns:
        if len(optics) != 1:
            rep.stop(
                f"{path}: data_{pname} has no rlnOpticsGroup column but data_{oname} has "
                f"{len(optics)} optics groups — add rlnOpticsGroup to every particle"
            )
        rep.note(f"{path}: data_{pname} has no rlnOpticsGroup; all particles use data_{oname}")
        ptable = ptable.copy()
        ptable["rlnOpticsGroup"] = optics["rlnOpticsGroup"].iloc[0]
    return RelionTables(optics, ptable, star.version or "30001", pname)


def _not_particles_message(path: Path, star: StarFile, loops: dict[str, pd.DataFrame]) -> str:
    blocks = ", ".join("data_" + k for k in star.blocks) or "no data blocks"
    if "fsc" in loops or "rlnFinalResolution" in star.blocks.get("general", {}):
        kind = "a post-processing STAR file"
    elif "optimiser_general" in star.blocks:
        kind = "a RELION optimiser file"
    elif "model_general" in star.blocks:
        kind = "a RELION model file"
    elif any(k.startswith("pipeline") for k in star.blocks):
        kind = "a RELION pipeline file"
    elif any("rlnDefocusU" in b or "rlnCoordinateX" in b for b in loops.values()):
        return (
            f"{path}: no rlnImageName column in any table ({blocks}) — these look like "
            "micrographs or coordinates, not extracted particles; extract particles first"
        )
    else:
        kind = "not a particle file"
    return f"{path}: {kind} ({blocks}), no table with rlnImageName — {PARTICLE_FILE_HINT}"


def _optics_block(loops: dict[str, pd.DataFrame], pname: str) -> str | None:
    if "optics" in loops:
        return "optics"
    for name, table in loops.items():
        cols = table.columns
        if name != pname and "rlnOpticsGroup" in cols and "rlnImageName" not in cols:
            if "rlnImagePixelSize" in cols or "rlnVoltage" in cols:
                return name
    return None


def _particle_set(
    path: Path, tables: RelionTables, project_dir: str | Path | None, rep: _Report
) -> ParticleSet:
    pt, ot = tables.particles, tables.optics
    where = f"{path}: data_{tables.particles_block}"
    n = len(pt)
    row_of = _optics_rows(path, where, pt, ot, rep)

    def optics_value(label: str, why: str, default: float | None = None) -> np.ndarray:
        if label in ot.columns:
            vals = pd.to_numeric(ot[label], errors="coerce").to_numpy(np.float64)
            return np.where(row_of >= 0, vals[np.maximum(row_of, 0)], np.nan)
        if label in pt.columns:
            return pd.to_numeric(pt[label], errors="coerce").to_numpy(np.float64)
        if default is None:
            rep.error(f"{where}: no {label} here or in data_optics — {why}")
            return np.full(n, np.nan)
        return np.full(n, default, dtype=np.float64)

    need = "the CTF needs it; add it to the optics table"
    old_psize = {"rlnDetectorPixelSize", "rlnMagnification"} <= set(ot.columns)
    if "rlnImagePixelSize" not in ot.columns and old_psize:
        ot = ot.assign(rlnImagePixelSize=1e4 * ot["rlnDetectorPixelSize"] / ot["rlnMagnification"])
    psize_fix = (
        "add rlnMagnification and rlnDetectorPixelSize, or use the RELION 3.1 layout"
        if tables.legacy
        else "add the particles' pixel size (Å) to data_optics"
    )
    psize = optics_value("rlnImagePixelSize", psize_fix)
    if np.any(psize <= 0):
        row, more = _first_row(psize <= 0)
        rep.error(f"{where} row {row}: pixel size {psize[row - 1]:g} Å{more} — fix data_optics")
    voltage = optics_value("rlnVoltage", need)
    cs = optics_value("rlnSphericalAberration", need)
    q0 = optics_value("rlnAmplitudeContrast", need)
    optics_ctf = (("rlnVoltage", voltage), ("rlnSphericalAberration", cs))
    for label, vals in (*optics_ctf, ("rlnAmplitudeContrast", q0)):
        odd = (row_of >= 0) & ~_finite32(vals)
        if label == "rlnVoltage":
            odd |= vals <= 0
        if odd.any():
            row, more = _first_row(odd)
            rep.error(f"{where} row {row}: {label} is {vals[row - 1]:g}{more} — fix data_optics")
            vals[odd] = np.nan  # reported; NaN, not inf, in the float32 CtfParams
    premult = optics_value("rlnCtfDataAreCtfPremultiplied", "", default=0.0)
    ctf = _ctf(path, where, pt, rep)
    stack_index, image_index, stack_names = _image_names(where, pt, rep)
    pdir, stack_paths = _resolve_stacks(path, stack_names, project_dir, rep)
    box = _box(path, tables, row_of, stack_paths, rep)
    return ParticleSet(
        source_path=path.absolute(),
        project_dir=pdir,
        stack_paths=stack_paths,
        stack_index=stack_index,
        image_index=image_index,
        box=box,
        psize=psize,
        optics_group=pd.to_numeric(pt["rlnOpticsGroup"], errors="coerce")
        .fillna(0)
        .to_numpy(np.int64),
        ctf=CtfParams(voltage=voltage, cs=cs, amp_contrast=q0, **ctf),
        contrast=1.0,
        ctf_premultiplied=np.nan_to_num(premult) != 0,
        phase_flipped=False,
        host="relion",
        passthrough=tables,
        source_row=np.arange(n, dtype=np.int64),
        problems=rep.problems,
        **_groups(pt),
    )


def _groups(pt: pd.DataFrame) -> dict[str, Any]:
    """RELION's micrograph groups: rlnGroupName, else rlnMicrographName, else the optics
    group (numbered in order of first appearance, as relion_refine numbers them)."""
    for label in ("rlnGroupName", "rlnMicrographName"):
        if label in pt.columns:
            names = pt[label].astype(str).to_numpy(dtype=object)
            break
    else:
        names = ("opticsGroup" + pt["rlnOpticsGroup"].astype(str)).to_numpy(dtype=object)
    group, group_names = groups_from_names(names)
    return {"group": group, "group_names": group_names}


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _finite32(vals: np.ndarray) -> np.ndarray:
    """bool: finite and inside float32 range (CtfParams stores float32: 1e39 would be inf)."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(vals) & (np.abs(vals) <= _FLOAT32_MAX)


def _first_row(mask: np.ndarray) -> tuple[int, str]:
    """1-based first row of ``mask`` and a note on how many more rows are alike."""
    bad = np.flatnonzero(mask)
    more = f" ({len(bad) - 1} more rows like it)" if len(bad) > 1 else ""
    return int(bad[0]) + 1, more


def _optics_rows(
    path: Path, where: str, pt: pd.DataFrame, ot: pd.DataFrame, rep: _Report
) -> np.ndarray:
    """Row of data_optics for every particle (-1 where unknown)."""
    if "rlnOpticsGroup" not in ot.columns:
        rep.stop(f"{path}: data_optics has no rlnOpticsGroup column — fix the optics table")
    og = pd.to_numeric(pt["rlnOpticsGroup"], errors="coerce").to_numpy(np.float64)
    ids = pd.to_numeric(ot["rlnOpticsGroup"], errors="coerce").to_numpy(np.float64)
    rows = pd.Index(ids).get_indexer(og) if pd.Index(ids).is_unique else None
    if rows is None:
        rep.stop(f"{path}: data_optics lists an optics group twice — make rlnOpticsGroup unique")
    unknown = rows < 0
    if unknown.any():
        row, more = _first_row(unknown)
        known = ", ".join(str(int(i)) for i in ids[np.isfinite(ids)][:10])
        rep.error(
            f"{where} row {row}: rlnOpticsGroup {pt['rlnOpticsGroup'].iloc[row - 1]} is not in "
            f"data_optics (groups {known}){more} — add the group to data_optics or fix the rows"
        )
    return rows


def _ctf(path: Path, where: str, pt: pd.DataFrame, rep: _Report) -> dict[str, np.ndarray]:
    n = len(pt)

    def column(label: str) -> np.ndarray | None:
        if label not in pt.columns:
            return None
        vals = pd.to_numeric(pt[label], errors="coerce").to_numpy(np.float64)
        bad = ~_finite32(vals)
        if bad.any():
            row, more = _first_row(bad)
            why = "not a number" if not np.isfinite(vals[row - 1]) else "beyond float32 range"
            rep.error(
                f"{where} row {row}: {label} is {pt[label].iloc[row - 1]!s} ({why})"
                f"{more} — re-run CTF estimation for that micrograph or remove these particles"
            )
        return np.where(bad, np.nan, vals)  # reported; NaN, not inf, in the float32 CtfParams

    du = column("rlnDefocusU")
    if du is None:
        rep.error(
            f"{where}: no rlnDefocusU column — the particles have no CTF parameters; run CTF "
            "estimation (CtfFind) and re-extract, or join the CTF columns back in"
        )
        du = np.full(n, np.nan)
    dv = column("rlnDefocusV")
    if dv is None:
        dv = du
        if "rlnDefocusU" in pt.columns:
            rep.note(f"{where}: no rlnDefocusV; using rlnDefocusU (no astigmatism)")
    for label, vals in (("rlnDefocusU", du), ("rlnDefocusV", dv)):
        neg = vals < 0
        if neg.any():
            row, more = _first_row(neg)
            rep.error(
                f"{where} row {row}: {label} is {vals[row - 1]:g} Å (negative){more} — RELION "
                "defocus is positive for underfocus; fix the CTF values or remove these particles"
            )
    angle = column("rlnDefocusAngle")
    if angle is None:
        angle = np.zeros(n)
        if "rlnDefocusU" in pt.columns:
            rep.note(f"{where}: no rlnDefocusAngle; using 0°")
    defaults = {"phase_shift": ("rlnPhaseShift", 0.0), "bfactor": ("rlnCtfBfactor", 0.0)}
    defaults["scale"] = ("rlnCtfScalefactor", 1.0)
    out = {"defocus_u": du, "defocus_v": dv, "defocus_angle": angle}
    for key, (label, default) in defaults.items():
        vals = column(label)
        out[key] = np.full(n, default) if vals is None else np.nan_to_num(vals, nan=default)
    return out


def _image_names(
    where: str, pt: pd.DataFrame, rep: _Report
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(stack_index, 0-based image_index, unique stack names) from ``rlnImageName``."""
    names = pt["rlnImageName"].astype("str")
    at = names.str.find("@").to_numpy()
    if at.size and at[0] > 0 and (at == at[0]).all():
        # the common case, every index with the same number of digits: fast slicing
        idx_text, stack = names.str.slice(0, int(at[0])), names.str.slice(int(at[0]) + 1)
    else:
        parts = names.str.partition("@")
        has_at = (parts[1] == "@").to_numpy()
        idx_text = parts[0].where(has_at, "1")
        stack = parts[2].where(has_at, parts[0])
    try:
        number = idx_text.astype(np.int64).to_numpy().astype(np.float64)
    except (ValueError, TypeError, OverflowError):
        number = pd.to_numeric(idx_text, errors="coerce").to_numpy(np.float64)
    bad = ~(number >= 1) | (number != np.floor(number)) | (stack.str.len() == 0).to_numpy()
    if bad.any():
        row, more = _first_row(bad)
        rep.error(
            f"{where} row {row}: rlnImageName '{names.iloc[row - 1]}' is not NNNNNN@stack.mrcs "
            f"(a 1-based image number, '@', the stack path){more} — fix the image names"
        )
        number = np.where(bad, 1, number)
    codes, uniques = pd.factorize(stack)
    return codes.astype(np.int32), number.astype(np.int64) - 1, [str(u) for u in uniques]


def _resolve_stacks(
    path: Path, stack_names: list[str], project_dir: str | Path | None, rep: _Report
) -> tuple[Path, list[Path]]:
    star_dir = path.absolute().parent
    if project_dir is not None:
        pdir = Path(project_dir).absolute()
        if not pdir.is_dir():
            rep.stop(f"{pdir}: project directory not found — check --project-dir")
    else:
        first = stack_names[0]
        pdir = star_dir
        if not os.path.isabs(first):
            for cand in (Path.cwd(), star_dir, *star_dir.parents):
                if (cand / first).is_file():
                    pdir = cand
                    break
            else:
                rep.note(
                    f"{path}: first image stack {first} not found under the working directory, "
                    f"{star_dir} or its parents; paths are taken relative to {star_dir} — "
                    "pass --project-dir (the RELION project directory) to read images"
                )
    base = str(pdir)
    return pdir, [Path(os.path.normpath(os.path.join(base, s))) for s in stack_names]


def _box(
    path: Path, tables: RelionTables, row_of: np.ndarray, stacks: list[Path], rep: _Report
) -> int:
    ot = tables.optics
    if "rlnImageSize" in ot.columns:
        sizes = pd.to_numeric(ot["rlnImageSize"], errors="coerce").to_numpy(np.float64)
        used = np.unique(sizes[np.unique(row_of[row_of >= 0])])
        if len(used) > 1 or not np.all(np.isfinite(used)):
            listed = ", ".join(f"{s:g}" for s in used)
            rep.error(
                f"{path}: data_optics rlnImageSize differs between optics groups ({listed} px) "
                "— 2D classification needs one box; select one optics group or re-extract"
            )
        if len(used) and np.isfinite(used[0]):
            return int(used[0])
    header_box = _stack_box(stacks[0]) if stacks else None
    if header_box is None:
        rep.note(
            f"{path}: image size unknown (no rlnImageSize in data_optics and {stacks[0]} not "
            "found) — pass --project-dir so the stacks can be read"
        )
        return 0
    if tables.legacy:
        tables.optics["rlnImageSize"] = header_box
        tables.optics["rlnImageDimensionality"] = 2
    return header_box


def _stack_box(stack: Path) -> int | None:
    if not stack.is_file():
        return None
    try:
        with mrcfile.open(stack, mode="r", permissive=True, header_only=True) as mrc:
            return int(mrc.header.nx)
    except (ValueError, OSError):
        return None
