"""The ``companion`` command line: one module per command under ``companion.commands``.

Each command module has a docstring (its help, with examples), ``add_args(parser)`` and
``main(args) -> int | None``. User errors (:class:`CompanionError`) print one line on stderr
and exit with status 2; progress and logs go to stderr, results to files or stdout.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from companion import __version__
from companion.commands.options import Parser
from companion.entrypoint import run_program

# command name -> module under companion.commands
COMMANDS: dict[str, str] = {
    "simulate": "simulate",
    "info": "info",
    "classify": "classify",
    "select": "select",
    "demo": "demo",
    "bench": "bench",
    "cryosparc": "cryosparc",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``companion`` parser; every (sub)parser is a :class:`Parser` (no abbreviations,
    one-line errors with a suggestion)."""
    parser = Parser(
        prog="companion",
        description="2D classification companion for cryo-EM (RELION and CryoSPARC projects).",
    )
    parser.add_argument("--version", action="version", version=f"companion {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, modname in COMMANDS.items():
        mod = importlib.import_module(f"companion.commands.{modname}")
        doc = (mod.__doc__ or "").strip()
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_args(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_program(f"companion {args.command}", args.verbose, lambda: args._main(args))


if __name__ == "__main__":
    sys.exit(main())
