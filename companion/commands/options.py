"""Command-line plumbing shared by every ``companion`` command.

- :class:`Parser`: an ``ArgumentParser`` with abbreviations off (a typo must not become
  another option), one-line errors (``did you mean --n-classes?`` for an unknown option, the
  valid choices for a wrong choice) instead of the usage block.
- :func:`add_alias`: an old spelling of an option, kept working with a deprecation warning;
  giving the old and the new spelling together is an error, not "last wins".
- :func:`add_n_particles`: the particle count (``--n-particles``) of every command that
  simulates particles.
- :func:`check_out_dir`: refuse to overwrite a finished output directory.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from companion.errors import ParameterError

N_PARTICLES = "--n-particles"
_SEEN = "_option_spelling"  # namespace attribute: dest -> the spelling that set it


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` with ``allow_abbrev=False`` and one-line errors with a suggestion."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extras = super().parse_known_args(args, namespace)
        # A command's parser reports its own unknown options (the top-level parser would
        # only know its own options to suggest from).
        if extras and self._subparsers is None:
            self.error("unrecognized arguments: " + " ".join(extras))
        if hasattr(ns, _SEEN):
            delattr(ns, _SEEN)
        return ns, extras

    def option_strings(self) -> list[str]:
        return [s for a in self._actions for s in a.option_strings if s.startswith("--")]

    def explain(self, message: str) -> str:
        """argparse's error ``message`` as one line for a user: an unknown option with the
        closest known one, a wrong choice with the valid ones."""
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m:
            bad = m.group(1).split("=", 1)[0]
            message = f"unknown option {bad}" if bad.startswith("-") else message
            close = difflib.get_close_matches(bad, self.option_strings(), n=1, cutoff=0.6)
            if close:
                message += f" — did you mean {close[0]}?"
        m = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            name, got, choices = m.groups()
            message = choice_error(name, got, [c.strip().strip("'") for c in choices.split(",")])
        return message

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {self.explain(message)} (see {self.prog} --help)\n")


def choice_error(option: str, got: str, valid: list[str]) -> str:
    """``--anneal 'of': choose one of on, off — did you mean off?``"""
    message = f"{option} {got!r}: choose one of {', '.join(valid)}"
    close = difflib.get_close_matches(got, valid, n=1, cutoff=0.6)
    return message + (f" — did you mean {close[0]}?" if close else "")


class _Once(argparse.Action):
    """Store a value; a second spelling of the same option on one line is an error, an old
    spelling (``deprecated``) warns on stderr."""

    def __init__(self, *args: Any, deprecated_for: str | None = None, **kwargs: Any) -> None:
        self.deprecated_for = deprecated_for
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        seen: dict[str, str] = getattr(namespace, _SEEN, None) or {}
        first = seen.get(self.dest)
        if first is not None and first != option_string:
            parser.error(f"{first} and {option_string} are the same option: give it once")
        seen[self.dest] = option_string or self.dest
        setattr(namespace, _SEEN, seen)
        if self.deprecated_for and option_string != self.deprecated_for:
            print(
                f"{parser.prog}: warning: {option_string} is deprecated, use {self.deprecated_for}",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, values)


def add_option(parser: Any, name: str, *, aliases: tuple[str, ...] = (), **kwargs: Any) -> None:
    """``parser.add_argument(name, *aliases)``; ``aliases`` are old spellings that warn."""
    kwargs.setdefault("dest", name.lstrip("-").replace("-", "_"))
    if aliases and kwargs.get("help") not in (None, argparse.SUPPRESS):
        kwargs["help"] += f" ({', '.join(aliases)}: deprecated spelling)"
    action = kwargs.pop("action", None)
    if action not in (None, "store"):
        parser.add_argument(name, **kwargs)
        for old in aliases:
            add_alias(parser, old, name)
        return
    parser.add_argument(name, *aliases, action=_Once, deprecated_for=name, **kwargs)


def add_alias(parser: Any, old: str, new: str) -> None:
    """Accept ``old`` as a deprecated spelling of the existing option ``new``."""
    target = next(a for a in parser._actions if new in a.option_strings)
    if isinstance(target, _Once):
        target.option_strings.append(old)
        parser._option_string_actions[old] = target
        return
    raise TypeError(f"{new}: add it with add_option to give it aliases")


def whole_number(minimum: int) -> Any:
    """An argparse ``type``: an integer of at least ``minimum``."""

    def count(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {v}")
        return v

    return count


def add_n_particles(
    parser: Any, default: int, *, aliases: tuple[str, ...] = ("--n",), minimum: int = 1
) -> None:
    """``--n-particles N``: how many particles to simulate (``aliases``: old spellings)."""
    add_option(
        parser,
        N_PARTICLES,
        aliases=aliases,
        type=whole_number(minimum),
        default=default,
        metavar="N",
        dest="n_particles",
        help=f"number of particles [default: {default}]",
    )


def add_threads_option(parser: Any) -> None:
    """``--threads N``: CPU threads of the run (see :func:`companion.threads.limit_threads`)."""
    parser.add_argument(
        "--threads",
        type=whole_number(1),
        default=None,
        metavar="N",
        help="CPU threads (BLAS, OpenMP and FFT pools) [default: the cores available to this "
        "process, honouring its CPU affinity and cgroup CPU quota]",
    )


FINISHED_MARK = "summary.json"


def check_out_dir(
    out: str | Path, *, overwrite: bool, resume: bool, option: str = "--out", nonempty: bool = False
) -> None:
    """Refuse a finished ``out`` unless ``overwrite`` or ``resume``; refuse ``resume`` when
    there is nothing to continue from. ``nonempty``: refuse any directory that holds
    something unless ``overwrite`` (the benchmarks, whose directories hold many runs)."""
    from companion.outdir import Lock

    out = Path(out)
    if overwrite and resume:
        raise ParameterError("--overwrite and --continue contradict each other: give one")
    Lock(out).refuse_if_held()  # a live run here: say so, not "finished" or "stopped"
    ckpt = out / "checkpoint"
    if resume:
        if not _has_checkpoint(ckpt):
            raise ParameterError(
                f"{option} {out}: --continue found no checkpoint to continue from (run "
                "without --continue to start)"
            )
        return
    if nonempty and not overwrite and out.is_dir() and any(out.iterdir()):
        raise ParameterError(
            f"{option} {out}: is not empty — use another {option} or add --overwrite to "
            "write into it"
        )
    if out.is_dir() and not overwrite and _finished(out):
        raise ParameterError(
            f"{option} {out}: holds a finished run (summary.json) — use another {option}, "
            "--overwrite to replace it or --continue to go on from it"
        )
    if not overwrite and _has_checkpoint(ckpt):
        raise ParameterError(
            f"{option} {out}: holds a stopped run (checkpoint/) — add --continue to go on "
            "from it or --overwrite to start again"
        )


def _has_checkpoint(ckpt: Path) -> bool:
    """Whether ``ckpt`` holds something to continue from (not only temporaries of a write
    that was interrupted, which the next run removes)."""
    return ckpt.is_dir() and any(
        p.is_file() and not p.name.endswith(".tmp") for p in ckpt.rglob("*")
    )


def _finished(out: Path) -> bool:
    return (out / FINISHED_MARK).is_file() or any(out.glob(f"*/{FINISHED_MARK}"))
