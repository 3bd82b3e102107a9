"""``companion select``: pick particles from a finished companion output, offline.

A host module (:mod:`companion.relion.subset`, :mod:`companion.cryosparc.subset`) reads an
output directory into a :class:`ClassifiedView` (host-neutral arrays) and writes the chosen
rows back in its own format; this module holds the criteria, which are ANDed:

- ``classes``: a class list in the host's numbering (RELION 1-based, CryoSPARC 0-based), or
  ``auto`` — the ``--select auto`` rule of :mod:`companion.select`: the classes of
  :func:`select_auto` judged by their members' written ``lowres_power`` and
  ``loglik_gain``, then its per-particle stage (:func:`~companion.select.particle_outliers`)
  on the same columns, so the same particles as ``classify --select auto``; outputs written
  before companion wrote those are scored from their class averages and assigned-class
  posteriors and keep the classes whole, with a warning;
- ``margin``: the top-1 minus top-2 class posterior (``--posteriors`` ≥ 2 in the run);
- ``min_stability``: the per-particle stability column, where the run wrote one;
- ``min_score``: the class score of the particle's class (``rlnClassScore`` / summary.json).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from companion.errors import InputError, ParameterError

log = logging.getLogger("companion.select")


@dataclass
class ClassifiedView:
    """A companion output as the criteria see it (length N per particle, K per class).

    ``columns`` names, for error messages, the host's column of each optional input
    (``posteriors``, ``assigned``, ``stability``, ``score``, ``lowres_power``,
    ``loglik_gain``); ``notes`` says where values came from (e.g. class scores read from
    summary.json), ``warnings`` what was logged as a warning (both in the summary).
    """

    path: Path
    host: str
    class_base: int
    n_classes: int
    class_id: np.ndarray  # int64, 0-based; -1 unassigned
    class_prob: np.ndarray | None = None  # posterior of the assigned class
    post_prob: np.ndarray | None = None  # (N, P) most probable first
    stability: np.ndarray | None = None
    class_score: np.ndarray | None = None  # (K,)
    averages: np.ndarray | None = None  # (K, box, box)
    lowres_power: np.ndarray | None = None  # the per-particle features of --select auto
    loglik_gain: np.ndarray | None = None  # (companion.select), as written
    columns: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # logged as they arise

    @property
    def n_particles(self) -> int:
        return int(self.class_id.shape[0])

    @property
    def class_sizes(self) -> np.ndarray:
        seen = self.class_id[self.class_id >= 0]
        return np.bincount(seen, minlength=self.n_classes).astype(np.int64)


@dataclass
class Criteria:
    """What to keep (None: no condition)."""

    classes: str | None = None
    margin: float | None = None
    min_stability: float | None = None
    min_score: float | None = None

    def check(self) -> None:
        """ParameterError when nothing is asked for or a bound is out of range."""
        values = (self.classes, self.margin, self.min_stability, self.min_score)
        if all(v is None for v in values):
            raise ParameterError(
                "nothing to select by: give --classes, --margin, --min-stability and/or --min-score"
            )
        for name, v in (("--margin", self.margin), ("--min-stability", self.min_stability)):
            if v is not None and not 0.0 <= v <= 1.0:
                raise ParameterError(f"{name} {v}: give a number between 0 and 1")

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("classes", "margin", "min_stability", "min_score")}


def _need(view: ClassifiedView, values: Any, what: str, option: str, fix: str) -> Any:
    if values is None:
        col = view.columns.get(what, what)
        raise InputError(f"{view.path}: no {col} — {option} needs it; {fix}")
    return values


def class_mask(view: ClassifiedView, spec: str) -> np.ndarray:
    """bool (K,) for ``--classes auto|LIST`` (LIST in the host's numbering)."""
    from companion.select import parse_class_list, select_auto

    if spec.strip().lower() != "auto":
        keep = np.zeros(view.n_classes, dtype=bool)
        keep[parse_class_list(spec, view.n_classes, base=view.class_base, option="--classes")] = 1
        return keep
    both = view.lowres_power is not None and view.loglik_gain is not None
    if both or (view.averages is not None and view.class_prob is not None):
        return np.asarray(select_auto(view), dtype=bool)
    if view.class_score is not None:  # the same rule's stored result
        from companion.select import SELECT_THRESHOLD

        view.notes.append(
            f"--classes auto: class scores as written ({view.columns.get('score', 'scores')}),"
            f" threshold {SELECT_THRESHOLD}"
        )
        return (np.asarray(view.class_score) >= SELECT_THRESHOLD) & (view.class_sizes > 0)
    col = view.columns.get("assigned", "assigned-class posteriors")
    feats = " and ".join(view.columns.get(w, w) for w in ("lowres_power", "loglik_gain"))
    raise InputError(
        f"{view.path}: --classes auto needs {feats}, or the class averages and {col}, or "
        "the class scores — select from a complete companion output directory"
    )


def particle_stage(view: ClassifiedView, chosen: np.ndarray) -> np.ndarray | None:
    """bool (N,): members of the ``chosen`` classes that ``--select auto``'s per-particle
    stage leaves out, from the written features; None (whole classes, one warning naming
    the file) for an output without them."""
    from companion.select import particle_features, particle_outliers

    missing = [view.columns.get(w, w) for w in ("lowres_power", "loglik_gain")
               if getattr(view, w) is None]  # fmt: skip
    if len(missing) == 2:
        text = (
            f"{view.path}: no {' or '.join(missing)} (an output of an older companion) — "
            "--classes auto scores the classes by their averages and keeps them whole, "
            "without the per-particle stage of --select auto; classify again for both"
        )
        log.warning("%s", text)  # once, on stderr; summary["warnings"] for --json
        view.warnings.append(text)
        return None
    # a result without one of them (NaN) is judged on the other, as the run did
    return particle_outliers(view, chosen, particle_features(view))


def margins(view: ClassifiedView) -> np.ndarray:
    """float64 (N,): top-1 minus top-2 class posterior (top-1 when only one class)."""
    post = _need(view, view.post_prob, "posteriors", "--margin",
                 "classify with --posteriors 2 or more")  # fmt: skip
    post = np.asarray(post, dtype=np.float64)
    if post.shape[1] >= 2:
        return post[:, 0] - post[:, 1]
    if view.n_classes == 1:
        return post[:, 0]
    col = view.columns.get("posteriors", "posteriors")
    raise InputError(
        f"{view.path}: only one class posterior per particle ({col}) — --margin needs two: "
        "classify with --posteriors 2 or more"
    )


def pick(view: ClassifiedView, criteria: Criteria) -> tuple[np.ndarray, dict[str, Any]]:
    """bool (N,) rows to keep and a summary (counts per criterion, classes kept)."""
    criteria.check()
    keep = view.class_id >= 0
    counts: dict[str, int] = {"assigned": int(keep.sum())}
    chosen = None
    removed = None
    if criteria.classes is not None:
        chosen = class_mask(view, criteria.classes)
        ok = np.zeros(view.n_particles, dtype=bool)
        ok[keep] = chosen[view.class_id[keep]]
        if criteria.classes.strip().lower() == "auto" and chosen.any():
            drop = particle_stage(view, chosen)
            if drop is not None:
                ok &= ~drop
                removed = np.bincount(view.class_id[drop], minlength=view.n_classes)
        counts["classes"] = int(ok.sum())
        keep &= ok
    if criteria.margin is not None:
        ok = margins(view) >= criteria.margin
        counts["margin"] = int(ok.sum())
        keep &= ok
    if criteria.min_stability is not None:
        stab = _need(view, view.stability, "stability", "--min-stability",
                     "classify with --stability R")  # fmt: skip
        ok = np.asarray(stab, dtype=np.float64) >= criteria.min_stability
        counts["min_stability"] = int(ok.sum())
        keep &= ok
    if criteria.min_score is not None:
        score = _need(view, view.class_score, "score", "--min-score",
                      "select from a complete companion output directory")  # fmt: skip
        per_class = np.asarray(score, dtype=np.float64) >= criteria.min_score
        ok = np.zeros(view.n_particles, dtype=bool)
        assigned = view.class_id >= 0
        ok[assigned] = per_class[view.class_id[assigned]]
        counts["min_score"] = int(ok.sum())
        keep &= ok
    sizes = np.bincount(view.class_id[keep], minlength=view.n_classes)
    summary = {
        "input": str(view.path),
        "host": view.host,
        "criteria": criteria.as_dict(),
        "n_particles": view.n_particles,
        "n_selected": int(keep.sum()),
        "passed": counts,
        "classes_selected": None
        if chosen is None
        else (np.flatnonzero(chosen) + view.class_base).tolist(),
        "outliers_removed": None
        if removed is None
        else {str(int(c) + view.class_base): int(removed[c]) for c in np.flatnonzero(chosen)},
        "selected_per_class": {
            str(int(c) + view.class_base): int(sizes[c]) for c in np.flatnonzero(sizes)
        },
        "notes": list(view.notes),
        "warnings": list(view.warnings),
    }
    return keep, summary
