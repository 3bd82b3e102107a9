"""``companion select`` for CryoSPARC-flavour outputs: read ``particles.cs`` (and
``class_averages.cs`` / ``.mrc``, ``summary.json``) into a :class:`~companion.pick.ClassifiedView`,
write the chosen rows as ``particles_selected.cs`` (every field as read, as Select 2D's
``particles_selected`` keeps them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from cryosparc.dataset import Dataset

from companion.cryosparc import conventions as cv
from companion.cryosparc.outputs import (
    AVERAGES_CS_NAME,
    AVERAGES_MRC_NAME,
    PARTICLES_NAME,
    SELECTED_NAME,
)
from companion.errors import InputError
from companion.io.atomic import atomic_path
from companion.pick import ClassifiedView


def find_particles_cs(path: Path) -> Path:
    """``path`` itself (a .cs file) or ``particles.cs`` in the directory ``path``."""
    if path.is_file():
        return path
    cs = path / PARTICLES_NAME
    if not cs.is_file():
        raise InputError(
            f"{path}: no {PARTICLES_NAME} here — give a companion output directory of a "
            "CryoSPARC (.cs) run, or its particles.cs"
        )
    return cs


def read_view(path: Path) -> tuple[ClassifiedView, dict]:
    """The view of the output at ``path`` and what the writer needs (the dataset)."""
    cs = find_particles_cs(path)
    try:
        dset = Dataset.load(cs)
    except Exception as exc:
        raise InputError(f"{cs}: not a CryoSPARC .cs dataset ({exc}) — give particles.cs") from None
    fields = set(dset.fields())
    if "alignments2D/class" not in fields:
        raise InputError(
            f"{cs}: no alignments2D/class field — not a 2D classification result; give the "
            "particles.cs companion wrote"
        )
    class_id = cv.class_from_idx(dset["alignments2D/class"]).astype(np.int64)
    k = int(class_id.max(initial=-1)) + 1
    averages_cs = cs.parent / AVERAGES_CS_NAME
    if averages_cs.is_file():
        k = max(k, len(Dataset.load(averages_cs)))
    summary = _summary(cs.parent)
    scores = summary.get("class_score")
    if scores is not None and len(scores) == k:
        scores = np.asarray(scores, np.float64)
    else:
        scores = None
    averages = None
    mrc = cs.parent / AVERAGES_MRC_NAME
    if mrc.is_file():
        import mrcfile

        with mrcfile.open(mrc, permissive=True) as m:
            averages = np.asarray(m.data, dtype=np.float32).reshape(-1, *m.data.shape[-2:])
        if averages.shape[0] != k:
            averages = None
    ranked = []
    while f"{cv.POSTERIOR_SLOT}/prob_{len(ranked) + 1}" in fields:
        ranked.append(np.asarray(dset[f"{cv.POSTERIOR_SLOT}/prob_{len(ranked) + 1}"], np.float64))
    view = ClassifiedView(
        path=cs,
        host="cryosparc",
        class_base=0,
        n_classes=k,
        class_id=class_id,
        class_prob=_field(dset, fields, "alignments2D/class_posterior"),
        post_prob=np.stack(ranked, axis=1) if ranked else None,
        stability=_field(dset, fields, cv.STABILITY_FIELD),
        class_score=scores,
        averages=averages,
        lowres_power=_field(dset, fields, cv.LOWRES_POWER_FIELD),
        loglik_gain=_field(dset, fields, cv.LOGLIK_GAIN_FIELD),
        columns={
            "posteriors": f"{cv.POSTERIOR_SLOT}/prob_1… fields",
            "assigned": "alignments2D/class_posterior field",
            "stability": f"{cv.STABILITY_FIELD} field",
            "score": f"class_score in {cs.parent / 'summary.json'}",
            "lowres_power": f"{cv.LOWRES_POWER_FIELD} field",
            "loglik_gain": f"{cv.LOGLIK_GAIN_FIELD} field",
        },
    )
    return view, {"dset": dset}


def _field(dset: Dataset, fields: set[str], name: str) -> np.ndarray | None:
    return np.asarray(dset[name], np.float64) if name in fields else None


def _summary(directory: Path) -> dict:
    try:
        return json.loads((directory / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def write_subset(out_dir: Path, state: dict, keep: np.ndarray) -> Path:
    """``out_dir/particles_selected.cs``: the kept rows with every field. Atomic."""
    dset = state["dset"]
    sub = dset.take(np.flatnonzero(keep))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SELECTED_NAME
    with atomic_path(path) as tmp:
        sub.save(str(tmp))
    return path
