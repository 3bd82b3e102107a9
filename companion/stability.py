"""``--stability R``: how reproducible each particle's class is over R independent runs.

The main run and R-1 more (seeds ``seed + 1009 r``). They share the main run's preprocessed
particles (it keeps its cache when ``--stability`` is on; removed after the runs) and run
one after the other on this device, or side by side on the Dask cluster with ``--cluster``
(one whole run per worker). A particle's stability is the mean, over all pairs of runs, of
the Jaccard index of its class in the one and its class in the other
(:func:`particle_stability`): 1 when every run put it with the same partners. A class's
stability is the mean over its particles. The record also gives, per extra run, the
fraction of particles in the class matched to their main-run class (Hungarian assignment
on co-membership, :func:`match_classes`). With ``--subclassify`` the figure is that of the
main-run classification (the sub-classes are a refinement of it); each flat class reports
the mean over its own particles.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from companion.classify.result import ClassResult
from companion.params import ClassifyParams, without_subclassify
from companion.particles import ParticleSet

log = logging.getLogger("companion.stability")

SEED_STEP = 1009


def match_classes(ref: np.ndarray, other: np.ndarray, k_ref: int, k_other: int) -> np.ndarray:
    """``m`` (k_other,): the class of ``ref`` matched to each class of ``other`` (-1 when
    unmatched), maximising the particles both put together (Hungarian assignment on the
    contingency table)."""
    from scipy.optimize import linear_sum_assignment

    ref, other = np.asarray(ref, np.int64), np.asarray(other, np.int64)
    table = np.bincount(other * k_ref + ref, minlength=k_other * k_ref).reshape(k_other, k_ref)
    rows, cols = linear_sum_assignment(table, maximize=True)
    m = np.full(k_other, -1, np.int64)
    m[rows] = cols
    return m


def particle_stability(runs: list[np.ndarray], n_classes: list[int] | None = None) -> np.ndarray:
    """float32 (N,): per particle, the mean over all pairs of runs of the Jaccard index of
    its class in one run and its class in the other (|both| / |either|): the share of its
    partners that stay its partners, 1 when every run put it with the same partners, near
    0 when its class mates change from run to run (1.0 for fewer than two runs).

    No matching is needed, and a particle is not all-or-nothing: in a class that comes back
    three-quarters the same it scores about 0.75, whereas "landed in the matched class"
    scores the reproducible core and the drifting rest alike (measured, ``bench
    stability``: AUC good vs junk 0.69-0.74 over seeds 0-2, against 0.57-0.60 for the
    matched-class fraction)."""
    labels = [np.asarray(r, np.int64) for r in runs]
    n = len(labels[0])
    if len(labels) < 2:
        return np.ones(n, np.float32)
    ks = n_classes or [int(r.max()) + 1 for r in labels]
    total = np.zeros(n, np.float64)
    pairs = 0
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            a, b, kb = labels[i], labels[j], int(ks[j])
            both = np.bincount(a * kb + b, minlength=int(ks[i]) * kb)[a * kb + b]
            size_a = np.bincount(a, minlength=int(ks[i]))[a]
            size_b = np.bincount(b, minlength=kb)[b]
            total += both / (size_a + size_b - both)
            pairs += 1
    return (total / pairs).astype(np.float32)


def class_means(values: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """float32 (K,): mean of ``values`` over each class's particles (nan when empty)."""
    labels = np.asarray(labels, np.int64)
    s = np.bincount(labels, np.asarray(values, np.float64), k)
    c = np.bincount(labels, minlength=k)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(c > 0, s / np.maximum(c, 1), np.nan).astype(np.float32)


def _extra_params(params: ClassifyParams, r: int) -> ClassifyParams:
    """Run ``r`` (1-based after the main run): another seed, nothing after it."""
    off = {"stability": 0, **without_subclassify()}
    return params.model_copy(update={"seed": int(params.seed) + SEED_STEP * r, **off})


def _one_run(classifier: Any, particles: ParticleSet, params: ClassifyParams,
             work_dir: Path | None, cache_dir: Path | None,
             callbacks: Any = None) -> dict[str, Any]:  # fmt: skip
    """One extra run; what stability needs of it (small: it may come back from a worker)."""
    c0, w0 = time.process_time(), time.perf_counter()
    kw = {} if cache_dir is None else {"cache_dir": cache_dir}
    res = classifier(particles, params, work_dir=work_dir, callbacks=callbacks, **kw)
    if work_dir is not None:  # its checkpoint is of no further use
        shutil.rmtree(work_dir, ignore_errors=True)
    return {"class_id": np.asarray(res.class_id, np.int64), "n_classes": int(res.n_classes),
            "psi_deg": np.asarray(res.psi_deg, np.float32),
            "seconds": time.perf_counter() - w0, "cpu_s": time.process_time() - c0,
            "preprocess_s": float(res.timings.get("preprocess_s", 0.0))}  # fmt: skip


