"""What a person and a script read after a run: PNG gallery, occupancy plot, summary.json.

Every file is written under a temporary name in its directory and renamed into place, so
a reader never sees half a file. Plots use matplotlib's Agg canvas directly (no pyplot, no
display needed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from companion.classify.result import ClassResult
from companion.io.atomic import atomic_path


def jsonable(obj: Any) -> Any:
    """``obj`` with NumPy scalars/arrays, paths and non-finite floats made JSON-safe
    (inf and nan become null)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(jsonable(obj), indent=2) + "\n")
    return Path(path)


def _fmt_res(r: float) -> str:
    return f"{r:.1f} Å" if math.isfinite(r) else "— Å"


def write_gallery(
    path: str | Path,
    averages: np.ndarray,
    class_sizes: np.ndarray,
    resolution_A: np.ndarray,
    *,
    title: str | None = None,
    max_classes: int = 400,
    scores: np.ndarray | None = None,
    selected: np.ndarray | None = None,
    parents: np.ndarray | None = None,
    stability: np.ndarray | None = None,
) -> Path:
    """PNG grid of class averages, largest class first, each labelled with its 1-based
    class number, size, resolution and (given ``scores``) class score (the CryoSPARC/RELION
    display order and labels). Empty classes are drawn as blank tiles marked "empty";
    classes ``selected`` (bool per class) get a green frame, the others a grey one. With
    ``parents`` (--subclassify: 0-based main-run class per class) the sub-classes of a split
    class are drawn together, labelled "c ← parent" with an orange frame; with ``stability``
    (per class, --stability) each label adds it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    averages = np.asarray(averages, dtype=np.float32)
    sizes = np.asarray(class_sizes)
    res = np.asarray(resolution_A, dtype=np.float64)
    k = averages.shape[0]
    order = np.lexsort((np.arange(k), -sizes))[:max_classes]
    split = None
    if parents is not None:  # sub-classes next to each other, families by total size
        parents = np.asarray(parents, np.int64)
        fam = np.bincount(parents, weights=sizes, minlength=int(parents.max()) + 1)
        split = np.bincount(parents, minlength=fam.size)[parents] > 1
        order = np.lexsort((-sizes, parents, -fam[parents]))[:max_classes]
    n = len(order)
    cols = max(1, min(n, int(math.ceil(math.sqrt(n * 1.6)))))
    rows = max(1, int(math.ceil(n / cols)))
    tile = 1.3 if n > 50 else 1.6
    head = 0.55 if title else 0.15  # inches above the first row of labels
    height = rows * tile + head
    fig = Figure(figsize=(cols * tile, height), dpi=100)
    FigureCanvasAgg(fig)
    total = max(int(sizes.sum()), 1)
    for pos, c in enumerate(order):
        ax = fig.add_subplot(rows, cols, pos + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        label = f"{c + 1}: {int(sizes[c])} ({100 * sizes[c] / total:.1f}%)"
        if sizes[c] == 0:
            ax.imshow(np.zeros((2, 2)), cmap="gray", vmin=0, vmax=1)
            ax.text(0.5, 0.5, "empty", color="white", ha="center", va="center",
                    fontsize=7, transform=ax.transAxes)  # fmt: skip
            ax.set_title(f"{c + 1}: empty\n", fontsize=6.5, pad=2)
            continue
        img = averages[c]
        lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0.0, 1.0)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
        second = _fmt_res(res[c])
        if scores is not None:
            second += f", score {float(scores[c]):.2f}"
        if stability is not None and np.isfinite(stability[c]):
            second += f", stab {float(stability[c]):.2f}"
        if split is not None and split[c]:
            label = f"{c + 1} ← {int(parents[c]) + 1}: {int(sizes[c])}"
            for spine in ax.spines.values():
                spine.set_edgecolor("#dd7722")
                spine.set_linewidth(1.5)
        if selected is not None:
            colour = "#22aa44" if selected[c] else "#999999"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.0 if selected[c] else 0.8)
        ax.set_title(f"{label}\n{second}", fontsize=6.5, pad=2)
    if title:
        fig.suptitle(title, fontsize=10)
    top = 1.0 - (head + 0.3) / height
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.05, hspace=0.45)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def write_occupancy(
    path: str | Path,
    class_sizes: np.ndarray,
    *,
    cap: int | None = None,
    history: list[dict[str, Any]] | None = None,
) -> Path:
    """PNG of class sizes (sorted, with the cap and 10%-of-mean lines) and, when the history
    records class sizes per iteration, the occupancy of every class over iterations."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = np.asarray(class_sizes, dtype=np.float64)
    k = sizes.size
    per_iter = _history_sizes(history or [], k)
    fig = Figure(figsize=(10, 7 if per_iter is not None else 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2 if per_iter is not None else 1, 1, 1)
    rank = np.argsort(-sizes, kind="stable")
    ax.bar(np.arange(1, k + 1), sizes[rank], width=1.0, color="#4477aa", edgecolor="white")
    if k <= 60:  # each bar labelled with its 1-based class number
        ax.set_xticks(np.arange(1, k + 1), [str(c + 1) for c in rank], fontsize=6)
    mean = sizes.sum() / max(k, 1)
    ax.axhline(0.1 * mean, color="#cc6677", lw=1, ls="--", label="10% of mean size")
    ax.axhline(mean, color="#999933", lw=1, ls=":", label="mean size")
    if cap is not None:
        ax.axhline(cap, color="#117733", lw=1.2, label=f"cap {cap}")
    n_small = int((sizes < 0.1 * mean).sum())
    ax.set_title(f"class sizes, largest first — {n_small} of {k} below 10% of the mean")
    ax.set_xlabel("class number (largest first)" if k <= 60 else "class rank")
    ax.set_ylabel("particles")
    ax.legend(fontsize=8, loc="upper right")
    if per_iter is not None:
        ax2 = fig.add_subplot(2, 1, 2)
        frac = per_iter / np.maximum(per_iter.sum(axis=1, keepdims=True), 1e-12)
        final_order = np.argsort(-sizes, kind="stable")
        im = ax2.imshow(
            frac[:, final_order].T,
            aspect="auto",
            origin="lower",
            cmap="viridis",
            extent=(0.5, len(frac) + 0.5, 0.5, k + 0.5),
        )
        ax2.set_xlabel("iteration")
        ax2.set_ylabel("class (final rank)")
        ax2.set_title("class occupancy per iteration")
        fig.colorbar(im, ax=ax2, label="fraction of particles")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _history_sizes(history: list[dict[str, Any]], k: int) -> np.ndarray | None:
    rows = []
    for h in history:
        v = h.get("class_sizes", h.get("class_distribution"))
        if v is None or len(v) != k:
            continue
        rows.append(np.asarray(v, dtype=np.float64))
    return np.stack(rows) if len(rows) >= 2 else None


def build_summary(
    result: ClassResult,
    *,
    files: Mapping[str, Any],
    n_particles: int,
    source: str | Path | None = None,
    host: str | None = None,
    timings: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    selection: Mapping[str, Any] | None = None,
    class_features: Any = None,
) -> dict[str, Any]:
    """The run summary: file paths, class sizes, resolutions and scores, cap, params, timings.

    ``params`` (the resolved parameters) is used when the result does not carry them;
    ``selection`` records a ``--select``: :meth:`companion.select.Selection.report`, or
    ``{"spec", "classes": bool per class}`` for whole classes; ``class_features``:
    :func:`companion.select.class_features` of ``result`` when already computed."""
    from companion.select import class_features as features_of
    from companion.select import scores_from_features
    from companion.stability import stability_summary
    from companion.subclassify import lineage_summary

    features = features_of(result) if class_features is None else class_features
    scores = scores_from_features(features)
    sel = None
    if selection is not None and "n_particles" in selection:
        sel = dict(selection)
    elif selection is not None:
        keep = np.asarray(selection["classes"], dtype=bool)
        chosen = keep[np.asarray(result.class_id)]
        sel = {
            "spec": selection["spec"],
            "classes": (np.flatnonzero(keep) + 1).tolist(),
            "n_particles": int(chosen.sum()),
        }
    sizes = np.asarray(result.class_sizes, dtype=np.int64)
    k = int(sizes.size)
    mean = n_particles / max(k, 1)
    largest = int(sizes.max()) if k else 0
    res = np.asarray(result.resolution_A, dtype=np.float64)
    all_timings = dict(result.timings)
    all_timings.update(timings or {})
    from companion import __version__

    return jsonable(
        {
            "companion_version": __version__,
            "input": source,
            "host": host,
            "n_particles": n_particles,
            "n_classes": k,
            "files": {name: str(p) for name, p in files.items()},
            "class_sizes": sizes,
            "class_distribution": np.asarray(result.class_distribution, dtype=np.float64),
            "resolution_A": res,
            "best_resolution_A": float(res[np.isfinite(res)].min())
            if np.isfinite(res).any()
            else None,
            "class_score": scores,
            "class_features": features.as_dict(),
            "selection": sel,
            "cap": result.cap,
            "largest_class": largest,
            "largest_class_number": int(sizes.argmax()) + 1 if k else None,
            "largest_class_fraction": largest / n_particles if n_particles else None,
            "cap_respected": result.cap is None or largest <= result.cap,
            "classes_below_10pct_of_mean": int((sizes < 0.1 * mean).sum()),
            "empty_classes": int((sizes == 0).sum()),
            "iterations": result.iteration,
            "n_iterations": result.n_iterations,
            "work_box": result.work_box,
            "work_psize_A": result.work_psize,
            "current_resolution_A": result.current_resolution_A,
            "loglik_total": result.loglik_total,
            "avg_pmax": result.avg_pmax,
            "sigma_offsets_A": result.sigma_offsets_A,
            "params": result.params or dict(params or {}),
            "device": result.device,
            "timings": all_timings,
            "history": result.history,
            "subclassify": lineage_summary(result),
            "stability": stability_summary(result),
        }
    )
