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
    from companion.bench.modes import add_noise_args
    from companion.commands.options import add_n_particles, add_option

    add_n_particles(p, 2000, aliases=())
    add_option(p, "--n-classes", type=int, default=16, help="number of classes K [default: 16]")
    p.add_argument("--box", type=int, default=64, help="box in pixels [default: 64]")
    p.add_argument("--psize", type=float, default=3.0, help="pixel size Å [default: 3]")
    p.add_argument("--snr", type=float, default=0.08, help="simulated SNR [default: 0.08]")
    p.add_argument("--junk", type=float, default=0.12, help="junk fraction [default: 0.12]")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds [default: 0,1,2]")
    add_noise_args(p)
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="cpu")
    p.add_argument("--out", metavar="DIR", default=None, help="keep data and outputs here")
    p.add_argument(
        "--oracle",
        action="store_true",
        help="also score every image with the likelihood ratio of the simulator's true model "
        "(true templates and noise spectrum: the separation of good particles from pure "
        "noise that the data allow), then with the run's class averages taken as the true "
        "signal (companion.simulate.oracle; two scorings, each ~27 s per 2,000 particles at "
        "box 64 on one core)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")


def select_figures(
    class_id: np.ndarray, keep: np.ndarray, is_junk: np.ndarray, chosen: np.ndarray | None = None
) -> dict[str, Any]:
    """Good kept, junk in the selection and the class-level floor for class labels, a
    per-class ``keep`` mask and (optionally) the per-particle selection ``chosen``."""
    k = keep.size
    sel = keep[class_id] if chosen is None else np.asarray(chosen, bool)
    good = ~is_junk
    minority = ~metrics.junk_classes(class_id, is_junk, k)[class_id]
    return {
        "classes_kept": int(keep.sum()),
        "good_kept": float(sel[good].mean()) if good.any() else float("nan"),
        "junk_in_selection": float(is_junk[sel].mean()) if sel.any() else float("nan"),
        "junk_kept": float(sel[is_junk].mean()) if is_junk.any() else float("nan"),
        "class_level_floor": float(is_junk[minority].mean()) if minority.any() else float("nan"),
    }


def run_seed(
    args: argparse.Namespace, seed: int, base: Path, noise: str = "white"
) -> dict[str, Any]:
    from companion.run import run_classification
    from companion.select import select_particles
    from companion.simulate import load_truth, simulate
    from companion.sources import open_particles

    run_dir = base / f"{noise}_seed{seed}"
    data = run_dir / "data"
    simulate(data, args.n_particles, box=args.box, psize=args.psize, snr=args.snr, seed=seed,
             junk_fraction=args.junk, noise=noise, ice_fraction=args.ice_fraction,
             progress=False, formats=("star",))  # fmt: skip
    particles = open_particles(data / "particles.star", None)
    p = ClassifyParams(n_classes=args.n_classes, seed=seed, device=args.device, **SCHEDULE)
    t0 = time.perf_counter()
    out = run_classification(particles, p, run_dir / "classify", select="auto")
    secs = time.perf_counter() - t0
    truth = load_truth(data)
    is_junk = truth["junk"].to_numpy() != ""
    chosen = select_particles(out.result, "auto", particles=particles)
    if int(chosen.particles.sum()) != out.summary["selection"]["n_particles"]:
        raise RuntimeError("bench select: the written selection is not select_particles'")
    labels = np.asarray(out.result.class_id, np.int64)
    whole = select_figures(labels, chosen.classes, is_junk)
    fig = select_figures(labels, chosen.classes, is_junk, chosen.particles)
    if args.out is not None:  # the result, to study the selection again without classifying
        import pickle

        (run_dir / "result.pkl").write_bytes(pickle.dumps(out.result))
    kind = truth["junk"].to_numpy()
    types = sorted(set(kind[is_junk]))
    kept_by_type = {t: float(chosen.particles[kind == t].mean()) for t in types}
    gain = np.asarray(out.result.loglik_gain, np.float64)
    oracle = _oracle_figures(data, out.result.averages, kind) if args.oracle else None
    return {"seed": seed, "noise": noise, "junk_fraction": float(is_junk.mean()),
            "classify_s": secs, "removed": int(chosen.removed.sum()), **fig,
            "junk_kept_by_type": kept_by_type,
            # how well the run's likelihood ratio (vs the empty model) tells a good particle
            # from a pure-noise image, whatever threshold (--oracle: what the data allow)
            "gain_auc_good_vs_noise": metrics.auc(gain[kind == ""], gain[kind == "noise"]),
            "class_level": whole, "oracle": oracle}  # fmt: skip


