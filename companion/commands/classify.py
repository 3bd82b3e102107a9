"""Classify particles in 2D and write the results where you work (RELION or CryoSPARC files).

INPUT is a RELION particles STAR file (images resolved against --project-dir, default: the
directory holding the first stack, tried from the current directory upwards) or a CryoSPARC
.cs file (blob paths relative to --project-dir, default: the .cs file's directory and its
parents). Results go to --out: for a STAR input the files relion_refine writes
(run_itNNN_data.star, _model.star, _optimiser.star, _sampling.star, _classes.mrcs), for a
.cs input particles.cs, class_averages.mrc and class_averages.cs; always class_averages.png
(gallery with class sizes and resolutions), class_occupancy.png and summary.json.

Default mode: CryoSPARC-like 2D classification (K 50, 6 Å, 20 online-EM iterations, then 2
full passes, annealing on).

Annealing off (--anneal off). The default run starts uncertain and becomes sharp ("anneals").
On particles with a rigid part and a floppy or partly missing part this funnels everything
into a few big classes aligned on the rigid part, and junk (gold edges, ice contamination,
less-ordered particles) is swallowed by good classes. With annealing off the uncertainty and
the noise model stay at their starting values, so junk keeps classes of its own and weak
differences survive. Use it for cleaning, or when the final iterations smear out detail you
saw in the intermediate ones.

Balanced classes (--balance equal | --balance cap --max-per-class N). If doubling the number
of classes just leaves the extra ones empty, cap the class sizes: no class may hold more than
the cap, so particles must spread over all classes and the big classes split by their
differences (e.g. the states of a flexible domain). 'equal' sets the cap to N/K (times
--balance-slack); 'cap' takes your number. The cap is never exceeded in what is written.
--reseed-empty 0.1 re-seeds classes that drop below 10% of the mean size, in any mode.

Examples:
  companion classify Extract/job012/particles.star --out Class2D/companion1 --n-classes 100
  companion classify particles.star --out c2d --anneal off --n-classes 50
  companion classify J24_particles.cs --project-dir /data/P12 --out c2d --balance equal \\
      --n-classes 200 --device gpu
  companion classify particles.star --out c2d --balance cap --max-per-class 5000 --anneal off
  companion classify particles.star --out c2d --continue     # resume after Ctrl-C

Ctrl-C stops after the current iteration is saved (press twice to stop at once); run the same
command with --continue to go on from the last finished iteration. A finished or stopped run
in --out is never overwritten without --overwrite. --json prints summary.json on stdout at
the end (its file paths are relative to --out).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from companion.commands.options import add_threads_option, check_out_dir
from companion.errors import Aborted
from companion.params import ClassifyParams, add_params_arguments, params_from_namespace
from companion.particles import ParticleSet


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", metavar="INPUT", help="particles .star (RELION) or .cs (CryoSPARC)"
    )
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--project-dir", metavar="DIR", default=None, help="directory image paths are relative to"
    )
    parser.add_argument(
        "--continue",
        dest="resume",
        action="store_true",
        help="resume from the last finished iteration in --out (same parameters); refused "
        "when --out holds no checkpoint",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (without it a finished or stopped run there is refused)",
    )
    add_threads_option(parser)
    parser.add_argument(
        "--keep-iterations",
        action="store_true",
        help="write the outputs of every iteration, not only the last (with --balance, an "
        "iteration whose soft labels exceed the cap is skipped with a warning: only capped "
        "labels are ever written)",
    )
    parser.add_argument(
        "--select",
        metavar="auto|LIST",
        default=None,
        help="also write the particles of chosen classes into --out: particles.star + "
        "class_averages.star (Subset selection style) for a STAR input, particles_selected.cs "
        "for a .cs input. 'auto': classes with a class score of at least 0.5, without the "
        "outliers of each class (see README, 'Class scores'); or class numbers as the host "
        "numbers them (STAR 1-based, .cs 0-based), kept whole, e.g. 1,4,7-9",
    )
    parser.add_argument("--json", action="store_true", help="print summary.json on stdout")
    add_params_arguments(parser, ClassifyParams)


def open_particles(path: str | Path, project_dir: str | Path | None) -> ParticleSet:
    """The particles in ``path`` (STAR or .cs) via companion.sources."""
    from companion.sources import open_particles as _open

    return _open(path, project_dir)


def continue_hint(args: argparse.Namespace) -> str:
    """The command line that continues this run."""
    argv = [a for a in sys.argv[1:] if a != "--continue"] if sys.argv[1:] else []
    if "classify" not in argv:
        argv = ["classify", args.input, "--out", args.out]
    return "companion " + shlex.join([*argv, "--continue"])


def main(args: argparse.Namespace) -> int:
    from companion.run import run_classification, stop_on_signals
    from companion.threads import limit_threads

    params = params_from_namespace(args)
    check_out_dir(args.out, overwrite=args.overwrite, resume=args.resume)
    particles = open_particles(args.input, args.project_dir)
    with stop_on_signals() as stop, limit_threads(args.threads):
        try:
            out = run_classification(
                particles,
                params,
                Path(args.out),
                resume=args.resume,
                keep_iterations=args.keep_iterations,
                callbacks=_StopOnly(stop),
                select=args.select,
            )
        except (Aborted, KeyboardInterrupt) as exc:
            what = str(exc) or "stopped"
            print(
                f"companion classify: {what}; the last finished iteration is saved in "
                f"{args.out}/checkpoint. To go on: {continue_hint(args)}",
                file=sys.stderr,
            )
            return 130
    if args.json:
        json.dump(out.summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        s = out.summary
        print(
            f"{s['n_particles']} particles in {s['n_classes']} classes; largest class "
            f"{s['largest_class']}"
            + (f" (cap {s['cap']})" if s["cap"] is not None else "")
            + f", {s['classes_below_10pct_of_mean']} below 10% of the mean size; "
            f"outputs in {args.out} (summary.json, {Path(s['files']['gallery']).name})"
            + (
                f"; selected {s['selection']['n_particles']} particles in "
                f"{len(s['selection']['classes'])} classes"
                if s.get("selection")
                else ""
            ),
            file=sys.stderr,
        )
    return 0


class _StopOnly:
    """Callbacks that only forward a stop request (the runner adds progress and outputs)."""

    def __init__(self, flag: Callable[[], bool]) -> None:
        self.should_stop = flag
