"""``companion bench select``: how clean ``--select auto`` is on simulated data with junk.

Per seed: simulate (gold edges, contamination, pure noise at ``--junk``), classify with
:func:`companion.run.run_classification` and ``select="auto"``, then count against the
truth: the fraction of good particles kept, the junk fraction of the selection, and — the
best any choice of whole classes could do — the junk fraction of the classes where junk is a
minority ("class-level floor"). The acceptance in issue 12 is ≥ 95% good kept and ≤ 2% junk.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from companion import metrics
from companion.params import ClassifyParams

# the demo's size: a few minutes per seed on 2 CPU cores
SCHEDULE = {"online_iters": 12, "batch_per_class": 60, "full_iters": 2, "anneal_iters": 8}


def add_args(p: argparse.ArgumentParser) -> None:
    from companion.commands.options import add_n_particles, add_option

    add_n_particles(p, 2000, aliases=())
    add_option(p, "--n-classes", type=int, default=16, help="number of classes K [default: 16]")
    p.add_argument("--box", type=int, default=64, help="box in pixels [default: 64]")
    p.add_argument("--psize", type=float, default=3.0, help="pixel size Å [default: 3]")
    p.add_argument("--snr", type=float, default=0.08, help="simulated SNR [default: 0.08]")
    p.add_argument("--junk", type=float, default=0.12, help="junk fraction [default: 0.12]")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds [default: 0,1,2]")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="cpu")
    p.add_argument("--out", metavar="DIR", default=None, help="keep data and outputs here")
    p.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")


def select_figures(class_id: np.ndarray, keep: np.ndarray, is_junk: np.ndarray) -> dict[str, Any]:
    """Good kept, junk in the selection and the class-level floor for class labels and a
    per-class ``keep`` mask."""
    k = keep.size
    sel = keep[class_id]
    good = ~is_junk
    minority = ~metrics.junk_classes(class_id, is_junk, k)[class_id]
    return {
        "classes_kept": int(keep.sum()),
        "good_kept": float(sel[good].mean()) if good.any() else float("nan"),
        "junk_in_selection": float(is_junk[sel].mean()) if sel.any() else float("nan"),
        "junk_kept": float(sel[is_junk].mean()) if is_junk.any() else float("nan"),
        "class_level_floor": float(is_junk[minority].mean()) if minority.any() else float("nan"),
    }


def run_seed(args: argparse.Namespace, seed: int, base: Path) -> dict[str, Any]:
    from companion.run import run_classification
    from companion.simulate import load_truth, simulate
    from companion.sources import open_particles

    data = base / f"seed{seed}" / "data"
    simulate(data, args.n_particles, box=args.box, psize=args.psize, snr=args.snr, seed=seed,
             junk_fraction=args.junk, progress=False, formats=("star",))  # fmt: skip
    particles = open_particles(data / "particles.star", None)
    p = ClassifyParams(n_classes=args.n_classes, seed=seed, device=args.device, **SCHEDULE)
    t0 = time.perf_counter()
    out = run_classification(particles, p, base / f"seed{seed}" / "classify", select="auto")
    secs = time.perf_counter() - t0
    truth = load_truth(data)
    is_junk = truth["junk"].to_numpy() != ""
    keep = np.zeros(out.result.n_classes, dtype=bool)
    keep[np.asarray(out.summary["selection"]["classes"], dtype=np.int64) - 1] = True
    fig = select_figures(np.asarray(out.result.class_id, np.int64), keep, is_junk)
    return {"seed": seed, "junk_fraction": float(is_junk.mean()), "classify_s": secs, **fig}


def run_select_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    keep_dir = args.out is not None
    base = Path(args.out) if keep_dir else Path(tempfile.mkdtemp(prefix="companion-select-"))
    try:
        rows = [run_seed(args, s, base) for s in seeds]
    finally:
        if not keep_dir:
            shutil.rmtree(base, ignore_errors=True)
    return {
        "data": {k: getattr(args, k) for k in ("n", "classes", "box", "psize", "snr", "junk")},
        "rows": rows,
    }


def format_select(rep: dict[str, Any]) -> str:
    d = rep["data"]
    lines = [
        f"data: {d['n']} simulated particles per seed, box {d['box']} ({d['psize']} Å/px), "
        f"SNR {d['snr']}, {100 * d['junk']:.0f}% junk; K {d['classes']}; --select auto",
        "seed  classes  good kept  junk in selection  junk kept  class-level floor  classify s",
    ]
    for r in rep["rows"]:
        lines.append(
            f"{r['seed']:>4}  {r['classes_kept']:>7}  {100 * r['good_kept']:8.1f}%  "
            f"{100 * r['junk_in_selection']:16.2f}%  {100 * r['junk_kept']:8.1f}%  "
            f"{100 * r['class_level_floor']:16.2f}%  {r['classify_s']:10.0f}"
        )
    lines.append(
        "acceptance (issue 12): good kept >= 95%, junk in selection <= 2%; class-level floor: "
        "the junk fraction of all junk-minority classes, the least any choice of whole classes "
        "can reach"
    )
    return "\n".join(lines)