def _on_cluster(classifier: Any, particles: ParticleSet, plist: list[ClassifyParams],
                dirs: list[Path | None], cache: Path | None,
                callbacks: Any) -> list[dict[str, Any]]:  # fmt: skip
    """The extra runs side by side, one whole run per Dask task (each on one worker, the
    E-step in the worker's process): as many at once as the cluster has workers."""
    from distributed import wait

    from companion.classify.callbacks import stop_requested
    from companion.cluster.engine import DaskEngine
    from companion.errors import Aborted

    eng = DaskEngine.start(plist[0])
    try:
        log.info("--stability: %d runs side by side on %d worker(s)", len(plist), eng.workers)
        futs = [eng.client.submit(_one_run, classifier, particles,
                                  p.model_copy(update={"cluster": None}), d, cache,
                                  key=f"stability-run-{i + 2}-{p.seed}", pure=False)
                for i, (p, d) in enumerate(zip(plist, dirs, strict=True))]  # fmt: skip
        while True:
            try:
                wait(futs, timeout=0.5)
                break
            except TimeoutError:
                if stop_requested(callbacks):
                    eng.client.cancel(futs)
                    raise Aborted("stopped during the --stability runs") from None
        return [f.result() for f in futs]
    finally:
        eng.close()


def run_stability(particles: ParticleSet, params: ClassifyParams, main: ClassResult,
                  work_dir: Path | None = None, *, classifier: Any = None,
                  callbacks: Any = None,
                  shared: bool = True) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    """R-1 more runs of ``params`` with other seeds; returns the per-particle stability of
    the ``main`` labels and a record (seeds, seconds, agreement per run).

    ``shared`` (the default): the runs read the main run's preprocessed particles (it keeps
    them when ``params.stability`` >= 2, :func:`companion.classify.em.cache_path`), or, where
    that is gone, the first extra run preprocesses and the others reuse it; False: each run
    preprocesses its own (the same numbers, measured: ``bench stability``). With
    ``params.cluster`` the runs go side by side on the Dask cluster (one run per worker);
    otherwise one after the other on this device (side by side they would only split the
    same cores or GPU).
    """
    if classifier is None:
        from companion.classify import classify as classifier
    from companion.classify.em import cache_path

    r_total = int(params.stability)
    plist = [_extra_params(params, r) for r in range(1, r_total)]
    tmp = None
    if work_dir is None and shared:
        tmp = Path(tempfile.mkdtemp(prefix="companion-stability-"))
    root = Path(work_dir) if work_dir is not None else tmp
    dirs = [None if work_dir is None else Path(work_dir) / f"stability_run{r + 1}"
            for r in range(1, r_total)]  # fmt: skip
    cache = cache_path(root) if shared else None
    try:
        if params.cluster:
            extra = _on_cluster(classifier, particles, plist, dirs, cache, callbacks)
        else:
            extra = []
            for p, d in zip(plist, dirs, strict=True):
                log.info("--stability: run %d of %d (seed %d)", len(extra) + 2, r_total, p.seed)
                extra.append(_one_run(classifier, particles, p, d, cache, callbacks))
    finally:
        if cache is not None:  # the main run kept it for these runs
            shutil.rmtree(cache, ignore_errors=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    k = main.n_classes
    runs = [np.asarray(main.class_id, np.int64)] + [e["class_id"] for e in extra]
    stab = particle_stability(runs, [k] * len(runs))
    agree = [float(np.mean(match_classes(runs[0], r, k, k)[r] == runs[0])) for r in runs[1:]]
    return stab, {"runs": r_total, "seeds": [int(params.seed)] + [p.seed for p in plist],
                  "seconds": [e["seconds"] for e in extra],
                  "cpu_s": [e["cpu_s"] for e in extra],
                  "preprocess_s": [e["preprocess_s"] for e in extra],
                  "shared_preprocessing": bool(shared), "side_by_side": bool(params.cluster),
                  "agreement": agree}  # fmt: skip


def with_stability(result: ClassResult, stab: np.ndarray, record: dict[str, Any]) -> ClassResult:
    """``result`` carrying the per-particle stability, its per-class means and the record."""
    cls = class_means(stab, result.class_id, result.n_classes)
    timings = dict(result.timings) | {"stability_s": float(sum(record["seconds"]))}
    return replace(result, stability=np.asarray(stab, np.float32), class_stability=cls,
                   stability_info=record, timings=timings)  # fmt: skip


def stability_summary(result: ClassResult) -> dict[str, Any] | None:
    """The ``stability`` entry of summary.json, or None."""
    if result.stability is None:
        return None
    rec = result.stability_info or {}
    cls = np.asarray(result.class_stability, np.float64)
    return {
        "definition": "mean over pairs of runs of the Jaccard index of the particle's class "
        "in one run and in the other (the share of its partners that stay its partners)",
        "runs": rec.get("runs"),
        "seeds": rec.get("seeds"),
        "seconds_extra_runs": rec.get("seconds"),
        "agreement_per_run": rec.get("agreement"),
        "mean": float(np.mean(result.stability)),
        "class_stability": [None if not np.isfinite(v) else round(float(v), 4) for v in cls],
    }
