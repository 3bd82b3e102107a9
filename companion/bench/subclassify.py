"""``companion bench subclassify``: what ``--subclassify`` and ``--stability`` buy, measured.

Per (noise, seed): one simulated flexible-domain set with junk (:func:`companion.simulate.
simulate`: views × flexible-domain states, the last state "domain fell off"). Per K: the main
classification (timed), then ``--subclassify`` on its result (timed separately, so "with"
and "without" share one main run), both scored against the truth:

- state purity (good particles: Σ_k most common state in class k / good particles),
- fell-off recall: the good particles whose domain is missing that sit in classes whose
  majority (good particles) is the missing-domain state, over all of them,
- time ratio (main + sub-classification) / main, wall and process CPU time.

With ``--stability R`` (first K only): R-1 more runs with other seeds, per-particle stability,
and its AUC for good particles vs junk (the probability that a random good particle is more
stable than a random junk one; ties count half).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from companion import metrics
from companion.report import jsonable

log = logging.getLogger("companion.bench")
DEFAULT_TABLE = "bench_subclassify.json"


def add_args(p: argparse.ArgumentParser) -> None:
    """Options of ``companion bench subclassify``."""
    from companion.bench.modes import add_noise_args
    from companion.commands.options import add_n_particles

    add_n_particles(p, 4000, minimum=10)
    p.add_argument("--n-classes", type=int, nargs="+", default=[24, 50], metavar="K",
                   help="numbers of classes K [default: 24 50]")  # fmt: skip
    p.add_argument("--box", type=int, default=48, help="box in pixels [default: 48]")
    p.add_argument("--snr", type=float, default=0.05, help="simulated SNR [default: 0.05]")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="seeds [default: 0]")
    add_noise_args(p)
    p.add_argument("--stability", type=int, default=3, metavar="R",
                   help="runs for the stability AUC at the first K (0: skip) [3]")  # fmt: skip
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--out", metavar="DIR", default=None, help="keep data and runs here")
    p.add_argument("--table", metavar="PATH", default=DEFAULT_TABLE,
                   help=f"write the rows as JSON here [default: ./{DEFAULT_TABLE}]")  # fmt: skip
    p.add_argument("--set", dest="set_params", metavar="NAME=VALUE", action="append",
                   default=[], help="a classification parameter (repeatable)")  # fmt: skip
    p.add_argument("--oracle", action="store_true",
                   help="also the state purity and fell-off recall of the simulator's true "
                   "model: each good particle in the class of its most likely true template "
                   "(companion.simulate.oracle), what the data allow")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")


def oracle_row(data: Path) -> dict[str, float]:
    """State purity and fell-off recall of the true model's classes: every image in the
    class of its most likely true template (ordered templates; junk included, as in a run)."""
    from companion.simulate import load_truth
    from companion.simulate.oracle import oracle_scores

    truth = load_truth(data)
    n_states = int(json.loads((data / "simulation.json").read_text())["n_states"])
    ev = oracle_scores(data).template_evidence
    return _scores(ev.argmax(axis=1), ev.shape[1], truth, n_states)


def fell_off_recall(labels: np.ndarray, state: np.ndarray, good: np.ndarray,
                    off_state: int, n_classes: int) -> float:  # fmt: skip
    """Good particles of ``off_state`` in classes whose good-particle majority is that
    state, over all good particles of that state (nan when there are none)."""
    labels, state, good = np.asarray(labels), np.asarray(state), np.asarray(good, bool)
    off = good & (state == off_state)
    if not off.any():
        return math.nan
    values = np.unique(state[good])
    best, _ = metrics.majority(labels[good], state[good], n_classes)
    off_idx = int(np.flatnonzero(values == off_state)[0])
    return float((best[labels[off]] == off_idx).mean())


def _scores(labels: np.ndarray, k: int, truth: Any, n_states: int) -> dict[str, float]:
    state = truth["state"].to_numpy()
    good = truth["junk"].to_numpy() == ""
    return {
        "state_purity": metrics.purity(labels, state, good),
        "fell_off_recall": fell_off_recall(labels, state, good, n_states - 1, k),
        "n_classes": int(k),
    }


def run_one(data: Path, k: int, seed: int, device: str, extra: dict[str, Any],
            stability: int, work: Path) -> dict[str, Any]:  # fmt: skip
    """One K on one simulated set: main run, sub-classification, optional stability."""
    from companion.bench.stability import stability_scores
    from companion.classify import classify
    from companion.params import validate_params
    from companion.simulate import load_truth
    from companion.sources import open_particles
    from companion.stability import run_stability
    from companion.subclassify import subclassify

    particles = open_particles(data / "particles.star", None)
    truth = load_truth(data)
    sim = json.loads((data / "simulation.json").read_text())
    n_states = int(sim["n_states"])
    p = validate_params({"n_classes": k, "seed": seed, "device": device, **extra,
                         "subclassify": True})  # fmt: skip
    w0, c0 = time.perf_counter(), time.process_time()
    main = classify(particles, p, work_dir=work / f"k{k}_main")
    w_main, c_main = time.perf_counter() - w0, time.process_time() - c0
    w0, c0 = time.perf_counter(), time.process_time()
    flat = subclassify(particles, p, main, work / f"k{k}_sub")
    w_sub, c_sub = time.perf_counter() - w0, time.process_time() - c0
    lin = flat.lineage or {}
    row: dict[str, Any] = {
        "k": k,
        "seed": seed,
        "noise": sim.get("noise", "white"),
        "n": len(particles),
        "without": _scores(main.class_id, main.n_classes, truth, n_states),
        "with": _scores(flat.class_id, flat.n_classes, truth, n_states),
        "split_classes": len(lin.get("split", {})),
        "merges": sum(t["merged"] for t in lin.get("tested", [])),
        "wall_main_s": w_main,
        "wall_sub_s": w_sub,
        "cpu_main_s": c_main,
        "cpu_sub_s": c_sub,
        "wall_ratio": (w_main + w_sub) / w_main,
        "cpu_ratio": (c_main + c_sub) / max(c_main, 1e-9),
        "device": main.device,
    }
    if stability >= 2:
        ps = p.model_copy(update={"stability": stability})
        w0 = time.perf_counter()
        stab, rec = run_stability(particles, ps, main, work / f"k{k}_stab")
        row["stability"] = {
            "runs": stability,
            **stability_scores(stab, truth),
            "extra_wall_s": time.perf_counter() - w0,
            "agreement": rec["agreement"],
        }
    return row


def over_flexible_sets(
    args: argparse.Namespace, prefix: str, rows_of: Any, format_row: Any, name: str
) -> list[dict[str, Any]]:
    """Simulate one flexible-domain set per ``args.noise`` × ``args.seed`` (in ``args.out``,
    else a temporary directory), extend the rows with ``rows_of(data, seed)`` and rewrite
    ``args.table`` after each, so a stopped benchmark keeps what it measured."""
    from companion.simulate import simulate

    keep = args.out is not None
    base = Path(args.out) if keep else Path(tempfile.mkdtemp(prefix=prefix))
    rows: list[dict[str, Any]] = []
    try:
        for noise in args.noise:
            for seed in args.seed:
                data = base / f"{noise}_seed{seed}" / "data"
                simulate(data, args.n_particles, box=args.box, psize=192.0 / args.box,
                         snr=args.snr, seed=seed, noise=noise, ice_fraction=args.ice_fraction,
                         disordered_fraction=0.1, progress=False)  # fmt: skip
                for row in rows_of(data, seed):
                    rows.append(row)
                    log.info("bench %s: %s", name, format_row(row))
                    Path(args.table).write_text(json.dumps(jsonable(rows), indent=2) + "\n")
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    return rows


def run_subclassify_benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    from companion.bench.modes import parse_set

    extra = parse_set(args.set_params)

    def rows_of(data: Path, seed: int) -> Any:
        oracle = oracle_row(data) if args.oracle else None
        for i, k in enumerate(args.n_classes):
            row = run_one(data, k, seed, args.device, extra,
                          args.stability if i == 0 else 0, data.parent)  # fmt: skip
            if oracle is not None:
                row["oracle"] = oracle
            yield row

    return over_flexible_sets(args, "companion-subcls-", rows_of, format_row, "subclassify")


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def format_row(r: dict[str, Any]) -> str:
    s = r.get("stability")
    st = f"{s['auc_good_vs_junk']:.3f}" if s else "-"
    return (
        f"{r['noise']:<8} {r['seed']:>4} {r['k']:>3} {_pct(r['without']['state_purity']):>7} "
        f"{_pct(r['with']['state_purity']):>7} {_pct(r['without']['fell_off_recall']):>7} "
        f"{_pct(r['with']['fell_off_recall']):>7} {r['with']['n_classes']:>4} "
        f"{r['split_classes']:>5} {r['merges']:>6} {r['wall_main_s']:>7.0f} "
        f"{r['wall_ratio']:>6.2f} {r['cpu_ratio']:>6.2f} {st:>6}"
    )


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'noise':<8} {'seed':>4} {'K':>3} {'pur':>7} {'pur+s':>7} {'off':>7} {'off+s':>7} "
        f"{'K+s':>4} {'split':>5} {'merges':>6} {'main s':>7} {'wall×':>6} {'cpu×':>6} "
        f"{'AUC':>6}"
    )
    notes = (
        "pur / pur+s: state purity without / with --subclassify; off / off+s: fell-off recall; "
        "K+s: classes after sub-classification; wall× / cpu×: (main + sub) / main; AUC: "
        "stability, good vs junk"
    )
    lines = [head, *(format_row(r) for r in rows), notes]
    seen = set()
    for r in rows:
        if r.get("oracle") and (r["noise"], r["seed"]) not in seen:
            seen.add((r["noise"], r["seed"]))
            o = r["oracle"]
            lines.append(f"oracle ({r['noise']}, seed {r['seed']}: each particle in its most "
                         f"likely true template's class, {o['n_classes']} classes): state "
                         f"purity {_pct(o['state_purity'])}, fell-off recall "
                         f"{_pct(o['fell_off_recall'])}")  # fmt: skip
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    rows = run_subclassify_benchmark(args)
    if args.json:
        json.dump(jsonable(rows), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(rows))
    return 0
