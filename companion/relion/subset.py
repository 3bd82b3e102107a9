"""``companion select`` for RELION-flavour outputs: read ``{root}_itNNN_data.star`` (and its
model and classes stack) into a :class:`~companion.pick.ClassifiedView`, write the chosen rows
as Subset selection writes them (``particles.star``: the optics table and the chosen
particle rows with every column as read, ``rlnGroupNumber`` renumbered for the subset)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from companion.errors import InputError
from companion.pick import ClassifiedView
from companion.relion.class2d import (
    ASSIGNED_POSTERIOR,
    LOGLIK_GAIN,
    LOWRES_POWER,
    POSTERIOR_LABELS,
    STABILITY,
)
from companion.relion.star import parse_star, write_star

SELECTED_NAME = "particles.star"
_DATA = re.compile(r"^(?P<root>.+)_it(?P<it>\d{3,})_data\.star$")


def find_data_star(path: Path) -> Path:
    """The data file of a RELION-flavour output: ``path`` itself, or the last iteration's
    ``*_itNNN_data.star`` in the directory ``path`` (root ``run`` first)."""
    if path.is_file():
        return path
    found = [(m.group("root") != "run", -int(m.group("it")), p) for p in path.glob("*_data.star")
             if (m := _DATA.match(p.name))]  # fmt: skip
    if not found:
        raise InputError(
            f"{path}: no *_itNNN_data.star here — give a companion output directory of a "
            "RELION (.star) run, or the data file itself"
        )
    return sorted(found)[0][2]


def read_view(path: Path) -> tuple[ClassifiedView, dict]:
    """The view of the output at ``path`` and what the writer needs (the parsed tables)."""
    data = find_data_star(path)
    star = parse_star(data)
    particles = star.blocks.get("particles")
    if not isinstance(particles, pd.DataFrame):
        raise InputError(
            f"{data}: no data_particles table — give a run_itNNN_data.star written by companion"
        )
    if "rlnClassNumber" not in particles.columns:
        raise InputError(
            f"{data}: no rlnClassNumber column — not a 2D classification result; give a "
            "run_itNNN_data.star written by companion"
        )
    labels = pd.to_numeric(particles["rlnClassNumber"], errors="coerce").fillna(0)
    class_id = labels.to_numpy(np.int64) - 1
    base = data.name.removesuffix("_data.star")
    model_path = data.with_name(f"{base}_model.star")
    scores, k, averages = None, int(class_id.max(initial=-1)) + 1, None
    columns = {
        "posteriors": f"{POSTERIOR_LABELS[1].format(1)}… columns",
        "assigned": f"{ASSIGNED_POSTERIOR} column",
        "stability": f"{STABILITY} column",
        "score": f"rlnClassScore in {model_path.name}",
        "lowres_power": f"{LOWRES_POWER} column",
        "loglik_gain": f"{LOGLIK_GAIN} column",
    }
    if model_path.is_file():
        model = parse_star(model_path).blocks
        general, classes = model.get("model_general"), model.get("model_classes")
        if isinstance(general, dict) and "rlnNrClasses" in general:
            k = max(k, int(general["rlnNrClasses"]))
        if isinstance(classes, pd.DataFrame) and "rlnClassScore" in classes.columns:
            scores = classes["rlnClassScore"].to_numpy(np.float64)
    if scores is None:
        scores = _summary_scores(data.parent, k)
        if scores is not None:
            columns["score"] = "class_score in summary.json"
    classes_path = data.with_name(f"{base}_classes.mrcs")
    if classes_path.is_file():
        import mrcfile

        with mrcfile.open(classes_path, permissive=True) as m:
            averages = np.asarray(m.data, dtype=np.float32).reshape(-1, *m.data.shape[-2:])
        if averages.shape[0] != k:
            averages = None
    view = ClassifiedView(
        path=data,
        host="relion",
        class_base=1,
        n_classes=k,
        class_id=class_id,
        class_prob=_column(particles, ASSIGNED_POSTERIOR),
        post_prob=_ranked(particles, POSTERIOR_LABELS[1]),
        stability=_column(particles, STABILITY),
        class_score=scores,
        averages=averages,
        lowres_power=_column(particles, LOWRES_POWER),
        loglik_gain=_column(particles, LOGLIK_GAIN),
        columns=columns,
    )
    return view, {"star": star, "data": data}


def _column(df: pd.DataFrame, name: str) -> np.ndarray | None:
    if name not in df.columns:
        return None
    return pd.to_numeric(df[name], errors="coerce").to_numpy(np.float64)


def _ranked(df: pd.DataFrame, pattern: str) -> np.ndarray | None:
    cols = []
    while pattern.format(len(cols) + 1) in df.columns:
        cols.append(_column(df, pattern.format(len(cols) + 1)))
    return np.stack(cols, axis=1) if cols else None


def _summary_scores(directory: Path, k: int) -> np.ndarray | None:
    try:
        scores = json.loads((directory / "summary.json").read_text()).get("class_score")
    except (OSError, ValueError):
        return None
    return np.asarray(scores, np.float64) if scores is not None and len(scores) == k else None


def write_subset(out_dir: Path, state: dict, keep: np.ndarray) -> Path:
    """``out_dir/particles.star``: the optics table and the kept particle rows (every column
    as read; ``rlnGroupNumber`` renumbered 1.. in order of first appearance, as RELION
    numbers the groups of the file it reads). Atomic."""
    star = state["star"]
    table = star.blocks["particles"].iloc[np.flatnonzero(keep)].reset_index(drop=True)
    if "rlnGroupNumber" in table.columns and len(table):
        codes, _ = pd.factorize(table["rlnGroupNumber"])
        table["rlnGroupNumber"] = codes.astype(np.int64) + 1
    blocks = {}
    if "optics" in star.blocks:
        blocks["optics"] = star.blocks["optics"]
    blocks["particles"] = table
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SELECTED_NAME
    write_star(path, blocks, star.version or "30001")
    return path
