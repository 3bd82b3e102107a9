"""Pick particles from a companion output by class, posterior margin, stability or class score.

INPUT is a companion output directory (or its run_itNNN_data.star / particles.cs). Criteria
are combined (a particle must pass all given):

  --classes LIST|auto   classes as the host numbers them (STAR 1-based, .cs 0-based), or
                        'auto' (the --select auto rule: class score of at least 0.5, then
                        the per-particle outliers of those classes left out, from the
                        written low-resolution power and log-likelihood gain; whole
                        classes, with a warning, for older outputs without them)
  --margin M            top-1 minus top-2 class posterior at least M (needs --posteriors 2+)
  --min-stability S     per-particle stability at least S (needs a --stability run)
  --min-score S         the particle's class has a class score of at least S

Writes into --out, offline (no GUI, no server): for a RELION-flavour output
particles.star (as Subset selection writes it: optics table + the chosen rows with every
column), for a CryoSPARC-flavour output particles_selected.cs (the chosen rows of
particles.cs; join with the input on uid). --json prints a summary on stdout.

Examples:
  companion select Class2D/companion1 --classes auto --margin 0.3 --out Select/job020
  companion select c2d/run_it022_data.star --classes 1,4,7-9 --out sel
  companion select c2d_cs --min-score 0.5 --min-stability 0.8 --out sel --json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("companion.select")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", metavar="INPUT", help="companion output directory, run_itNNN_data.star or .cs"
    )
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--classes",
        metavar="auto|LIST",
        default=None,
        help="keep these classes (host numbering: STAR 1-based, .cs 0-based, e.g. 1,4,7-9) "
        "or 'auto': the --select auto rule (class score of at least 0.5, then the outliers "
        "of those classes in the written low-resolution power and log-likelihood gain left "
        "out, as classify --select auto does; older outputs without them: whole classes)",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=None,
        metavar="M",
        help="keep particles whose top-1 minus top-2 class posterior is at least M (0-1; "
        "the run needs --posteriors 2 or more)",
    )
    parser.add_argument(
        "--min-stability",
        type=float,
        default=None,
        metavar="S",
        help="keep particles whose stability is at least S (0-1; the run needs --stability)",
    )
    parser.add_argument(
        "--min-score",
        type=float,
        default=None,
        metavar="S",
        help="keep particles whose class has a class score of at least S (see README, "
        "'Class scores')",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def select_output(
    input_path: str | Path,
    out_dir: str | Path,
    *,
    classes: str | None = None,
    margin: float | None = None,
    min_stability: float | None = None,
    min_score: float | None = None,
) -> dict:
    """Select from the companion output at ``input_path`` into ``out_dir``; the summary."""
    from companion.errors import InputError
    from companion.pick import Criteria, pick

    criteria = Criteria(classes, margin, min_stability, min_score)
    criteria.check()
    path = Path(input_path)
    if not path.exists():
        raise InputError(f"{path}: not found — give a companion output directory")
    if _is_cs(path):
        from companion.cryosparc import subset as host
    else:
        from companion.relion import subset as host  # type: ignore[no-redef]
    view, state = host.read_view(path)
    keep, summary = pick(view, criteria)
    for note in view.notes:
        log.info("%s", note)
    out = host.write_subset(Path(out_dir), state, keep)
    summary["output"] = str(out)
    return summary


def _is_cs(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() == ".cs"
    from companion.cryosparc.outputs import PARTICLES_NAME

    return (path / PARTICLES_NAME).is_file() and not any(path.glob("*_it[0-9]*_data.star"))


def main(args: argparse.Namespace) -> int:
    summary = select_output(
        args.input,
        args.out,
        classes=args.classes,
        margin=args.margin,
        min_stability=args.min_stability,
        min_score=args.min_score,
    )
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(
            f"selected {summary['n_selected']} of {summary['n_particles']} particles -> "
            f"{summary['output']}",
            file=sys.stderr,
        )
    return 0
