"""companion-relion: companion's 2D classification as a RELION External job (3.1, 4.0, 5.0).

RELION runs, from the project directory::

    companion-relion --o External/job012/ --in_parts Extract/job005/particles.star \\
        --n_classes 100 --anneal off --balance equal --select auto --j 8

Inputs may come in any order (``--in_mics --in_movies --in_coords --in_3dref/--in_3Dref
--in_mask`` are accepted and ignored), ``--j`` is optional (more threads than the cores
available to the job draw a warning), ``--pipeline_control DIR`` is
ignored, and every classifier parameter is ``--<name> <value>`` with RELION-style
underscores (``--n_classes 50``) or the CLI's dashes (``--n-classes 50``); a parameter
whose value field is empty arrives as a bare flag (a boolean then means "on", an optional
value its default). Job options: ``--select auto|1,4,7`` (also write a Subset-selection
style ``particles.star`` + ``class_averages.star``), ``--keep_iterations``,
``--relion_version 3.1|4.0|5.0`` (default: from ``default_pipeline.star``).

The job directory receives ``run_itNNN_{data,model,optimiser,sampling}.star`` and
``run_itNNN_classes.mrcs`` (what Subset selection and relion_class_ranker open), the PNG
gallery, ``summary.json``, then ``RELION_OUTPUT_NODES.star`` and, once every listed file
exists, ``RELION_JOB_EXIT_SUCCESS``. Any error writes ``RELION_JOB_EXIT_FAILURE`` (reason on
the last line of stderr, i.e. run.err); the GUI's abort (``RELION_JOB_ABORT_NOW``) or
SIGTERM writes ``RELION_JOB_EXIT_ABORTED``. Running the same command again continues from
the last finished iteration (checkpoints in ``<job>/checkpoint``); changed or invalid
parameters are refused (exit status 2) and a finished job's files are left as they were.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROG = "companion-relion"
log = logging.getLogger("companion.relion.external_job")

INPUT_OPTIONS = ("in_parts", "in_mics", "in_movies", "in_coords", "in_3dref", "in_mask")
VALUE_OPTIONS = (
    "o",
    *INPUT_OPTIONS,
    "j",
    "pipeline_control",
    "relion_version",
    "select",
)
FLAG_OPTIONS = ("keep_iterations",)


class JobArgsError(Exception):
    """A malformed command line (reported like a ParameterError)."""


@dataclass
class JobArgs:
    """RELION's call, parsed: job options plus raw classifier parameter values."""

    out: str
    in_parts: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)  # the other --in_* (ignored)
    threads: int | None = None
    relion_version: str | None = None
    select: str | None = None
    keep_iterations: bool = False
    params: dict[str, Any] = field(default_factory=dict)


def _key(token: str) -> str:
    """'--in_3Dref' -> 'in_3dref', '--n-classes' -> 'n_classes', '----K' -> 'k'."""
    name = token.lstrip("-").replace("-", "_")
    return name if name in ("o", "j") else name.lower()


def split_args(argv: list[str]) -> list[tuple[str, str | None, str]]:
    """``[(key, value or None for a bare flag, original token)]`` in order."""
    out: list[tuple[str, str | None, str]] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok.strip("-") == "":
            raise JobArgsError(f"unexpected argument {tok!r} (options look like --name value)")
        if "=" in tok:
            name, value = tok.split("=", 1)
            out.append((_key(name), value, name))
            i += 1
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if nxt is not None and not nxt.startswith("--"):
            j = i + 2
            if _key(tok) == "select":  # RELION does not quote values: "--select 1, 4, 7"
                while j < len(argv) and not argv[j].startswith("--"):
                    j += 1
            out.append((_key(tok), " ".join(argv[i + 1 : j]), tok))
            i = j
        else:
            out.append((_key(tok), None, tok))
            i += 1
    return out


