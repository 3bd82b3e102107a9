"""Host-neutral summary of a ParticleSet, for ``companion info`` (text and JSON).

Everything here is read from :class:`~companion.particles.ParticleSet` fields, so a STAR
file and a .cs file describing the same particles give the same summary (apart from the
``path`` and ``host`` lines).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from companion.particles import ParticleSet


def _unique(values: np.ndarray, digits: int = 4) -> list[float]:
    return sorted({round(float(v), digits) for v in np.unique(values)})


def _round(value: float, digits: int) -> float | None:
    """JSON-safe rounding: None for NaN (all values invalid)."""
    v = float(value)
    return None if not np.isfinite(v) else round(v, digits)


def contrast_label(contrast: np.ndarray) -> str:
    """How the stored images look: 'protein white', 'protein dark' or 'mixed'."""
    if len(contrast) == 0:
        return "unknown"
    if np.all(contrast > 0):
        return "protein white"
    if np.all(contrast < 0):
        return "protein dark (inverted when read)"
    return f"mixed ({int((contrast < 0).sum())} particles protein dark, inverted when read)"


def summarise(particles: ParticleSet) -> dict[str, Any]:
    """Plain-JSON summary: counts, box, pixel size, optics, CTF ranges, contrast, stacks."""
    n = len(particles)
    ctf = particles.ctf
    groups, group_counts = np.unique(particles.optics_group, return_counts=True)
    used = np.unique(particles.stack_index)
    missing = [
        str(particles.stack_paths[s]) for s in used if not particles.stack_paths[s].is_file()
    ]
    out: dict[str, Any] = {
        "path": str(particles.source_path),
        "host": particles.host,
        "project_dir": str(particles.project_dir),
        "n_particles": n,
        "box": int(particles.box),
    }
    if n == 0:
        return out | {"n_stacks": 0, "n_stacks_missing": 0}
    psize_lo, psize_hi = float(particles.psize.min()), float(particles.psize.max())
    df = np.concatenate([ctf.defocus_u, ctf.defocus_v])
    astig = np.abs(ctf.defocus_u - ctf.defocus_v)
    out |= {
        "pixel_size_A": round(float(np.median(particles.psize)), 5),
        "pixel_size_range_A": [round(psize_lo, 5), round(psize_hi, 5)],
        "box_A": round(float(particles.box * np.median(particles.psize)), 2),
        "n_optics_groups": len(groups),
        "optics_groups": {str(int(g)): int(c) for g, c in zip(groups, group_counts, strict=True)},
        "defocus_range_A": [_round(np.nanmin(df), 1), _round(np.nanmax(df), 1)],
        "defocus_mean_A": _round(np.nanmean(0.5 * (ctf.defocus_u + ctf.defocus_v)), 1),
        "astigmatism_max_A": _round(np.nanmax(astig), 1),
        "voltage_kV": _unique(ctf.voltage, 2),
        "cs_mm": _unique(ctf.cs, 3),
        "amp_contrast": _unique(ctf.amp_contrast, 4),
        "phase_shift_range_deg": [
            round(float(ctf.phase_shift.min()), 2),
            round(float(ctf.phase_shift.max()), 2),
        ],
        "contrast": contrast_label(particles.contrast),
        "ctf_premultiplied": int(particles.ctf_premultiplied.sum()),
        "phase_flipped": int(particles.phase_flipped.sum()),
        "n_stacks": len(used),
        "n_stacks_missing": len(missing),
    }
    return out


def format_text(summary: dict[str, Any] | None, problems: list[str], blocking: bool) -> str:
    """Human-readable report of :func:`summarise` plus the problems found."""
    lines: list[str] = []
    if summary is not None:
        s = summary
        lines.append(f"file            {s['path']} ({s['host']})")
        lines.append(f"project dir     {s['project_dir']}")
        lines.append(f"particles       {s['n_particles']}")
        if s["n_particles"]:
            lo, hi = s["pixel_size_range_A"]
            psize = f"{s['pixel_size_A']:g} Å/px" + (f" (from {lo:g} to {hi:g})" if hi > lo else "")
            groups = ", ".join(f"{g}: {c}" for g, c in s["optics_groups"].items())
            lo_df, hi_df = (_fmt(v) for v in s["defocus_range_A"])
            lines += [
                f"box             {s['box']} px ({s['box_A']:g} Å)",
                f"pixel size      {psize}",
                f"optics groups   {s['n_optics_groups']} ({groups})",
                f"defocus         {lo_df} – {hi_df} Å (mean {_fmt(s['defocus_mean_A'])}, "
                f"astigmatism up to {_fmt(s['astigmatism_max_A'])} Å)",
                f"voltage / Cs    {_join(s['voltage_kV'])} kV / {_join(s['cs_mm'])} mm, "
                f"amplitude contrast {_join(s['amp_contrast'])}",
                f"image contrast  {s['contrast']}" + _measured(s),
            ]
            if s["ctf_premultiplied"] or s["phase_flipped"]:
                lines.append(
                    f"CTF handling    {s['ctf_premultiplied']} premultiplied, "
                    f"{s['phase_flipped']} phase-flipped"
                )
        lines.append(f"stacks          {s['n_stacks']} ({s['n_stacks_missing']} missing)")
    if problems:
        head = "problems that prevent classification" if blocking else "notes"
        lines.append(f"{head} ({len(problems)}):")
        lines += [f"  - {p}" for p in problems]
    else:
        lines.append("no problems found")
    return "\n".join(lines)


def _measured(s: dict[str, Any]) -> str:
    m = s.get("measured_contrast")
    if not m:
        return ""
    return f"; measured on {m['n_sampled']} particles: {m['verdict']} (z = {m['z']:g})"


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def _join(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)
