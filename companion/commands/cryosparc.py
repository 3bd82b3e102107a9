"""Classify a CryoSPARC job's particles and save the results back as an External job.

`companion cryosparc classify` connects to a CryoSPARC v5 instance (cryosparc-tools 5.x,
same major.minor as the server), takes the particle output of a finished job (slots blob
and ctf), creates an External job in the same workspace (or --workspace) and runs the
classification inside it. The job shows the parameters, one event-log line updated every
iteration, a class-average gallery and an occupancy plot, and ends with outputs:

  particles         every input particle with alignments2D (class, pose, shift, ...),
                    passing through all input slots (blob, ctf, location, ...)
  class_averages    the class averages (template; blob/idx = class = alignments2D/class)
  particles_selected, particles_rejected    with --select

Downstream CryoSPARC jobs connect to these outputs like any other. If anything fails the
job is marked failed with the reason and carries no outputs.

Credentials: CRYOSPARC_EMAIL and CRYOSPARC_PASSWORD in the environment, or a login saved
once with `python -m cryosparc.tools login --url URL`. There is no password option.

Images: with --project-dir (the CryoSPARC project directory as mounted on this machine,
checked before any job is created) they are read in place — fastest. Without it they are
copied once through the CryoSPARC API into a local stack under --cache-dir (one stack file
in memory at a time; needs N × box² × 4 bytes of disk).

Classifier options are those of `companion classify` (annealing off, balanced classes, ...);
see `companion classify --help` for what they do.

Examples:
  export CRYOSPARC_EMAIL=ali@example.org CRYOSPARC_PASSWORD=...
  companion cryosparc classify --url http://cryosparc.lab:39000 --project P3 --job J42 \\
      --n-classes 100 --anneal off
  companion cryosparc classify --url http://cryosparc.lab:39000 --project P3 --job J42 \\
      --project-dir /mnt/cryosparc/CS-p3 --balance equal --n-classes 200 --device gpu
  companion cryosparc classify --url http://cryosparc.lab:39000 --project P3 --job J57 \\
      --output particles_selected --workspace W4 --select auto --title "balanced 2D"

Ctrl-C stops after the current iteration (twice: at once); the job is then marked failed.
--json prints the new job's uid and outputs on stdout at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from companion.commands.options import add_threads_option
from companion.params import ClassifyParams, add_params_arguments, params_from_namespace

log = logging.getLogger("companion.cryosparc")


def add_classify_args(p: argparse.ArgumentParser) -> None:
    """The options of ``companion cryosparc classify`` and ``companion-cryosparc``."""
    g = p.add_argument_group("CryoSPARC")
    g.add_argument(
        "--url",
        help="CryoSPARC address as opened in a browser, e.g. "
        "http://cryosparc.lab:39000 [default: $CRYOSPARC_BASE_URL]",
    )
    g.add_argument("--project", required=True, metavar="P", help="project uid, e.g. P3")
    g.add_argument(
        "--job",
        required=True,
        metavar="J",
        help="uid of the job whose particles to classify, e.g. J42",
    )
    g.add_argument(
        "--output",
        default="particles",
        metavar="NAME",
        help="particle output of that job [default: particles]",
    )
    g.add_argument(
        "--workspace", metavar="W", help="workspace for the new job [default: the source job's]"
    )
    g.add_argument(
        "--project-dir",
        type=Path,
        metavar="DIR",
        help="the project directory mounted here: read images in place "
        "[default: read them through the CryoSPARC API]",
    )
    g.add_argument("--title", help="title of the new job")
    g.add_argument(
        "--select",
        metavar="auto|LIST",
        help="also save particles_selected / particles_rejected: 'auto' (classes with a "
        "class score of at least 0.5 without each class's outliers, the rule all hosts share) "
        "or 0-based classes, kept whole, e.g. 0,3,7-9",
    )
    g.add_argument(
        "--contrast",
        choices=["auto", "white", "dark", "sign"],
        default=None,
        help="how to read blob/sign (see the README's conventions table) [default: auto]",
    )
    g.add_argument(
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="keep the local run files (checkpoints, summary.json, PNGs) here "
        "[default: a temporary directory, removed at the end]",
    )
    g.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="where images read through the API are copied [default: $TMPDIR]",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds to wait for each CryoSPARC answer [default: 300]",
    )
    g.add_argument(
        "--json", action="store_true", help="print the new job and its outputs as JSON on stdout"
    )
    add_threads_option(g)
    add_params_arguments(p, ClassifyParams)


def add_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cryosparc_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "classify",
        help="classify a job's particles as a new External job",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_classify_args(p)


def run_classify(args: argparse.Namespace) -> int:
    """Build the request from parsed options, run it, report; returns the exit status."""
    from companion.cryosparc.external import ExternalJobRequest, run_external_job
    from companion.run import stop_on_signals
    from companion.threads import limit_threads

    warnings.filterwarnings("ignore", message=r"\*\*\* API client")  # client retry chatter
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request
    params = params_from_namespace(args, ClassifyParams)
    req = ExternalJobRequest(
        url=args.url,
        project=args.project,
        job=args.job,
        params=params,
        output=args.output,
        workspace=args.workspace,
        project_dir=args.project_dir,
        title=args.title,
        select=args.select,
        contrast=args.contrast,
        work_dir=args.work_dir,
        cache_dir=args.cache_dir,
        timeout=args.timeout,
    )
    with stop_on_signals() as flag, limit_threads(args.threads):
        result = run_external_job(req, should_stop=flag)
    outs = ", ".join(f"{k} ({v})" for k, v in result.outputs.items())
    log.info("job %s %s completed with outputs %s", result.project_uid, result.job_uid, outs)
    if args.json:
        json.dump(result.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.cryosparc_command == "classify":
        return run_classify(args)
    raise AssertionError(args.cryosparc_command)