def parse_job_args(argv: list[str]) -> JobArgs:
    """Parse RELION's command line; classifier parameters are collected, not validated."""
    from companion.params import ClassifyParams

    fields = ClassifyParams.model_fields
    seen: dict[str, str] = {}
    job = JobArgs(out="")
    for key, value, token in split_args(argv):
        base = key.removeprefix("no_")
        if base != key and base in fields and fields[base].annotation is bool and value is None:
            key, value = base, "false"  # --no_recenter
        if key in seen:
            raise JobArgsError(f"{token} is given twice")
        seen[key] = token
        if key in FLAG_OPTIONS:
            job.keep_iterations = _bool(token, value)
        elif key in VALUE_OPTIONS:
            if value is None and key not in ("pipeline_control",):
                raise JobArgsError(f"{token} needs a value")
            if key == "o":
                job.out = value or ""
            elif key == "in_parts":
                job.in_parts = value
            elif key in INPUT_OPTIONS:
                job.inputs[key] = value or ""
            elif key == "j":
                try:
                    job.threads = int(value or "")
                except ValueError:
                    raise JobArgsError(
                        f"--j {value!r}: the number of threads must be an integer"
                    ) from None
            elif key == "relion_version":
                job.relion_version = value
            elif key == "select":
                job.select = value
        elif key in fields:
            job.params[key] = _param_value(token, value, fields[key])
        else:
            import difflib

            known = [*fields, *VALUE_OPTIONS, *FLAG_OPTIONS]
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            if close:
                raise JobArgsError(f"unknown option {token} — did you mean --{close[0]}?")
            raise JobArgsError(
                f"unknown option {token} — classifier parameters are: "
                + ", ".join("--" + f for f in fields)
                + "; job options: --o, --in_parts, --j, --select, --keep_iterations, "
                "--relion_version"
            )
    if not job.out:
        raise JobArgsError("--o External/jobNNN/ is required (RELION passes it)")
    return job


def _bool(token: str, value: str | None) -> bool:
    if value is None:
        return True
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on", "y"):
        return True
    if v in ("0", "false", "no", "off", "n"):
        return False
    raise JobArgsError(f"{token} {value!r}: use yes/no, true/false, on/off or 1/0")


def _param_value(token: str, value: str | None, info: Any) -> Any:
    """A raw parameter value: bare flags mean True for booleans, the default otherwise."""
    if info.annotation is bool:
        return _bool(token, value)
    if value is None:
        if info.default is None:
            return None  # empty value: the default
        raise JobArgsError(f"{token} needs a value (default {info.default})")
    if value.strip().lower() in ("none", "") and info.default is None:
        return None
    return value


def find_out_dir(argv: list[str]) -> str | None:
    """The --o value even when the rest of the line does not parse (for the exit file)."""
    for i, tok in enumerate(argv):
        if _key(tok) == "o" and tok.startswith("--"):
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                return argv[i + 1]
        if tok.startswith("--o="):
            return tok.split("=", 1)[1]
    return None


