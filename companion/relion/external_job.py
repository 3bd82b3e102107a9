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
value its default); booleans take Yes/No (RELION's word), true/false, on/off or 1/0. The
options are generated from the parameter model (:func:`build_parser`). Job options:
``--select auto|1,4,7`` (also write a Subset-selection style ``particles.star`` +
``class_averages.star``), ``--keep_iterations``, ``--relion_version 3.1|4.0|5.0``
(default: from ``default_pipeline.star``).

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

import argparse
import logging
import os
import re
import signal
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from companion.commands.options import Parser

PROG = "companion-relion"
log = logging.getLogger("companion.relion.external_job")

OTHER_INPUTS = ("in_mics", "in_movies", "in_coords", "in_3dref", "in_mask")
BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "y": True,
              "0": False, "false": False, "no": False, "off": False, "n": False}  # fmt: skip
_BARE = object()  # the value of an option given without one (an empty value field)
_GIVEN = "_relion_given"  # namespace attribute: dest -> the spelling that set it


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


def _bool(option: str, value: str) -> bool:
    """RELION's External job passes a parameter's value field as typed: ``Yes``/``No`` (its
    own word for booleans), ``true``/``false``, ``on``/``off`` or ``1``/``0``."""
    try:
        return BOOL_WORDS[value.strip().lower()]
    except KeyError:
        raise JobArgsError(f"{option} {value!r}: use yes/no, true/false, on/off or 1/0") from None


class _Once(argparse.Action):
    """Store ``convert(value)``; any option given twice on one line (in either spelling) is
    an error, as two values for one parameter are a mistake in the job's fields."""

    def __init__(self, *args: Any, info: Any = None, negate: bool = False, **kwargs: Any):
        self.info, self.negate = info, negate
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        given: dict[str, str] = namespace.__dict__.setdefault(_GIVEN, {})
        option = option_string or self.dest
        if self.dest in given:
            first = given[self.dest]
            also = f" (also as {first})" if first != option else ""
            raise JobArgsError(f"{option} is given twice{also}: give it once")
        given[self.dest] = option
        setattr(namespace, self.dest, self.convert(option, values))

    def convert(self, option: str, value: Any) -> Any:
        return value


class _Text(_Once):
    def convert(self, option: str, value: Any) -> Any:
        if isinstance(value, list):  # --select 1, 4, 7: RELION does not quote values
            return " ".join(value)
        return value


class _Threads(_Once):
    def convert(self, option: str, value: Any) -> int:
        try:
            n = int(value)
        except ValueError:
            raise JobArgsError(
                f"{option} {value!r}: the number of threads must be a whole number"
            ) from None
        if n < 1:
            raise JobArgsError(f"{option} {n}: the number of threads must be at least 1")
        return n


class _Flag(_Once):
    """An on/off option: bare means on, else a RELION boolean word; ``--no_X`` means off."""

    def convert(self, option: str, value: Any) -> bool:
        if self.negate:
            return False
        return True if value is _BARE else _bool(option, value)


class _Param(_Once):
    """A classifier parameter's raw text (the params model validates it); a bare flag (an
    empty value field) means the default of a parameter whose default is "none", else is an
    error; a choice parameter's value is checked here to suggest the closest choice."""

    def convert(self, option: str, value: Any) -> Any:
        from companion.commands.options import choice_error
        from companion.params import field_choices

        default = self.info.default
        if value is _BARE or (default is None and value.strip().lower() in ("", "none")):
            if default is None:
                return None  # empty value: the default
            raise JobArgsError(f"{option} needs a value (default {default})")
        choices = field_choices(self.info)
        if choices is not None and value not in choices:
            raise JobArgsError(choice_error(option, value, choices))
        return value


class _JobParser(Parser):
    """RELION's command line: errors raise JobArgsError (the job then writes its exit file)."""

    def option_strings(self) -> list[str]:  # suggestions: not --o or --j for any typo
        return [s for s in super().option_strings() if len(s) > 3]

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required: --o"):
            raise JobArgsError("--o External/jobNNN/ is required (RELION passes it)")
        m = re.match(r"argument (\S+?)(?:/\S+)?: expected (?:one|at least one) argument", message)
        if m:
            raise JobArgsError(f"{m.group(1)} needs a value")
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m and not m.group(1).startswith("-"):
            raise JobArgsError(
                f"unexpected argument {m.group(1)!r} (options look like --name value)"
            )
        message = self.explain(message)
        if message.startswith("unknown option") and "did you mean" not in message:
            message += f" — {PROG} --help lists the options"
        raise JobArgsError(message)


