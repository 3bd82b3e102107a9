"""``companion bench quality``: how well the classes match the truth of a simulated set.

Simulates a flexible-domain data set with junk (:func:`companion.simulate.simulate`),
classifies it with :func:`companion.run.run_classification` and compares the classes with
the truth: NMI and ARI against true view×state (junk kinds count as their own truth
groups; also over good particles only), junk recall and junk inside good classes, classes
below 10% of the mean size, the largest class fraction, state purity of the flexible
domain, and per class the correlation of its average with the true clean projection of its
majority (view, state) — best over in-plane rotations and shifts, the projection low-pass
filtered to the classification's maximum resolution.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from companion import metrics
from companion.params import ClassifyParams

log = logging.getLogger("companion.bench")


def evaluate(
    labels: np.ndarray,
    truth: Any,
    *,
    n_classes: int,
    averages: np.ndarray | None = None,
    n_views: int | None = None,
    n_states: int | None = None,
    psize: float | None = None,
    max_resolution: float | None = None,
    cap: int | None = None,
) -> dict[str, Any]:
    """Quality figures of class ``labels`` (0-based, one per particle in truth order)
    against the simulator's ``truth`` table (:func:`companion.simulate.load_truth`)."""
    from companion.simulate import true_labels

    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(truth):
        raise ValueError(f"{len(labels)} labels for {len(truth)} truth rows")
    view = truth["view"].to_numpy()
    state = truth["state"].to_numpy()
    is_junk = truth["junk"].to_numpy() != ""
    good = ~is_junk
    n_states = int(state.max()) + 1 if n_states is None else n_states
    n_views = int(view.max()) + 1 if n_views is None else n_views
    tl = true_labels(truth, n_states)
    sizes = metrics.class_sizes(labels, n_classes)
    out: dict[str, Any] = {
        "n_particles": int(len(labels)),
        "n_classes": n_classes,
        "n_junk": int(is_junk.sum()),
        "nmi": metrics.nmi(labels, tl),
        "ari": metrics.ari(labels, tl),
        "nmi_good": metrics.nmi(labels[good], tl[good]),
        "ari_good": metrics.ari(labels[good], tl[good]),
        "junk_recall": metrics.junk_recall(labels, is_junk, n_classes),
        "junk_in_good_classes": metrics.junk_in_good_classes(labels, is_junk, n_classes),
        "junk_classes": int(metrics.junk_classes(labels, is_junk, n_classes).sum()),
        "classes_below_10pct": metrics.small_classes(labels, n_classes, 0.1),
        "empty_classes": int((sizes == 0).sum()),
        "largest_class_fraction": metrics.largest_class_fraction(labels, n_classes),
        "largest_class": int(sizes.max()),
        "cap": cap,
        "cap_respected": cap is None or int(sizes.max()) <= cap,
        "state_purity": metrics.purity(labels, state, good),
        "view_purity": metrics.purity(labels, view, good),
        "classes_per_state": metrics.classes_per_value(labels, state, n_classes, good),
        "class_sizes": sizes.tolist(),
    }
    if averages is not None and psize is not None:
        out.update(
            _correlations(
                labels,
                tl,
                good,
                is_junk,
                averages,
                n_views,
                n_states,
                n_classes,
                psize,
                max_resolution,
            )
        )
    return out


