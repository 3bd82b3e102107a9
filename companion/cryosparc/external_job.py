"""companion-cryosparc: classify a CryoSPARC job's particles as a new External job.

The same as ``companion cryosparc classify`` (same options, same code), for running as a
script or from a scheduler::

    CRYOSPARC_EMAIL=ali@example.org CRYOSPARC_PASSWORD=... \\
    companion-cryosparc --url http://cryosparc.lab:39000 --project P3 --job J42 \\
        --n-classes 100 --anneal off --select auto

Exit status 0 when the job completed, 2 for a problem you can fix (one line on stderr),
130 when stopped; the CryoSPARC job is then marked failed with the reason.
"""

from __future__ import annotations

import argparse
import sys

PROG = "companion-cryosparc"


def build_parser() -> argparse.ArgumentParser:
    from companion.commands.cryosparc import __doc__ as command_doc
    from companion.commands.cryosparc import add_classify_args
    from companion.commands.options import Parser

    parser = Parser(
        prog=PROG, description=command_doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    add_classify_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``companion-cryosparc``."""
    from companion.commands.cryosparc import run_classify
    from companion.entrypoint import run_program

    args = build_parser().parse_args(argv)
    return run_program(PROG, args.verbose, lambda: run_classify(args))


if __name__ == "__main__":
    sys.exit(main())
