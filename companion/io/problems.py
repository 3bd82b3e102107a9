"""The problem report of the host readers: raise the first error, or collect them all."""

from __future__ import annotations

from companion.errors import InputError


class StopReading(Exception):
    """Reading cannot go on (collect mode): the report holds why."""


class ProblemReport:
    """Problems found while reading: raised at once (``strict``) or collected (inspect).

    ``errors`` must be fixed, ``notes`` are remarks (an assumed default) and never raised;
    ``problems`` holds both in the order they were found.
    """

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.problems: list[str] = []

    def error(self, msg: str) -> None:
        if self.strict:
            raise InputError(msg)
        self.errors.append(msg)
        self.problems.append(msg)

    def stop(self, msg: str) -> None:
        """An error after which reading cannot go on, even when collecting."""
        self.error(msg)
        raise StopReading

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.problems.append(msg)