LOSS = 0.02  # the good particles an oracle threshold may lose


def _oracle_figures(data: Path, averages: np.ndarray, kind: np.ndarray) -> dict[str, Any]:
    """AUC (good vs pure noise) of the oracle likelihood ratio with the true templates and
    with the run's averages, and the pure-noise images each keeps at LOSS of good ones."""
    from companion.simulate.oracle import oracle_loglik_ratio

    out: dict[str, Any] = {}
    for name, templates in (("true", None), ("averages", averages)):
        lr = oracle_loglik_ratio(data, templates)
        good, noise = lr[kind == ""], lr[kind == "noise"]
        out[f"auc_{name}"] = metrics.auc(good, noise)
        out[f"noise_kept_{name}"] = float(np.mean(noise > np.quantile(good, LOSS)))
    return out


def run_select_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    keep_dir = args.out is not None
    base = Path(args.out) if keep_dir else Path(tempfile.mkdtemp(prefix="companion-select-"))
    try:
        rows = [run_seed(args, s, base, noise) for noise in args.noise for s in seeds]
    finally:
        if not keep_dir:
            shutil.rmtree(base, ignore_errors=True)
    return {
        "data": {
            k: getattr(args, k) for k in ("n_particles", "n_classes", "box", "psize", "snr", "junk")
        },  # fmt: skip
        "rows": rows,
    }


def format_select(rep: dict[str, Any]) -> str:
    d = rep["data"]
    lines = [
        f"data: {d['n_particles']} simulated particles per seed, box {d['box']} "
        f"({d['psize']} Å/px), SNR {d['snr']}, {100 * d['junk']:.0f}% junk; K {d['n_classes']}; "
        "--select auto",
        "noise  seed  classes  |  whole classes: good kept  junk in sel  |  + per-particle "
        "stage: removed  good kept  junk in sel  junk kept  |  class-level floor  classify s"
        "  |  kept per junk type  gain AUC",
    ]
    for r in rep["rows"]:
        c = r["class_level"]
        lines.append(
            f"{r['noise'][:5]:<5}  {r['seed']:>4}  {r['classes_kept']:>7}  |  "
            f"{100 * c['good_kept']:24.1f}%  {100 * c['junk_in_selection']:10.2f}%  |  "
            f"{r['removed']:23d}  {100 * r['good_kept']:8.1f}%  "
            f"{100 * r['junk_in_selection']:10.2f}%  {100 * r['junk_kept']:8.1f}%  |  "
            f"{100 * r['class_level_floor']:16.2f}%  {r['classify_s']:10.0f}  |  "
            + " ".join(f"{t} {100 * v:.0f}%" for t, v in r["junk_kept_by_type"].items())
            + f"  {r['gain_auc_good_vs_noise']:.3f}"
        )
    if any(r.get("oracle") for r in rep["rows"]):
        lines.append(f"oracle likelihood ratio (good vs pure noise): AUC, and pure noise kept "
                     f"where {100 * LOSS:.0f}% of good particles are lost")  # fmt: skip
        for r in rep["rows"]:
            o = r["oracle"]
            lines.append(
                f"{r['noise'][:5]:<5}  {r['seed']:>4}  true model {o['auc_true']:.3f} "
                f"({100 * o['noise_kept_true']:.0f}% kept)  run's averages "
                f"{o['auc_averages']:.3f} ({100 * o['noise_kept_averages']:.0f}% kept)  "
                f"run's loglik_gain {r['gain_auc_good_vs_noise']:.3f}"
            )
    lines.append(
        "acceptance (issue 12): good kept >= 95%, junk in selection <= 2%; class-level floor: "
        "the junk fraction of all junk-minority classes, the least any choice of whole classes "
        "can reach; gain AUC: P(a good particle's loglik_gain > a pure-noise image's), the "
        "separation any threshold on the run's likelihood ratio is bound by (--oracle: that "
        "of the true model and of the run's averages)"
    )
    return "\n".join(lines)
