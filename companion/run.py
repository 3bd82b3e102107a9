"""One classification run, start to finish: checks, classify, host outputs, report.

:func:`run_classification` is what ``companion classify``, ``companion demo`` and the
external jobs call. It checks feasibility and the device before any work, logs one line per
iteration on stderr (with an ETA), calls the classifier (which checkpoints every finished
iteration in ``out_dir/checkpoint``), writes the host's files (RELION ``run_itNNN_*`` or
CryoSPARC ``.cs``), the PNG gallery and occupancy plot, and ``summary.json`` last: a
directory holding ``summary.json`` is complete. If writing fails, the files this run had
started are removed again, so nothing half-written is left behind.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from companion.classify.result import ClassResult
from companion.errors import DeviceError
from companion.host import Host, host_named
from companion.outdir import exclusive
from companion.params import ClassifyParams
from companion.particles import ParticleSet
from companion.report import build_summary, write_gallery, write_json, write_occupancy
from companion.select import (
    class_features,
    parse_class_list,
    scores_from_features,
    select_particles,
    with_particle_features,
)

log = logging.getLogger("companion.run")

SUMMARY = "summary.json"
GALLERY = "class_averages.png"
OCCUPANCY = "class_occupancy.png"


@dataclass
class RunOutputs:
    """What a run wrote: ``paths`` (name → file), the ``summary`` dict, the ``result``."""

    paths: dict[str, Path]
    summary: dict[str, Any]
    result: ClassResult


def check_device(device: str) -> None:
    """Raise DeviceError when ``--device gpu`` is asked for and CuPy sees no GPU."""
    if device != "gpu":
        return
    from companion.classify import backend

    if backend.cupy_or_none() is None:
        try:
            backend.select_device("gpu")  # its message says whether CuPy or the GPU is missing
        except DeviceError:
            raise
        except Exception:
            pass
        raise DeviceError(
            "--device gpu: CuPy sees no CUDA GPU (install companion[gpu] on a machine with "
            "an NVIDIA GPU and driver) — use --device cpu or --device auto"
        )


# ------------------------------------------------------------------ progress and stop


def _fmt_time(s: float) -> str:
    s = max(0.0, float(s))
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{s / 60:.0f}m{s % 60:02.0f}s"
    return f"{s / 3600:.0f}h{(s % 3600) / 60:02.0f}m"


class ProgressLog:
    """One log line per finished iteration with an ETA from the work still to do.

    Work is counted in particles processed: an online iteration handles a mini-batch of
    ``batch_per_class × K`` particles, a full pass all N.
    """

    def __init__(self, n_particles: int, params: ClassifyParams, stream_log: logging.Logger = log):
        self.n = n_particles
        self.params = params
        self.log = stream_log
        batch = min(n_particles, params.batch_per_class * params.n_classes)
        self.work = [batch] * params.online_iters + [n_particles] * params.full_iters
        self.t_last = time.perf_counter()
        self.busy = 0.0  # seconds spent in iterations seen so far
        self.done_work = 0
        self.last_iteration = 0
        self._last_progress = 0.0
        self._explained = False

    def on_iteration(self, info: Any) -> None:
        now = time.perf_counter()
        it = int(_get(info, "iteration", self.last_iteration + 1))
        total = int(_get(info, "n_iterations", len(self.work)) or len(self.work))
        secs = _get(info, "seconds", None)
        self.busy += float(secs) if secs is not None else now - self.t_last
        self.t_last = now
        self.last_iteration = it
        # the rate over iterations seen (a resumed run counts from its first one)
        self.done_work += self.work[it - 1] if 0 < it <= len(self.work) else 0
        left = sum(self.work[it:])
        eta = self.busy / self.done_work * left if self.done_work > 0 else float("nan")
        if not self._explained:
            self._explained = True
            self.log.info(
                "per iteration: u = uncertainty factor; res = median FRC-0.143 resolution of the "
                "classes whose resolution is determined (— when none is); largest class / small "
                "= particles in the largest class / classes below 10%% of the mean size, among "
                "this iteration's particles (the mini-batch in online iterations%s)",
                "; with --balance the capped sizes" if self.params.balance != "off" else "",
            )
        parts = [f"iteration {it}/{total}"]
        u = _get(info, "uncertainty", None)
        if u is not None:
            parts.append(f"u={float(u):.2f}")
        r = _get(info, "resolution_A", None)
        if r is not None:
            parts.append(f"res {float(r):.1f} Å" if math.isfinite(float(r)) else "res — Å")
        sizes = _get(info, "class_sizes", None)
        if sizes is not None:
            s = np.asarray(sizes)
            if s.size:
                parts.append(
                    f"largest class {int(s.max())}, {int((s < 0.1 * s.mean()).sum())} small"
                )
        if secs is not None:
            parts.append(f"{float(secs):.1f}s")
        parts.append(f"ETA {_fmt_time(eta)}" if np.isfinite(eta) else "ETA ?")
        self.log.info("  ".join(parts))

    def progress(self, done: int, total: int, stage: str) -> None:
        now = time.perf_counter()
        if now - self._last_progress >= 15.0 and total > 0:
            self._last_progress = now
            self.log.info("  %s: %d/%d (%.0f%%)", stage, done, total, 100.0 * done / total)


def _get(info: Any, name: str, default: Any) -> Any:
    if isinstance(info, dict):
        return info.get(name, default)
    return getattr(info, name, default)


@dataclass
class StopFlag:
    """Set by a signal; the classifier polls it between iterations and batches."""

    requested: bool = False
    signum: int | None = None

    def __call__(self) -> bool:
        return self.requested


@contextmanager
def stop_on_signals(
    signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[StopFlag]:
    """While inside, the first Ctrl-C / SIGTERM asks the run to stop after its current
    iteration is checkpointed; a second Ctrl-C stops at once (KeyboardInterrupt)."""
    flag = StopFlag()
    old: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested, flag.signum = True, signum
        log.warning("stop requested: finishing the current iteration (Ctrl-C again to stop now)")

    try:
        for s in signums:
            old[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread: no handlers
        pass
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@dataclass
class _Hooks:
    """Our progress and outputs composed with the caller's callbacks."""

    progress_log: ProgressLog
    user: Any = None
    intermediate_writer: Callable[[int, ClassResult], None] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def build(self) -> Any:
        from companion.classify.callbacks import Callbacks

        return Callbacks(
            on_iteration=self.on_iteration,
            should_stop=self.should_stop,
            progress=self.progress,
            intermediate=self.intermediate if self.intermediate_writer else None,
        )

    def on_iteration(self, info: Any) -> None:
        self.progress_log.on_iteration(info)
        self._call("on_iteration", info)

    def should_stop(self) -> bool:
        fn = getattr(self.user, "should_stop", None)
        return bool(fn()) if fn is not None else False

    def progress(self, done: int, total: int, stage: str) -> None:
        self.progress_log.progress(done, total, stage)
        self._call("progress", done, total, stage)

    def intermediate(self, iteration: int, result: ClassResult) -> None:
        assert self.intermediate_writer is not None
        self.intermediate_writer(iteration, result)
        self._call("intermediate", iteration, result)

    def _call(self, name: str, *args: Any) -> None:
        fn = getattr(self.user, name, None)
        if fn is not None:
            fn(*args)


