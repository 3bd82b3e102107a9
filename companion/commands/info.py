"""Show what companion reads from a particle file, and every problem with it.

INPUT is a RELION particles STAR file or a CryoSPARC .cs file. Reports the particle count,
box, pixel size, optics groups, defocus range, CTF settings, image contrast (how the stored
images look) and the image stacks (count, missing), then every problem found — all of them,
not only the first. Exit status 0 when the particles can be classified, 2 when a problem
prevents it (unreadable file, missing stacks, indices past the end of a stack, a box that
does not match the stacks, invalid defocus, ...).

Examples:
  companion info Extract/job012/particles.star
  companion info J24_particles.cs --project-dir /data/P12
  companion info particles.star --json | jq .defocus_range_A
"""

from __future__ import annotations

import argparse
import json
import sys


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", metavar="INPUT", help="particles .star (RELION) or .cs (CryoSPARC)"
    )
    parser.add_argument(
        "--project-dir",
        metavar="DIR",
        default=None,
        help="directory image paths are relative to (default: found from the file's location)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def main(args: argparse.Namespace) -> int:
    from companion.inspect import format_text, summarise
    from companion.sources import inspect_report

    report = inspect_report(args.input, args.project_dir)
    summary = summarise(report.particles) if report.particles is not None else None
    if summary is not None and report.measured_contrast is not None:
        m = report.measured_contrast
        summary["measured_contrast"] = {
            "verdict": m.verdict,
            "z": round(m.z, 2),
            "n_sampled": m.n_sampled,
        }
    if args.json:
        doc = {
            "path": str(report.path),
            "host": report.host,
            "readable": report.particles is not None,
            "ok": not report.blocking,
            **(summary or {}),
            "problems": report.problems,
        }
        print(json.dumps(doc, indent=2))
    elif summary is None:
        for problem in report.problems:
            print(f"companion info: error: {problem}", file=sys.stderr)
    else:
        print(format_text(summary, report.problems, report.blocking))
    if report.blocking:
        first = report.problems[0] if report.problems else f"{report.path}: unreadable"
        if summary is not None or args.json:  # else every problem was printed above
            more = len(report.problems) - 1
            tail = f" (and {more} more problem(s), listed above)" if more > 0 else ""
            print(f"companion info: error: {first}{tail}", file=sys.stderr)
        return 2
    return 0