# --- running ---------------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM / SIGINT arrived. A BaseException, like KeyboardInterrupt: raised from the
    signal handler wherever the job is, it must not be swallowed by an ``except Exception``
    (logging's handlers catch those, so a signal that lands while a line is being written
    would otherwise be lost and the job would run on)."""


def _on_signal(signum: int, frame: Any) -> None:
    raise Terminated(signal.Signals(signum).name)


def setup_logging() -> None:
    """Information to stdout (run.out, the GUI's upper pane), warnings and errors to stderr
    (run.err, the lower pane): an error pane full of progress lines would hide failures."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    out = logging.StreamHandler(sys.stdout)
    out.setLevel(logging.INFO)
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    out.setFormatter(fmt)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(out)
    root.addHandler(err)
    root.setLevel(logging.INFO)


def set_threads(threads: int | None) -> None:
    """Limit BLAS/OpenMP threads to RELION's --j (absent: 1, as ccpem-pipeliner omits --j
    for one thread). Must run before NumPy is imported to take effect."""
    n = str(max(1, threads or 1))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if threads is not None:
            os.environ[var] = n
        else:
            os.environ.setdefault(var, n)


def warn_threads(threads: int | None) -> None:
    """Warn when ``--j`` asks for more threads than this process has cores."""
    from companion.threads import available_cores

    cores = available_cores()
    if threads is not None and threads > cores:
        log.warning(
            "--j %d: only %d cores are available to this job (CPU affinity / cgroup quota); "
            "the threads will share them — lower 'Number of threads' to %d",
            threads, cores, cores,
        )  # fmt: skip


def finished_job(job_dir: Path) -> bool:
    """Whether ``job_dir`` holds a finished job (exit file, or node file and summary)."""
    from companion.relion.pipeline import EXIT_SUCCESS, OUTPUT_NODES

    return (job_dir / EXIT_SUCCESS).is_file() or (
        (job_dir / OUTPUT_NODES).is_file() and (job_dir / "summary.json").is_file()
    )


def refuse_continue(job: JobArgs) -> str | None:
    """Why continuing ``job`` would be refused (bad or changed parameters, no input), else
    None; checked before any file of the job is touched."""
    from companion.classify.checkpoint import check_params
    from companion.errors import CompanionError
    from companion.params import validate_params

    if not job.in_parts or not Path(job.in_parts).is_file():
        return f"{job.in_parts or '--in_parts'}: input particles file not found (--in_parts)"
    try:
        check_params(Path(job.out) / "checkpoint", validate_params(job.params))
    except CompanionError as exc:
        return str(exc)
    return None


def parse_select(text: str, result: Any) -> list[int]:
    """``auto`` (:func:`companion.select.select_auto`, the rule shared with the CryoSPARC
    job) or a class list like ``1,4,7`` / ``1 4 7`` / ``3-6``; 1-based class numbers."""
    import numpy as np

    from companion.select import selected_classes

    return [int(i) + 1 for i in np.flatnonzero(selected_classes(result, text, base=1))]


class JobCallbacks:
    """Classifier callbacks: RELION's abort file as ``should_stop``; iteration log lines."""

    def __init__(self, abort: Any) -> None:
        self.abort = abort
        self.logged = False

    def should_stop(self) -> bool:
        if not self.abort.requested():
            return False
        if not self.logged:
            self.logged = True
            log.info("RELION_JOB_ABORT_NOW found: stopping; the last finished iteration is kept")
        return True

    def on_iteration(self, info: Any) -> None:  # the runner logs progress lines with ETA
        pass

    def progress(self, done: int, total: int, stage: str) -> None:
        pass


def run_job(job: JobArgs, project_dir: Path) -> Path:
    """Classify, write outputs and the node file; returns the job directory."""
    from companion.errors import InputError
    from companion.params import ClassifyParams, validate_params
    from companion.relion import read_particles
    from companion.relion.pipeline import (
        OUTPUT_NODES,
        AbortWatcher,
        detect_version,
        write_output_nodes,
    )
    from companion.run import run_classification

    job_dir = Path(job.out)
    log.info("%s: job directory %s, project %s", PROG, job_dir, project_dir)
    version = detect_version(project_dir, job.relion_version)
    params: ClassifyParams = validate_params(job.params)
    for key, value in job.inputs.items():
        log.info("--%s %s: not used by 2D classification (ignored)", key, value)
    if not job.in_parts:
        raise InputError("--in_parts is required: the particles STAR file to classify")
    parts = Path(job.in_parts)
    if not (parts if parts.is_absolute() else project_dir / parts).is_file():
        raise InputError(f"{job.in_parts}: input particles file not found (--in_parts)")
    log.info("parameters (resolved):")
    for k, v in params.resolved().items():
        log.info("  %-22s %s", k, v)
    log.info("threads: %s", os.environ.get("OMP_NUM_THREADS"))

    abort = AbortWatcher(job_dir)
    if abort.requested():  # left by an earlier run: RELION removes it when a job starts
        abort.clear()
        log.info("removed a stale RELION_JOB_ABORT_NOW left by an earlier run")
    particles = read_particles(parts, project_dir=project_dir)
    particles.passthrough.relion_version = version  # the writers' RELION flavour
    log.info(
        "read %d particles (box %d, %.3f Å/px) from %s",
        len(particles), particles.box, particles.pixel_size, job.in_parts,
    )  # fmt: skip
    checkpoint = job_dir / "checkpoint"
    resume = checkpoint.is_dir() and any(checkpoint.iterdir())
    if resume:
        log.info("checkpoint found in %s: continuing from the last finished iteration", checkpoint)
    outputs = run_classification(
        particles,
        params,
        job_dir,
        resume=resume,
        keep_iterations=job.keep_iterations,
        callbacks=JobCallbacks(abort),
        root="run",
        select=job.select or None,  # companion.select.select_particles, as for every host
    )
    result, paths = outputs.result, outputs.paths
    _log_occupancy(result)
    nodes: list[tuple[Path, str]] = [
        (paths["data"], "particles"),
        (paths["optimiser"], "optimiser"),
        (paths["model"], "model"),
    ]
    chosen = outputs.summary.get("selection")
    if chosen and "selected_particles" in paths:
        log.info(
            "selected %d classes (%s), %d particles (%d outliers of these classes left out) "
            "-> %s, %s",
            len(chosen["classes"]), ",".join(map(str, chosen["classes"])),
            chosen["n_particles"], chosen["removed_total"],
            paths["selected_particles"], paths["selected_classes"],
        )  # fmt: skip
        nodes += [
            (paths["selected_particles"], "selected_particles"),
            (paths["selected_classes"], "class_averages"),
        ]
    for name, path in paths.items():
        log.info("output %-10s %s", name, path)
    write_output_nodes(job_dir, nodes, version, project_dir)
    log.info("wrote %s (RELION %s node types)", job_dir / OUTPUT_NODES, version)
    return job_dir


def _log_occupancy(result: Any) -> None:
    import numpy as np

    sizes = np.asarray(result.class_sizes)
    res = np.asarray(result.resolution_A, dtype=np.float64)
    log.info(
        "class occupancy (%d particles, %d classes; largest %d, empty %d%s):",
        int(sizes.sum()), sizes.size, int(sizes.max(initial=0)), int((sizes == 0).sum()),
        f", cap {result.cap}" if result.cap is not None else "",
    )  # fmt: skip
    order = np.argsort(-sizes, kind="stable")
    for start in range(0, sizes.size, 5):
        cells = [
            f"class {i + 1:>4}: {int(sizes[i]):>7} ({res[i]:5.1f} Å)"
            if np.isfinite(res[i])
            else f"class {i + 1:>4}: {int(sizes[i]):>7} (   -- Å)"
            for i in order[start : start + 5]
        ]
        log.info("  " + "   ".join(cells))


def usage() -> str:
    """The module description plus every classifier parameter with its help text."""
    from companion.params import ClassifyParams

    lines = [(__doc__ or "").strip(), "", "Classifier parameters (--name value):"]
    for name, info in ClassifyParams.model_fields.items():
        default = "" if info.default is None else f" [default: {info.default}]"
        lines.append(f"  --{name:<22} {info.description or ''}{default}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``companion-relion``; always leaves an exit file in the job directory."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    setup_logging()
    out = find_out_dir(argv)
    if out is None:
        print(f"{PROG}: error: --o External/jobNNN/ is required", file=sys.stderr)
        return 2
    job: JobArgs | None = None
    parse_error: JobArgsError | None = None
    try:
        job = parse_job_args(argv)
    except JobArgsError as exc:
        parse_error = exc
    if job is not None:
        warn_threads(job.threads)
    set_threads(job.threads if job else None)  # before NumPy is imported
    job_dir = Path(out)
    job_dir.mkdir(parents=True, exist_ok=True)
    from companion.relion.pipeline import (
        EXIT_SUCCESS,
        OUTPUT_NODES,
        AbortWatcher,
        clear_exit_files,
        write_exit_file,
    )

    if job is not None and finished_job(job_dir):
        refused = refuse_continue(job)
        if refused is not None:  # a finished job stays finished, its files as they were
            if not (job_dir / EXIT_SUCCESS).exists():  # RELION may have removed it
                write_exit_file(job_dir, "success")
            print(
                f"{PROG}: error: {refused} (the finished job in {job_dir} is left as it was)",
                file=sys.stderr,
            )
            return 2
    clear_exit_files(job_dir)
    (job_dir / OUTPUT_NODES).unlink(missing_ok=True)  # rewritten once everything exists
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    status, reason, code = "failure", "", 1
    try:
        if parse_error is not None or job is None:
            raise parse_error or JobArgsError("cannot parse the command line")
        run_job(job, Path.cwd())
        status, code = "success", 0
    except JobArgsError as exc:
        reason, code = str(exc), 2
    except Terminated as exc:
        status, reason, code = "aborted", f"stopped by {exc}", 143
    except Exception as exc:
        from companion.errors import Aborted, CompanionError

        if isinstance(exc, Aborted):
            status, reason, code = "aborted", "aborted on request (RELION_JOB_ABORT_NOW)", 130
        elif isinstance(exc, CompanionError):
            reason, code = str(exc), exc.exit_code
        else:
            traceback.print_exc(file=sys.stderr)
            reason = f"internal error: {type(exc).__name__}: {exc}"
    finally:
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        if status == "aborted":
            AbortWatcher(job_dir).clear()
        write_exit_file(job_dir, status)
        for s, h in old.items():
            signal.signal(s, h)
    sys.stdout.flush()
    if status == "success":
        log.info("%s: done", PROG)
    elif status == "aborted":
        log.warning("%s (last finished iteration kept; run again to continue)", reason)
        print(f"{PROG}: aborted: {reason}", file=sys.stderr)
    else:
        for h in logging.getLogger().handlers:
            h.flush()
        print(f"{PROG}: error: {reason}", file=sys.stderr)
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
