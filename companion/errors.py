"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""

from __future__ import annotations


class CompanionError(Exception):
    """Base class for errors reported to the user without a traceback."""

    exit_code = 2


class InputError(CompanionError):
    """Bad input: a missing file, a malformed row, an unknown field.

    The message names the file, the row or field, and what to do about it.
    """


class ParameterError(CompanionError):
    """An invalid or infeasible parameter combination, caught before any work starts."""


class OutputError(CompanionError):
    """The output directory cannot be used: not writable, full, locked by another run."""


class DiskFullError(OutputError):
    """Not enough free disk space for a cache, a checkpoint or an output."""


class DeviceError(CompanionError):
    """The requested compute device is absent or out of memory."""


class Aborted(CompanionError):
    """The run was stopped on request (Ctrl-C, SIGTERM, RELION abort file)."""

    exit_code = 130


class ClusterError(CompanionError):
    """The Dask cluster of --cluster cannot be started, reached or kept alive."""
