"""``companion bench stability``: does ``--stability R`` rank junk below good particles, and
what does it cost.

Per (noise, seed): one simulated set (:func:`companion.simulate.simulate`: views × states,
15% junk, 10% of the good particles disordered). The main run (timed), then R-1 more with
the shared preprocessing (timed) and, with ``--per-run``, again with each run preprocessing
its own (the old path: same stability, more CPU). Scored against the truth: the AUC of the
stability of good (ordered) particles against junk (also per junk kind) and against the
disordered ones (the probability that a random good particle is more stable; ties half),
and the cost: CPU seconds of (main + extra runs) / main.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from companion.report import jsonable

log = logging.getLogger("companion.bench")
DEFAULT_TABLE = "bench_stability.json"


def add_args(p: argparse.ArgumentParser) -> None:
    """Options of ``companion bench stability``."""
    from companion.bench.modes import add_noise_args
    from companion.commands.options import add_n_particles

    add_n_particles(p, 2000, minimum=10)
    p.add_argument("--n-classes", type=int, default=12, metavar="K", help="K [default: 12]")
    p.add_argument("--box", type=int, default=48, help="box in pixels [default: 48]")
    p.add_argument("--snr", type=float, default=0.05, help="simulated SNR [default: 0.05]")
    p.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds [default: 0 1 2]")  # fmt: skip
    add_noise_args(p)
    p.add_argument("--stability", type=int, default=3, metavar="R", help="runs in all [3]")
    p.add_argument(
        "--per-run",
        action="store_true",
        help="also run the old path (each run preprocesses its own) and compare",
    )
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--out", metavar="DIR", default=None, help="keep data and runs here")
    p.add_argument("--table", metavar="PATH", default=DEFAULT_TABLE,
                   help=f"write the rows as JSON here [default: ./{DEFAULT_TABLE}]")  # fmt: skip
    p.add_argument("--set", dest="set_params", metavar="NAME=VALUE", action="append",
                   default=[], help="a classification parameter (repeatable)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")


def stability_scores(stab: np.ndarray, truth: Any) -> dict[str, float]:
    """AUC of ``stab`` for good (ordered) particles vs junk, per junk kind, vs disordered."""
    from companion.metrics import auc

    kind = truth["junk"].to_numpy()
    junk = kind != ""
    dis = truth["disordered"].to_numpy() == 1
    good = ~junk & ~dis
    out = {"auc_good_vs_junk": auc(stab[good], stab[junk]),
           "auc_good_vs_disordered": auc(stab[good], stab[dis]) if dis.any() else math.nan,
           "mean_good": float(stab[good].mean()),
           "mean_junk": float(stab[junk].mean()) if junk.any() else math.nan}  # fmt: skip
    for k in sorted(set(kind[junk].tolist())):
        out[f"auc_good_vs_{k}"] = auc(stab[good], stab[kind == k])
    return out


def run_one(data: Path, k: int, seed: int, device: str, extra: dict[str, Any], r: int,
            per_run: bool, work: Path) -> dict[str, Any]:  # fmt: skip
    """Main run, R-1 more (shared preprocessing; optionally the per-run path), scores."""
    from companion.classify import classify
    from companion.params import validate_params
    from companion.simulate import load_truth
    from companion.sources import open_particles
    from companion.stability import run_stability

    particles = open_particles(data / "particles.star", None)
    truth = load_truth(data)
    p = validate_params({"n_classes": k, "seed": seed, "device": device, **extra,
                         "stability": r})  # fmt: skip
    c0, w0 = time.process_time(), time.perf_counter()
    main = classify(particles, p, work_dir=work / "main")
    cpu_main, wall_main = time.process_time() - c0, time.perf_counter() - w0
    c0 = time.process_time()
    stab, rec = run_stability(particles, p, main, work / "main")
    cpu_extra = time.process_time() - c0
    row: dict[str, Any] = {
        "seed": seed, "k": k, "n": len(particles), "runs": r,
        "noise": json.loads((data / "simulation.json").read_text()).get("noise", "white"),
        **stability_scores(stab, truth),
        "agreement": rec["agreement"],
        "cpu_main_s": cpu_main, "wall_main_s": wall_main,
        "preprocess_main_s": float(main.timings.get("preprocess_s", 0.0)),
        "cpu_extra_s": cpu_extra, "cpu_ratio": (cpu_main + cpu_extra) / max(cpu_main, 1e-9),
        "device": main.device,
    }  # fmt: skip
    if per_run:
        c0 = time.process_time()
        old, rec_old = run_stability(particles, p, main, work / "per_run", shared=False)
        row["cpu_extra_per_run_s"] = time.process_time() - c0
        row["cpu_ratio_per_run"] = (cpu_main + row["cpu_extra_per_run_s"]) / max(cpu_main, 1e-9)
        row["preprocess_per_run_s"] = rec_old["preprocess_s"]
        row["per_run_same_stability"] = bool(np.array_equal(old, stab))
    return row


def run_stability_benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    from companion.bench.modes import parse_set
    from companion.bench.subclassify import over_flexible_sets

    extra = parse_set(args.set_params)

    def rows_of(data: Path, seed: int) -> Any:
        yield run_one(data, args.n_classes, seed, args.device, extra, args.stability,
                      args.per_run, data.parent)  # fmt: skip

    return over_flexible_sets(args, "companion-stab-", rows_of, format_row, "stability")


def format_row(r: dict[str, Any]) -> str:
    per = r.get("cpu_ratio_per_run")
    return (
        f"{r['noise']:<8} {r['seed']:>4} {r['n']:>6} {r['k']:>3} {r['runs']:>2} "
        f"{r['auc_good_vs_junk']:>6.3f} {r['auc_good_vs_disordered']:>6.3f} "
        f"{r['mean_good']:>6.3f} {r['mean_junk']:>6.3f} {r['cpu_main_s']:>7.1f} "
        f"{r['cpu_ratio']:>6.2f} {'-' if per is None else f'{per:.2f}':>6}"
    )


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'noise':<8} {'seed':>4} {'N':>6} {'K':>3} {'R':>2} {'junk':>6} {'disord':>6} "
        f"{'good':>6} {'junkm':>6} {'main s':>7} {'cpu×':>6} {'old×':>6}"
    )
    aucs = [r["auc_good_vs_junk"] for r in rows]
    notes = (
        "junk / disord: AUC of stability, good vs junk / vs disordered; good / junkm: mean "
        "stability; main s: CPU s of the main run; cpu× / old×: CPU (main + R-1 runs) / main, "
        "shared preprocessing / each run its own (--per-run)"
        + (
            f"\nAUC good vs junk over {len(aucs)} rows: {min(aucs):.3f}-{max(aucs):.3f}"
            if aucs
            else ""
        )  # fmt: skip
    )
    return "\n".join([head, *(format_row(r) for r in rows), notes])


def main(args: argparse.Namespace) -> int:
    rows = run_stability_benchmark(args)
    if args.json:
        json.dump(jsonable(rows), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(rows))
    return 0
