"""The CryoSPARC External job: classify a job's particles, save the results as job outputs.

Workflow (cryosparc-tools 5.x, names as in its ``Job``/``ExternalJob`` API):

1. connect, find the source job and its particle output (slots ``blob``, ``ctf``), load it
   and check everything that can be checked before a job exists: parameters against N, the
   device, ``--select`` indices, images under ``--project-dir`` (or disk space for a local
   copy when images come through the API);
2. create an External job in the source job's workspace (or ``--workspace``), connect the
   input ``particles``, add outputs ``particles`` (type particle, slot ``alignments2D``,
   passthrough of the input), ``class_averages`` (type template, slot ``blob``) and with
   ``--select`` ``particles_selected`` / ``particles_rejected``;
3. mark it running; load the input; read images from the mounted project directory, or copy
   the needed images once into a local stack through the API (:mod:`.staging`); classify
   (:func:`classify`); log the parameters, one updating line per iteration, a class-average
   gallery and an occupancy plot (:mod:`.joblog`);
4. upload ``J<n>/class_averages.mrc``, then save every output and mark the job completed.

Any failure after the job exists marks it failed with the reason (:func:`.joblog.failing_job`);
outputs are saved only after everything else succeeded and every output was checked
(:func:`check_outputs`), so a job that fails before the saves carries none; if the server
refuses a save part-way, the failure names the outputs already saved on the job.
Conventions (pose in radians, shift in pixels at ``alignments2D/psize_A``, ``blob/sign``,
class ↔ ``blob/idx``) live in :mod:`companion.cryosparc.conventions`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from companion import __version__
from companion.cryosparc.client import (
    REQUIRED_SLOTS,
    CryoSPARCError,
    Source,
    call,
    check_workspace,
    connect,
    find_source,
)
from companion.cryosparc.joblog import JobCallbacks, JobLog, failing_job, params_text
from companion.cryosparc.staging import check_disk, check_project_dir, stage_images
from companion.errors import InputError
from companion.host import CRYOSPARC
from companion.params import ClassifyParams
from companion.particles import ParticleSet

log = logging.getLogger("companion.cryosparc")

INPUT = "particles"
SELECT_OUTPUTS = (("particles_selected", "selected"), ("particles_rejected", "rejected"))


@dataclass
class ExternalJobRequest:
    """Everything ``companion cryosparc classify`` was asked to do."""

    url: str | None
    project: str
    job: str
    params: ClassifyParams
    output: str = "particles"
    workspace: str | None = None
    project_dir: Path | None = None
    title: str | None = None
    select: str | None = None
    contrast: str | None = None
    work_dir: Path | None = None
    cache_dir: Path | None = None
    timeout: float = 300.0


@dataclass
class ExternalJobResult:
    """What was done: the new job, its outputs (name → rows) and the run summary."""

    url: str
    project_uid: str
    job_uid: str
    source: str
    n_particles: int
    n_classes: int
    outputs: dict[str, int] = field(default_factory=dict)
    selected_classes: list[int] | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        from companion.report import jsonable

        return jsonable(self.__dict__)


def write_no_files(
    out_dir: Path, root: str, particles: ParticleSet, result: Any, iteration: int
) -> dict[str, Path]:
    """The job's Host writer: nothing on disk, the outputs are saved through the API."""
    return {}


# CryoSPARC's layout, without the offline .cs/.mrc files the job would only delete again
JOB_SINK = dataclasses.replace(CRYOSPARC, writer=f"{__name__}:write_no_files")


def classify(
    particles: ParticleSet, params: ClassifyParams, out_dir: Path, callbacks: Any
) -> tuple[Any, dict[str, Path], dict[str, Any]]:
    """Run the classifier; returns ``(ClassResult, local files, summary)``.

    The one place the External job calls the core: ``companion.run.run_classification``
    (classify + gallery/occupancy PNGs + summary.json; no local .cs files, see JOB_SINK).
    ``particles`` and ``params`` were checked by :func:`_preflight` before the job existed.
    """
    from companion.run import run_classification

    outputs = run_classification(
        particles, params, out_dir, JOB_SINK, callbacks=callbacks, checked=True
    )
    return outputs.result, outputs.paths, outputs.summary


# ------------------------------------------------------------------ --select