# ------------------------------------------------------------------ outputs


def seen_subset(particles: ParticleSet, result: ClassResult) -> tuple[ParticleSet, ClassResult]:
    """Particles an (online) iteration has assigned (``class_id >= 0``) and their results."""
    seen = np.flatnonzero(np.asarray(result.class_id) >= 0)
    if seen.size == len(particles):
        return particles, result
    return particles.subset(seen), result.take(seen)


def check_cap(result: ClassResult, n_particles: int, cap: int | None = None) -> None:
    """The written output must keep the cap (``cap``, else the result's) and agree with the
    labels; a classifier bug if not."""
    labels = np.asarray(result.class_id)
    if labels.shape != (n_particles,):
        raise RuntimeError(f"classifier returned {labels.shape} labels for {n_particles} particles")
    sizes = np.bincount(labels, minlength=result.n_classes)
    if sizes.size != result.n_classes or not np.array_equal(sizes, result.class_sizes):
        raise RuntimeError("classifier result: class_sizes disagree with class_id")
    cap = result.cap if cap is None else cap
    if cap is not None and sizes.max(initial=0) > cap:
        raise RuntimeError(
            f"classifier result breaks the cap: class {int(sizes.argmax()) + 1} holds "
            f"{int(sizes.max())} > {cap} particles; nothing was written"
        )


