"""What a CryoSPARC user sees of a companion run: the job's event log and its end state.

:class:`JobLog` writes event-log lines, named lines updated in place (one progress line per
run, not one per iteration) and image logs. :class:`JobCallbacks` feeds it from the
classifier. :func:`failing_job` replaces ``job.run()``'s failure path: any exception marks
the job failed with a one-line reason (a traceback only for internal errors), including
Ctrl-C (which ``job.run()`` would mark *completed*), retrying while the server is
unreachable.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from companion.cryosparc.client import CryoSPARCError, api_detail, call, transport_problem
from companion.errors import Aborted, CompanionError
from companion.params import ClassifyParams

log = logging.getLogger("companion.cryosparc")

MARK_FAILED_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0)  # seconds between tries to mark a job failed
PROGRESS_EVERY_S = 2.0  # at most one event-log update per this many seconds (iterations: all)
REASON_MAX = 4000  # characters of a failure reason sent to CryoSPARC


class JobLog:
    """The job's event log: new lines, named lines updated in place, image logs.

    A network failure ends the run (the server is gone: results could not be saved anyway);
    a refused log call only warns — the log is not worth a lost classification.
    """

    def __init__(self, job: Any, url: str) -> None:
        self.job = job
        self.url = url
        self._last: dict[str, float] = {}
        self._warned = False

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from cryosparc.errors import APIError

        try:
            return call(fn, *args, url=self.url, what="writing the event log", **kwargs)
        except CryoSPARCError as exc:
            if not isinstance(exc.__cause__, APIError):
                raise
            if not self._warned:
                log.warning(
                    "CryoSPARC refused an event-log entry (%s); continuing",
                    api_detail(exc.__cause__),
                )
                self._warned = True
            return None

    def line(self, text: str, level: str = "text") -> None:
        (log.warning if level != "text" else log.info)("%s", text)
        self._call(self.job.log, text, level=level)

    def update(self, name: str, text: str, *, force: bool = False) -> None:
        """Show ``text`` as the event named ``name``; throttled unless ``force``."""
        now = time.monotonic()
        if not force and now - self._last.get(name, -1e9) < PROGRESS_EVERY_S:
            return
        self._last[name] = now
        self._call(self.job.log, text, name=name)

    def image(self, path: Path, text: str) -> None:
        self._call(self.job.log_plot, path, text)


class JobCallbacks:
    """Classifier callbacks feeding ONE event-log line, updated in place.

    After each iteration the line is the iteration summary; between iterations the current
    stage's progress is appended to it (throttled to one update per ``PROGRESS_EVERY_S``).
    """

    def __init__(self, joblog: JobLog, should_stop: Callable[[], bool] | None = None) -> None:
        self.joblog = joblog
        self._stop = should_stop
        self.t0 = time.monotonic()
        self.last = "Classification started"

    def on_iteration(self, info: Any) -> None:
        self.last = iteration_line(info, time.monotonic() - self.t0)
        self.joblog.update("progress", self.last, force=True)

    def progress(self, done: int, total: int, stage: str) -> None:
        if total > 0:
            pct = 100 * done / total
            self.joblog.update("progress", f"{self.last} — {stage} {done}/{total} ({pct:.0f}%)")

    def should_stop(self) -> bool:
        return bool(self._stop()) if self._stop is not None else False


def _get(info: Any, name: str, default: Any = None) -> Any:
    return info.get(name, default) if isinstance(info, dict) else getattr(info, name, default)


def iteration_line(info: Any, elapsed: float) -> str:
    """``Iteration 7 of 22: 10.2 Å, uncertainty 1.43, 48/50 classes occupied, largest 6.1%``."""
    it, total = _get(info, "iteration"), _get(info, "n_iterations")
    parts = [f"Iteration {it}" + (f" of {total}" if total else "")]
    res, unc = _get(info, "resolution_A"), _get(info, "uncertainty")
    details = []
    if res is not None and np.isfinite(float(res)):
        details.append(f"{float(res):.1f} Å")
    if unc is not None:
        details.append(f"uncertainty {float(unc):.2f}")
    sizes = _get(info, "class_sizes")
    if sizes is not None and np.size(sizes):
        s = np.asarray(sizes, dtype=np.float64)
        details.append(
            f"{int((s > 0).sum())}/{s.size} classes occupied, largest "
            f"{100 * s.max() / max(s.sum(), 1):.1f}%"
        )
    secs = _get(info, "seconds")
    if secs is not None:
        details.append(f"{float(secs):.1f} s")
    details.append(f"{elapsed:.0f} s elapsed")
    return parts[0] + ": " + ", ".join(details)


def params_text(params: ClassifyParams) -> str:
    rows = [f"  {k:<22} {v}" for k, v in params.resolved().items()]
    return "Parameters:\n" + "\n".join(rows)


# ------------------------------------------------------------------ job lifecycle


def failure_reason(exc: BaseException, url: str) -> str:
    """One line for CryoSPARC's event log (traceback appended for internal errors)."""
    from cryosparc.errors import APIError

    if isinstance(exc, KeyboardInterrupt):
        return "companion: interrupted (Ctrl-C or SIGTERM) before the outputs were saved"
    if isinstance(exc, Aborted):
        return f"companion: stopped on request before the outputs were saved ({exc})"
    if isinstance(exc, CompanionError):
        return f"companion: {exc}"
    if isinstance(exc, APIError):
        return f"companion: CryoSPARC refused a request: {api_detail(exc)}"
    net = transport_problem(exc, url)
    if net:
        return f"companion: {net}"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f"companion: internal error: {type(exc).__name__}: {exc}\n\n{tb}"


def mark_failed(job: Any, reason: str, url: str) -> str | None:
    """Mark ``job`` failed, retrying while the server is unreachable; None or the problem."""
    from cryosparc.errors import APIError

    problem = "no answer"
    for delay in (0.0, *MARK_FAILED_DELAYS):
        time.sleep(delay)
        try:
            call(job.stop, error=reason[:REASON_MAX], url=url, what="marking the job failed")
            return None
        except CryoSPARCError as exc:
            problem = str(exc)
            if isinstance(exc.__cause__, APIError):
                return problem  # the server answered: retrying will not help
        except Exception as exc:  # noqa: BLE001 - reported, the original error matters more
            return f"{type(exc).__name__}: {exc}"
    return problem


@contextmanager
def failing_job(job: Any, url: str) -> Iterator[None]:
    """Replaces ``job.run()``'s failure path: any exception marks the job failed.

    Unlike ``job.run()`` it also catches Ctrl-C (which ``run()`` would mark *completed*),
    sends a one-line reason instead of a traceback for user errors, and retries while the
    server is unreachable. Network and API errors reach the caller as CryoSPARCError.
    """
    from cryosparc.errors import APIError

    try:
        yield
    except BaseException as exc:
        reason = failure_reason(exc, url)
        where = f"{job.project_uid}-{job.uid}"
        log.info("marking job %s failed", where)
        problem = mark_failed(job, reason, url)
        first = reason.splitlines()[0].removeprefix("companion: ")
        if problem is not None:
            raise CryoSPARCError(
                f"{first}; job {where} could not be marked failed ({problem}) "
                "— mark it failed or delete it in CryoSPARC"
            ) from exc
        if isinstance(exc, (KeyboardInterrupt, Aborted)) or not isinstance(exc, Exception):
            raise
        note = f" (job {where} marked failed)"
        if isinstance(exc, CompanionError):
            raise type(exc)(f"{exc}{note}") from exc
        if isinstance(exc, APIError) or transport_problem(exc, url):
            raise CryoSPARCError(f"{first}{note}") from exc
        raise