def parse_select(spec: str | None, n_classes: int | None = None) -> str | list[int] | None:
    """``None``, ``"auto"`` or sorted 0-based class indices from ``"0,3,7-9"`` (CryoSPARC
    numbers classes from 0; :func:`companion.select.parse_class_list`, the RELION job's
    parser), each checked to exist among ``n_classes`` when given."""
    from companion.select import parse_class_list

    if spec is None or spec.strip() == "":
        return None
    if spec.strip().lower() == "auto":
        return "auto"
    return parse_class_list(spec, n_classes if n_classes is not None else sys.maxsize, base=0)


def select_classes(result: Any, spec: str | list[int], particles: Any = None) -> Any:
    """The :class:`companion.select.Selection` of ``--select`` (``auto``:
    :func:`companion.select.select_particles`, the rule shared with the RELION job; a list of
    0-based classes keeps them whole)."""
    from companion.select import select_particles

    text = spec if isinstance(spec, str) else ",".join(str(int(c)) for c in spec)
    return select_particles(result, text, particles=particles, base=0)


# ------------------------------------------------------------------ the workflow


def _load_particles(dset: Any, project_dir: Path, contrast: str | None, label: str) -> ParticleSet:
    """ParticleSet from a loaded Dataset, checked like a .cs file; messages name ``label``
    (e.g. ``P3 J42.particles``)."""
    from companion.cryosparc.dataset_io import read_dataset

    return read_dataset(dset, label, project_dir, contrast=contrast)


@dataclass
class _Run:
    """State shared by the workflow's phases."""

    req: ExternalJobRequest
    source: Source
    work: Path
    stage_root: Path
    selection: str | list[int] | None
    dset: Any = None
    particles: Any = None
    job: Any = None
    joblog: Any = None

    @property
    def url(self) -> str:
        return self.source.url

    def job_call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        where = f"{self.job.project_uid}-{self.job.uid}"
        return call(fn, *args, url=self.url, what=f"{what} ({where})", **kwargs)