def _files_under(d: Path) -> set[Path]:
    return {p for p in d.rglob("*") if p.is_file() and "checkpoint" not in p.relative_to(d).parts}


@contextmanager
def _all_or_nothing(out_dir: Path) -> Iterator[None]:
    """Remove every file (and new directory) created inside the block if it raises."""
    before = _files_under(out_dir)
    dirs_before = {p for p in out_dir.rglob("*") if p.is_dir()}
    try:
        yield
    except BaseException:
        for p in _files_under(out_dir) - before:
            p.unlink(missing_ok=True)
        for d in sorted({p for p in out_dir.rglob("*") if p.is_dir()} - dirs_before, reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass
        raise


def after_main_run(particles: ParticleSet, params: ClassifyParams, result: ClassResult,
                   out_dir: Path, classifier: Callable[..., ClassResult],
                   hooks: Any = None) -> ClassResult:  # fmt: skip
    """What follows the main classification, before anything is written: ``--stability R``
    (R-1 more runs, :mod:`companion.stability`) and ``--subclassify``
    (:mod:`companion.subclassify`); ``result`` unchanged without them."""
    if not params.subclassify and params.stability < 2:
        return result
    stop = SimpleNamespace(should_stop=hooks.should_stop if hooks is not None else lambda: False)
    stab = None
    if params.stability >= 2:
        from companion.stability import run_stability

        stab = run_stability(particles, params, result, out_dir, classifier=classifier,
                             callbacks=stop)  # fmt: skip
    if params.subclassify:
        from companion.subclassify import subclassify

        result = subclassify(particles, params, result, out_dir, classifier=classifier,
                             callbacks=stop)  # fmt: skip
    if stab is not None:
        from companion.stability import with_stability

        result = with_stability(result, *stab)
    return result


@exclusive  # one run per out_dir: lock, leftovers cleaned, write errors as one line
def run_classification(
    particles: ParticleSet,
    params: ClassifyParams,
    out_dir: str | Path,
    sink: Host | None = None,
    *,
    resume: bool = False,
    keep_iterations: bool = False,
    callbacks: Any = None,
    root: str = "run",
    classifier: Callable[..., ClassResult] | None = None,
    select: str | None = None,
    checked: bool = False,
) -> RunOutputs:
    """Classify ``particles`` into ``out_dir`` and write every output; see the module doc.

    ``sink``: the Host that writes the result (default: the host the particles came from);
    ``classifier``: the classification function (default :func:`companion.classify.classify`);
    ``select``: ``auto`` or a class list in the host's numbering (RELION 1-based, CryoSPARC
    0-based): also write the particles of those classes (``Host.write_selection``);
    ``checked``: the caller already ran :func:`companion.preflight.check_run` for these
    parameters and this many particles (once per run).

    Raises ParameterError / DeviceError before any work when the parameters cannot work
    (cap below N/K, more classes than particles, GPU asked for and absent: see
    :func:`companion.outdir.exclusive`), Aborted when ``callbacks.should_stop()`` turned
    true (the last finished iteration stays on disk).
    """
    t_start = time.perf_counter()
    n = len(particles)
    sink = sink if sink is not None else host_named(particles.host)
    if classifier is None:
        from companion.classify import classify

        classifier = functools.partial(classify, checked=True)  # checked above, once
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / SUMMARY
    summary_path.unlink(missing_ok=True)  # the old summary would describe other outputs
    cap = params.class_cap(n)
    if select is not None and select.strip().lower() != "auto":  # a bad list fails before work
        parse_class_list(select, params.n_classes, base=sink.class_base)

    def write_iteration(iteration: int, res: ClassResult) -> None:
        if iteration >= params.total_iters:
            return  # the final outputs are written below, once
        ps, res = seen_subset(particles, res)
        try:
            check_cap(res, len(ps), cap)
        except RuntimeError as exc:  # never write it; do not kill the run for a snapshot
            log.warning("iteration %d not written: %s", iteration, exc)
            return
        target = sink.iteration_dir(out_dir, iteration)
        target.mkdir(parents=True, exist_ok=True)
        with _all_or_nothing(target):
            sink.write_result(target, root, ps, res, iteration)

    hooks = _Hooks(ProgressLog(n, params), callbacks, write_iteration if keep_iterations else None)
    log.info(
        "classifying %d particles into %d classes (%s, anneal %s, balance %s) -> %s",
        n,
        params.n_classes,
        params.device,
        params.anneal,
        params.balance,
        out_dir,
    )
    t0 = time.perf_counter()
    from companion.classify.preprocess import BadImages

    try:
        result = classifier(particles, params, work_dir=out_dir, resume=resume,
                          callbacks=hooks.build())  # fmt: skip
    except BadImages as bad:  # --drop-bad-images: classify the others (preprocessed again)
        log.warning("--drop-bad-images: leaving out %d of %d images with NaN/Inf pixels",
                    len(bad.bad), n)  # fmt: skip
        particles = particles.subset(bad.keep)
        n = len(particles)
        params.check_feasible(n)  # fewer particles than were checked
        cap = params.class_cap(n)
        result = classifier(particles, params, work_dir=out_dir, resume=resume,
                          callbacks=hooks.build())  # fmt: skip
    t_classify = time.perf_counter() - t0
    check_cap(result, n, cap)
    result = after_main_run(particles, params, result, out_dir, classifier, hooks)
    check_cap(result, n, cap)
    result = with_particle_features(result, particles)  # written: companion select reads it

    t0 = time.perf_counter()
    with _all_or_nothing(out_dir):
        paths = sink.write_result(out_dir, root, particles, result, result.iteration)
        features = class_features(result)
        scores = scores_from_features(features)
        keep = selection = None
        if select is not None:  # the one rule of every host (companion.select)
            selection = select_particles(result, select, particles=particles,
                                         base=sink.class_base)  # fmt: skip
            keep = selection.classes
            paths.update(sink.write_selection(out_dir, particles, result, keep, paths,
                                              chosen=selection.particles))  # fmt: skip
        p = result.params or params.resolved()
        title = (
            f"{particles.source_path.name}: {n} particles, K {result.n_classes}, anneal "
            f"{p.get('anneal')}, balance {p.get('balance')}, iteration {result.iteration}"
        )
        paths["gallery"] = write_gallery(
            out_dir / GALLERY,
            result.averages,
            result.class_sizes,
            result.resolution_A,
            title=title,
            scores=scores,
            selected=keep,
            parents=result.parent_class,
            stability=result.class_stability,
        )
        paths["occupancy"] = write_occupancy(
            out_dir / OCCUPANCY, result.class_sizes, cap=result.cap, history=result.history
        )
        paths["summary"] = summary_path
        t_write = time.perf_counter() - t0
        summary = build_summary(
            result,
            files={name: os.path.relpath(path, out_dir) for name, path in paths.items()},
            n_particles=n,
            source=particles.source_path,
            host=sink.name,
            params=params.resolved(),
            selection=None if selection is None else selection.report(),
            class_features=features,
            timings={
                "classify_s": t_classify,
                "write_s": t_write,
                "run_s": time.perf_counter() - t_start,
            },
        )
        write_json(summary_path, summary)
    log.info(
        "done: %d classes, largest %d%s, %d below 10%% of the mean; %s",
        result.n_classes,
        summary["largest_class"],
        f" (cap {result.cap})" if result.cap is not None else "",
        summary["classes_below_10pct_of_mean"],
        summary_path,
    )
    return RunOutputs(paths=paths, summary=summary, result=result)