def _correlations(
    labels: np.ndarray,
    tl: np.ndarray,
    good: np.ndarray,
    is_junk: np.ndarray,
    averages: np.ndarray,
    n_views: int,
    n_states: int,
    n_classes: int,
    psize: float,
    max_resolution: float | None,
) -> dict[str, Any]:
    """Per class: best correlation of its average with the projection of its majority
    (view, state) among its good particles; None for junk-majority or empty classes."""
    from companion.simulate import true_projections

    box = averages.shape[-1]
    projections = true_projections(box, n_views, n_states)
    junk_major = metrics.junk_classes(labels, is_junk, n_classes)
    best, share = metrics.majority(labels[good], tl[good], n_classes)
    values = np.unique(tl[good])
    corr: list[float | None] = []
    target: list[str | None] = []
    for k in range(n_classes):
        if junk_major[k] or best[k] < 0:
            corr.append(None)
            target.append("junk" if junk_major[k] else "empty")
            continue
        v, s = divmod(int(values[best[k]]), n_states)
        c = metrics.best_correlation(
            averages[k],
            projections[v, s],
            psi_step=3.0,
            max_shift=max(2, box // 10),
            mask_radius=0.45 * box,
            psize=psize,
            lowpass_A=max_resolution,
        )
        corr.append(round(c, 4))
        target.append(f"view {v} state {s}")
    vals = np.array([c for c in corr if c is not None], dtype=np.float64)
    return {
        "class_correlation": corr,
        "class_truth": target,
        "class_truth_share": [round(float(x), 3) for x in share],
        "correlation_median": float(np.median(vals)) if vals.size else math.nan,
        "correlation_min": float(vals.min()) if vals.size else math.nan,
    }


def run_quality_benchmark(
    *,
    n: int = 10000,
    classes: int = 24,
    box: int = 128,
    psize: float = 1.5,
    snr: float = 0.05,
    seed: int = 0,
    device: str = "auto",
    out_dir: Path | None = None,
    params: dict[str, Any] | None = None,
    noise: str = "white",
    ice_fraction: float = 0.5,
    scale_sd: float = 0.0,
) -> dict[str, Any]:
    """Simulate with truth, classify, evaluate; returns the figures (and machine info).
    ``noise``, ``ice_fraction``, ``scale_sd``: the simulated noise and per-particle
    intensity spread (see :func:`companion.simulate.simulate`)."""
    from companion.bench.speed import machine_info
    from companion.run import run_classification
    from companion.simulate import load_truth, simulate
    from companion.sources import open_particles

    keep = out_dir is not None
    base = Path(out_dir) if keep else Path(tempfile.mkdtemp(prefix="companion-quality-"))
    try:
        data = base / "data"
        t0 = time.perf_counter()
        sim = simulate(data, n, box=box, psize=psize, snr=snr, seed=seed, noise=noise,
                       ice_fraction=ice_fraction, scale_sd=scale_sd, progress=False)  # fmt: skip
        t_sim = time.perf_counter() - t0
        values = {"n_classes": classes, "device": device, "seed": seed, **(params or {})}
        p = ClassifyParams(**values)
        particles = open_particles(data / "particles.star", None)
        t0 = time.perf_counter()
        out = run_classification(particles, p, base / "classify")
        t_cls = time.perf_counter() - t0
        truth = load_truth(data)
        res = out.result
        figures = evaluate(
            res.class_id,
            truth,
            n_classes=res.n_classes,
            averages=res.averages,
            n_views=sim.n_views,
            n_states=sim.n_states,
            psize=particles.pixel_size,
            max_resolution=p.max_resolution,
            cap=res.cap,
        )
        return {
            "machine": machine_info(),
            "data": {
                "n": n,
                "box": box,
                "psize": psize,
                "snr": snr,
                "seed": seed,
                "n_views": sim.n_views,
                "n_states": sim.n_states,
                "junk_fraction": sim.junk_fraction,
                "noise": noise,
                "ice_fraction": sim.ice_fraction,
                "scale_sd": scale_sd,
            },
            "params": p.resolved(),
            "device": res.device,
            "simulate_s": t_sim,
            "classify_s": t_cls,
            "figures": figures,
            "out_dir": str(base) if keep else None,
        }
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def format_figures(f: dict[str, Any]) -> list[str]:
    """The figures as readable lines (shared by bench quality and demo)."""

    def pct(x: float | None) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"

    lines = [
        f"NMI {f['nmi']:.3f}, ARI {f['ari']:.3f} against true view×state (junk kinds as groups); "
        f"good particles only: NMI {f['nmi_good']:.3f}, ARI {f['ari_good']:.3f}",
        f"junk: {f['n_junk']} particles; recall {pct(f['junk_recall'])} in "
        f"{f['junk_classes']} junk-majority classes; junk inside good classes "
        f"{pct(f['junk_in_good_classes'])}",
        f"classes below 10% of the mean size: {f['classes_below_10pct']} of {f['n_classes']} "
        f"({f['empty_classes']} empty); largest class {f['largest_class']} = "
        f"{pct(f['largest_class_fraction'])}"
        + (f" (cap {f['cap']})" if f.get("cap") is not None else ""),
        f"state purity {pct(f['state_purity'])}, view purity {pct(f['view_purity'])}; "
        f"classes per flexible-domain state: "
        + ", ".join(f"{k}: {v}" for k, v in f["classes_per_state"].items() if int(k) >= 0),
    ]
    if "class_correlation" in f:
        cc = f["class_correlation"]
        what = f.get("class_truth", ["-"] * len(cc))
        shown = " ".join(w if c is None else f"{c:.2f}" for c, w in zip(cc, what, strict=True))
        lines.append(
            f"correlation of averages with the true projection: median "
            f"{f['correlation_median']:.3f}, min {f['correlation_min']:.3f}; per class: {shown}"
        )
    return lines


def format_quality(rep: dict[str, Any]) -> str:
    from companion.bench.speed import describe_machine

    d = rep["data"]
    p = rep["params"]
    lines = [
        describe_machine(rep["machine"]),
        f"data: {d['n']} simulated particles, box {d['box']} ({d['psize']} Å/px), SNR "
        f"{d['snr']}, {d['n_views']} views × {d['n_states']} states, "
        f"{100 * d['junk_fraction']:.0f}% junk, {d.get('noise', 'white')} noise (seed "
        f"{d['seed']})",
        f"run: K {p['n_classes']}, anneal {p['anneal']}, balance {p['balance']}, "
        f"{p['online_iters']} online + {p['full_iters']} full iterations on {rep['device']}; "
        f"classified in {rep['classify_s']:.0f} s",
    ]
    return "\n".join(lines + format_figures(rep["figures"]))