def run_external_job(
    req: ExternalJobRequest, *, should_stop: Callable[[], bool] | None = None
) -> ExternalJobResult:
    """Classify ``req.project``/``req.job``'s particles as a new External job (module doc)."""
    selection = parse_select(req.select, req.params.n_classes)  # before anything else
    if req.cache_dir is not None and not Path(req.cache_dir).is_dir():
        raise InputError(f"--cache-dir {req.cache_dir}: not a directory — create it or pick one")
    cs, url = connect(req.url, timeout=req.timeout)
    source = find_source(cs, url, req.project, req.job, req.output)
    workspace = check_workspace(source, req.workspace) if req.workspace else source.workspace_uid
    temp_work = req.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="companion-cs-")) if temp_work else Path(req.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stage_root = Path(tempfile.mkdtemp(prefix="companion-cs-images-", dir=req.cache_dir))
    run = _Run(req, source, work, stage_root, selection)
    try:
        _preflight(run)
        _create_job(run, workspace)
        with failing_job(run.job, url):
            _add_outputs(run)
            return _classify_and_save(run, should_stop)
    finally:
        shutil.rmtree(stage_root, ignore_errors=True)
        if temp_work:
            shutil.rmtree(work, ignore_errors=True)


def _preflight(run: _Run) -> None:
    """Load the source particles and check all that can fail before a job exists."""
    from companion.preflight import check_run

    req, source, params = run.req, run.source, run.req.params
    log.info("loading %s (%d particles) from %s", source.label, source.n_particles, run.url)
    run.dset = call(
        source.job.load_output,
        source.output,
        slots=list(REQUIRED_SLOTS),
        url=run.url,
        what=f"loading {source.label}",
    )
    image_root = req.project_dir if req.project_dir is not None else run.stage_root
    if len(run.dset) == 0:
        raise CryoSPARCError(f"{source.label} holds no particles — pick an output that has some")
    run.particles = _load_particles(run.dset, image_root, req.contrast, source.label)
    check_run(params, len(run.particles))  # the run's one check: classify() says checked
    run.particles.pixel_size  # noqa: B018 - raises when pixel sizes differ
    if req.project_dir is not None:
        server_dir = call(lambda: source.project.dir, url=run.url, what="reading the project dir")
        check_project_dir(run.particles, req.project_dir, str(server_dir))
    else:
        check_disk(run.particles, run.stage_root)


def _create_job(run: _Run, workspace: str) -> None:
    params, source = run.req.params, run.source
    title = run.req.title or f"companion 2D classification ({params.n_classes} classes)"
    desc = (
        f"2D classification of {source.label} ({len(run.particles)} particles) by companion "
        f"{__version__}.\n\n```\n{params_text(params)}\n```"
    )
    run.job = call(
        source.project.create_external_job,
        workspace,
        title=title,
        desc=desc,
        url=run.url,
        what="creating the External job",
    )
    run.joblog = JobLog(run.job, run.url)
    log.info("created External job %s-%s in %s", run.job.project_uid, run.job.uid, workspace)


def _add_outputs(run: _Run) -> None:
    job, source = run.job, run.source
    slots = list(REQUIRED_SLOTS)
    run.job_call(
        "connecting the input",
        job.connect,
        INPUT,
        source.job.uid,
        source.output,
        slots=slots,
        title="Particles",
    )
    outputs = [
        ("particle", "particles", "Particles (2D aligned)", ["alignments2D"], INPUT),
        ("template", "class_averages", "2D class averages", ["blob"], None),
    ]
    if run.selection is not None:
        outputs += [
            ("particle", name, f"Particles {what}", ["alignments2D"], INPUT)
            for name, what in SELECT_OUTPUTS
        ]
    for kind, name, title, out_slots, through in outputs:
        run.job_call(
            "adding outputs",
            job.add_output,
            kind,
            name=name,
            slots=out_slots,
            passthrough=through,
            title=title,
        )


def _classify_and_save(run: _Run, should_stop: Callable[[], bool] | None) -> ExternalJobResult:
    from companion.cryosparc.conventions import alignments2d_fields, class_average_fields

    req, job, joblog, source = run.req, run.job, run.joblog, run.source
    particles = run.particles
    psize = particles.pixel_size
    run.job_call("starting the job", job.start, "running")
    joblog.line(
        f"companion {__version__}: 2D classification of {len(particles)} particles from "
        f"{source.label} (box {particles.box} px, {psize:.3f} Å/px)"
    )
    joblog.line(params_text(req.params))
    inp = run.job_call("loading the input", job.load_input, INPUT, slots=list(REQUIRED_SLOTS))
    particles = _match_input(particles, run.dset, inp, source)
    if req.project_dir is not None:
        joblog.line(f"Reading particle images from {req.project_dir}")
    else:
        joblog.line(f"Reading particle images through the CryoSPARC API into {run.stage_root}")
        particles = stage_images(source, particles, run.stage_root, joblog)

    result, paths, summary = classify(
        particles, req.params, run.work / "run", JobCallbacks(joblog, should_stop)
    )
    sizes = np.asarray(result.class_sizes)
    cap = f" (cap {result.cap})" if result.cap else ""
    joblog.line(
        f"Finished {result.iteration} iterations: {int((sizes > 0).sum())} of "
        f"{result.n_classes} classes occupied, largest {int(sizes.max())} particles{cap}"
    )
    for key, text in (("gallery", "2D class averages"), ("occupancy", "Class occupancy")):
        if key in paths and Path(paths[key]).is_file():
            joblog.image(Path(paths[key]), text)

    # outputs: everything prepared first, then saved one after the other
    fields = alignments2d_fields(particles, result)
    out = run.job_call("allocating outputs", job.alloc_output, "particles", inp)
    for name, values in fields.items():
        out[name] = values
    run.job_call(
        "uploading class_averages.mrc",
        job.upload_mrc,
        "class_averages.mrc",
        np.ascontiguousarray(result.averages, dtype=np.float32),
        psize,
        overwrite=True,
    )
    templates = run.job_call(
        "allocating outputs", job.alloc_output, "class_averages", result.n_classes
    )
    mrc_rel = f"{job.uid}/class_averages.mrc"
    for name, values in class_average_fields(result, mrc_rel, psize).items():
        templates[name] = values
    saves: list[tuple[str, Any]] = [("particles", out), ("class_averages", templates)]
    kept: list[int] | None = None
    if run.selection is not None:
        chosen = select_classes(result, run.selection, particles)
        kept = [int(k) for k in np.flatnonzero(chosen.classes)]
        mask = chosen.particles
        for (name, _), m in zip(SELECT_OUTPUTS, (mask, ~mask), strict=True):
            ds = run.job_call("allocating outputs", job.alloc_output, name, inp["uid"][m])
            for f, values in fields.items():
                ds[f] = values[m]
            saves.append((name, ds))
        joblog.line(
            f"Selected {len(kept)} of {result.n_classes} classes ({int(mask.sum())} "
            f"particles): {', '.join(map(str, kept)) or 'none'}"
            + (
                f"; {int(chosen.removed.sum())} outliers of these classes left out"
                if chosen.removed.any()
                else ""
            )  # fmt: skip
        )
    check_outputs(saves, inp["uid"], result.n_classes)
    _save_outputs(run, saves)
    run.job_call("marking the job completed", job.stop)
    return ExternalJobResult(
        url=run.url,
        project_uid=job.project_uid,
        job_uid=job.uid,
        source=source.label,
        n_particles=len(particles),
        n_classes=result.n_classes,
        outputs={k: len(d) for k, d in saves},
        selected_classes=kept,
        summary=summary,
    )


def check_outputs(saves: list[tuple[str, Any]], input_uids: Any, n_classes: int) -> None:
    """Every output checked before the first save, so a save can fail only on the server.

    ``particles`` and the selected/rejected pair hold the input's uids (each once; together
    exactly the input), ``class_averages`` one row per class with ``blob/idx`` 0..K-1, and no
    ``alignments2D``/``blob`` number is NaN. CryoSPARCError naming the output otherwise.
    """
    uids = np.sort(np.asarray(input_uids, dtype=np.uint64))
    by_name = dict(saves)

    def fail(name: str, what: str) -> None:
        raise CryoSPARCError(f"output {name}: {what} — a companion bug; nothing was saved")

    for name, ds in saves:
        for field_name in ds.fields():
            col = np.asarray(ds[field_name])
            if col.dtype.kind == "f" and not np.isfinite(col).all():
                fail(name, f"{field_name} holds NaN or infinite values")
        own = np.sort(np.asarray(ds["uid"], dtype=np.uint64))
        if name == "class_averages":
            idx = np.asarray(ds["blob/idx"])
            if len(ds) != n_classes or not np.array_equal(np.sort(idx), np.arange(n_classes)):
                fail(name, f"{len(ds)} rows with blob/idx not 0..{n_classes - 1}")
            if np.unique(own).size != own.size:
                fail(name, "uids repeat")
        elif name == "particles" and not np.array_equal(own, uids):
            fail(name, f"{len(ds)} rows do not hold the input's {len(uids)} particles")
    if all(name in by_name for name, _ in SELECT_OUTPUTS):
        both = np.sort(np.concatenate([np.asarray(by_name[n]["uid"]) for n, _ in SELECT_OUTPUTS]))
        if not np.array_equal(both.astype(np.uint64), uids):
            fail("particles_selected/rejected", "together they are not the input's particles")


def _save_outputs(run: _Run, saves: list[tuple[str, Any]]) -> None:
    """Save the outputs in order; if the server refuses one, the error (and the job's event
    log) says exactly which outputs were saved before it and which were not."""
    job, where = run.job, f"{run.job.project_uid}-{run.job.uid}"
    done: list[str] = []
    for i, (name, ds) in enumerate(saves):
        try:
            run.job_call(f"saving output {name}", job.save_output, name, ds)
        except CryoSPARCError as exc:
            if not done:
                raise
            left = ", ".join(n for n, _ in saves[i:])
            msg = (
                f"{exc}; {where} keeps the outputs already saved: {', '.join(done)} "
                f"(not saved: {left}) — delete or clear the job before using them"
            )
            run.joblog.line(msg)
            raise CryoSPARCError(msg) from exc
        done.append(f"{name} ({len(ds)})")
    run.joblog.line("Saved outputs: " + ", ".join(done))


def _match_input(particles: ParticleSet, dset: Any, inp: Any, source: Source) -> ParticleSet:
    """The pre-flight ParticleSet in the order of the job's input (CryoSPARC's rows)."""
    pre, now = np.asarray(dset["uid"]), np.asarray(inp["uid"])
    if len(pre) == len(now) and np.array_equal(pre, now):
        return particles
    order = np.argsort(pre)
    pos = np.clip(np.searchsorted(pre, now, sorter=order), 0, len(pre) - 1)
    if len(pre) != len(now) or not np.array_equal(pre[order[pos]], now):
        raise CryoSPARCError(
            f"the input of the new job does not hold the particles of {source.label} "
            f"({len(now)} vs {len(pre)} rows) — was the source job cleared or re-run "
            "meanwhile? Run companion again"
        )
    return particles.subset(order[pos])
