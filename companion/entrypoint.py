"""What every companion program does around its work: logging to stderr, quiet NumPy
warnings, and user errors as one line with their exit status (one place for ``companion``
and ``companion-cryosparc``; the RELION job adds RELION's exit files around the same)."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable

from companion.errors import CompanionError


def setup_logging(verbose: bool) -> None:
    """Log lines with time and level on stderr; NumPy's RuntimeWarnings (all-NaN slices,
    ...) are hidden unless ``verbose``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if not verbose:
        warnings.simplefilter("ignore", RuntimeWarning)


def run_program(prog: str, verbose: bool, body: Callable[[], int | None]) -> int:
    """Run ``body`` as program ``prog``: a CompanionError is one line ``prog: error: ...``
    on stderr and its exit status (2), Ctrl-C is ``prog: interrupted`` and 130."""
    setup_logging(verbose)
    try:
        return int(body() or 0)
    except CompanionError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