def build_parser() -> Parser:
    """RELION's call as an ``ArgumentParser``: job options, then one option per field of
    :class:`ClassifyParams` (RELION's ``--n_classes`` and the CLI's ``--n-classes``), so a
    parameter added to the model is accepted here without a change."""
    from companion.params import ClassifyParams, field_choices, field_help

    parser = _JobParser(
        prog=PROG,
        usage=f"{PROG} --o External/jobNNN/ --in_parts STAR [--NAME VALUE ...] [--j N]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    job = parser.add_argument_group("job options (RELION passes --o, --in_*, --j)")
    job.add_argument("--o", required=True, action=_Text, metavar="External/jobNNN/",
                     help="the job directory")  # fmt: skip
    job.add_argument("--in_parts", action=_Text, metavar="STAR",
                     help="the particles STAR file to classify")  # fmt: skip
    for name in OTHER_INPUTS:
        spellings = ["--" + name] + (["--in_3Dref"] if name == "in_3dref" else [])
        job.add_argument(*spellings, dest=name, action=_Text, metavar="FILE",
                         help="accepted and ignored (not used by 2D classification)")  # fmt: skip
    job.add_argument("--j", action=_Threads, metavar="N",
                     help="threads (RELION's 'Number of threads') [default: 1]")  # fmt: skip
    job.add_argument("--pipeline_control", nargs="?", action=_Text, metavar="DIR",
                     help="accepted and ignored")  # fmt: skip
    job.add_argument("--relion_version", action=_Text, metavar="3.1|4.0|5.0",
                     help="RELION flavour of the outputs [default: from "
                     "default_pipeline.star]")  # fmt: skip
    job.add_argument("--select", nargs="+", action=_Text, metavar="auto|LIST",
                     help="also write particles.star + class_averages.star of these classes "
                     "('auto' or 1-based classes like 1,4,7-9)")  # fmt: skip
    job.add_argument("--keep_iterations", nargs="?", const=_BARE, action=_Flag,
                     default=False, metavar="yes|no",
                     help="write the outputs of every iteration, not only the last")  # fmt: skip
    params = parser.add_argument_group(
        "classifier parameters (--name value; see companion classify --help)"
    )
    for name, info in ClassifyParams.model_fields.items():
        kebab = name.replace("_", "-")
        spellings = [f"--{name}"] + ([f"--{kebab}"] if kebab != name else [])
        common = {"dest": name, "default": argparse.SUPPRESS, "info": info}
        if info.annotation is bool:
            params.add_argument(*spellings, nargs="?", const=_BARE, action=_Flag,
                                metavar="yes|no", help=field_help(info, info.default),
                                **common)  # fmt: skip
            negated = [f"--no_{name}"] + ([f"--no-{kebab}"] if kebab != name else [])
            params.add_argument(*negated, nargs=0, action=_Flag, negate=True,
                                help=argparse.SUPPRESS, **common)  # fmt: skip
        else:
            choices = field_choices(info)
            metavar = name.upper() if choices is None else "|".join(choices)
            params.add_argument(*spellings, nargs="?", const=_BARE, action=_Param,
                                metavar=metavar, help=field_help(info, info.default),
                                **common)  # fmt: skip
    return parser


def parse_job_args(argv: list[str]) -> JobArgs:
    """Parse RELION's command line; classifier parameters are collected, not validated. A
    label typed with its dashes (RELION adds two more: ``----n_classes``) is accepted."""
    from companion.params import ClassifyParams

    argv = ["--" + a.lstrip("-") if a.startswith("---") else a for a in argv]
    ns = vars(build_parser().parse_args(argv))
    ns.pop(_GIVEN, None)
    return JobArgs(
        out=ns["o"],
        in_parts=ns["in_parts"],
        inputs={k: ns[k] for k in OTHER_INPUTS if ns[k] is not None},
        threads=ns["j"],
        relion_version=ns["relion_version"],
        select=ns["select"],
        keep_iterations=ns["keep_iterations"],
        params={k: ns[k] for k in ClassifyParams.model_fields if k in ns},
    )


def find_out_dir(argv: list[str]) -> str | None:
    """The --o value even when the rest of the line does not parse (for the exit file)."""
    parser = _JobParser(prog=PROG, add_help=False)
    parser.add_argument("--o")
    try:
        ns, _ = argparse.ArgumentParser.parse_known_args(parser, argv)
    except JobArgsError:
        return None
    return ns.o


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


def refuse_continue(job: JobArgs, params: Any) -> str | None:
    """Why continuing ``job`` with the validated ``params`` would be refused (changed
    parameters, no input), else None; checked before any file of the job is touched."""
    from companion.classify.checkpoint import check_params
    from companion.errors import CompanionError

    if not job.in_parts or not Path(job.in_parts).is_file():
        return f"{job.in_parts or '--in_parts'}: input particles file not found (--in_parts)"
    try:
        check_params(Path(job.out) / "checkpoint", params)
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


def run_job(job: JobArgs, params: Any, project_dir: Path) -> Path:
    """Classify with the validated ``params``, write outputs and the node file; returns the
    job directory."""
    from companion.errors import InputError
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
        select=job.select or None,  # refused before any work if bad; select.select_particles
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
    """The help text: the module description plus every option (:func:`build_parser`)."""
    return build_parser().format_help()


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
    from companion.errors import CompanionError
    from companion.params import validate_params

    job: JobArgs | None = None
    params: Any = None
    parse_error: Exception | None = None  # reported once the job's exit files are in order
    try:
        job = parse_job_args(argv)
    except JobArgsError as exc:
        parse_error = exc
    if job is not None:
        warn_threads(job.threads)
    set_threads(job.threads if job else None)  # before NumPy is imported
    if job is not None:
        try:
            params = validate_params(job.params)  # the run's one validation
        except CompanionError as exc:
            parse_error = exc
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
        refused = str(parse_error) if parse_error else refuse_continue(job, params)
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
        run_job(job, params, Path.cwd())
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
