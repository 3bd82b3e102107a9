"""``companion bench modes``: what annealing-off and balanced classes do, measured.

Simulates one flexible-domain data set with junk and known truth
(:func:`companion.simulate.simulate`: a rigid domain in a few views, a flexible domain in
several states, the last one missing, and gold-edge / contamination / noise junk), then
classifies the same particles in four modes for each K:

- ``default``: CryoSPARC-like annealing (uncertainty factor decays to 1, noise model
  re-estimated),
- ``anneal-off``: uncertainty and noise model held at their initial values, class priors
  uniform,
- ``balanced``: ``--balance equal`` (cap = ceil(N / K); uniform priors; Sinkhorn-capped
  E-steps and a capped final assignment),
- ``balanced+anneal-off``: both.

Per mode and K it reports classes below 10% of the mean size, the largest class fraction,
NMI / ARI against true view×state (junk kinds as their own groups), the state purity of the
flexible domain and the number of classes each state is the majority of, junk recall and
the junk fraction inside good classes, the wall time, and the largest class against the cap.
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

from companion.params import ClassifyParams, validate_params

log = logging.getLogger("companion.bench")

MODES: dict[str, dict[str, Any]] = {
    "default": {},
    "anneal-off": {"anneal": "off"},
    "balanced": {"balance": "equal"},
    "balanced+anneal-off": {"balance": "equal", "anneal": "off"},
}
DEFAULT_TABLE = "bench_modes.json"


def add_args(p: argparse.ArgumentParser) -> None:
    """Options of ``companion bench modes``."""
    from companion.commands.options import add_n_particles, add_option

    add_n_particles(p, 10000, minimum=10)
    add_option(p, "--n-classes", aliases=("--classes",), type=int, nargs="+", default=[24, 50],
               metavar="K", help="numbers of classes K [default: 24 50]")  # fmt: skip
    p.add_argument("--box", type=int, default=64, help="box in pixels [default: 64]")
    p.add_argument("--snr", type=float, default=0.05, help="simulated SNR [default: 0.05]")
    p.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="simulation and run seeds; several give one table per seed plus medians [default: 0]",
    )
    add_noise_args(p)
    p.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        help="modes to run [default: all four]",
    )
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run the (noise, seed, mode) cells in N processes at once, each holding its "
        "BLAS/FFT threads to cores / N (CPU; same figures, less wall time) [default: 1]",
    )
    p.add_argument(
        "--out", metavar="DIR", default=None, help="keep data and outputs here [default: none]"
    )
    p.add_argument(
        "--table",
        metavar="PATH",
        default=DEFAULT_TABLE,
        help=f"write the table as JSON here [default: ./{DEFAULT_TABLE}]",
    )
    p.add_argument(
        "--set",
        dest="set_params",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="a classification parameter for every mode (repeatable), as named in companion "
        "classify --help without the dashes, e.g. --set noise_model=white; the modes' own "
        "settings (anneal, balance) win",
    )
    p.add_argument("--json", action="store_true", help="print the table as JSON on stdout")


def add_noise_args(p: argparse.ArgumentParser) -> None:
    """``--noise white|coloured`` (+ ``--ice-fraction``) of the simulated set (bench quality
    and bench modes)."""
    p.add_argument(
        "--noise",
        nargs="+",
        choices=["white", "coloured"],
        default=["white"],
        help="simulated noise: white, or coloured (MTF detector noise + CTF-modulated ice; "
        "see companion simulate --help); several: one run each [default: white]",
    )
    p.add_argument(
        "--ice-fraction",
        type=float,
        default=0.5,
        help="coloured noise: fraction of the noise variance from ice [default: 0.5]",
    )


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["noise_model=white", "online_iters=10"]`` → a dict (values validated later by
    ClassifyParams); a malformed item or an unknown name is a one-line ParameterError."""
    from companion.errors import ParameterError

    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not sep or not name:
            raise ParameterError(f"--set {item!r}: expected NAME=VALUE, e.g. noise_model=white")
        if name not in ClassifyParams.model_fields:
            raise ParameterError(
                f"--set {item!r}: no classification parameter {name!r} (see companion "
                "classify --help)"
            )
        out[name] = value.strip()
    return out


def run_modes_benchmark(
    out_dir: str | Path | argparse.Namespace | None = None,
    n: int = 10000,
    k_values: tuple[int, ...] = (24, 50),
    seed: int = 0,
    *,
    box: int = 64,
    snr: float = 0.05,
    device: str = "auto",
    modes: tuple[str, ...] | list[str] | None = None,
    params: dict[str, Any] | None = None,
    noise: str = "white",
    ice_fraction: float = 0.5,
) -> Any:
    """Simulate once, classify in every mode for every K; one dict per (K, mode).

    ``out_dir``: keep the simulated data there (``data/``); None = a temporary directory.
    ``params``: extra classification parameters applied to every mode (e.g. a shorter
    schedule for tests). ``noise``, ``ice_fraction``: the simulated noise (see
    :func:`companion.simulate.simulate`). Called by ``companion bench modes`` with its
    parsed options.
    """
    if isinstance(out_dir, argparse.Namespace):
        return _cli(out_dir)
    from companion.bench.quality import evaluate
    from companion.classify import classify
    from companion.simulate import load_truth, simulate
    from companion.sources import open_particles

    names = list(modes or MODES)
    keep = out_dir is not None
    base = Path(out_dir) if keep else Path(tempfile.mkdtemp(prefix="companion-modes-"))
    try:
        data = base / "data"
        for k in k_values:  # every bad combination fails before any work
            for name in names:
                _params(name, k, seed, device, params).check_feasible(n)
        sim = simulate(data, n, box=box, psize=192.0 / box, snr=snr, seed=seed, noise=noise,
                       ice_fraction=ice_fraction, progress=False)  # fmt: skip
        info = {"n": n, "box": box, "psize": 192.0 / box, "snr": snr, "seed": seed,
                "n_views": sim.n_views, "n_states": sim.n_states,
                "junk_fraction": sim.junk_fraction, "noise": noise,
                "set": dict(params or {})}  # fmt: skip
        particles = open_particles(data / "particles.star", None)
        truth = load_truth(data)
        rows = []
        for k in k_values:
            for name in names:
                p = _params(name, k, seed, device, params)
                log.info("bench modes: %s, K %d, %d particles", name, k, n)
                t0 = time.perf_counter()
                res = classify(particles, p)
                wall = time.perf_counter() - t0
                f = evaluate(
                    res.class_id, truth, n_classes=k, n_views=sim.n_views,
                    n_states=sim.n_states, cap=res.cap,
                )  # fmt: skip
                rows.append(_row(name, k, p, res, f, wall) | {"data": info})
                log.info("bench modes: %s", format_row(rows[-1]))
        return rows
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def run_modes_cells(
    seeds: list[int] | tuple[int, ...],
    *,
    noises: list[str] | tuple[str, ...] = ("white",),
    modes: list[str] | tuple[str, ...] | None = None,
    jobs: int = 1,
    threads: int | None = None,
    out_dir: str | Path | None = None,
    **kw: Any,
) -> list[dict[str, Any]]:
    """:func:`run_modes_benchmark` for every (noise, seed, mode) cell, ``jobs`` processes at
    a time (``spawn``), each holding its BLAS/FFT pools to ``threads`` (default: cores / jobs
    with several jobs, unlimited with one); rows in (noise, seed, K, mode) order.
    A cell simulates its seed's data itself (deterministic from the seed). ``kw``: the other
    arguments of :func:`run_modes_benchmark` (n, k_values, box, snr, device, params,
    ice_fraction). ``out_dir``: keep each cell's data in ``out_dir/NOISE_seedS`` (one job) or
    ``out_dir/NOISE_seedS_MODE``."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from companion.threads import available_cores

    names = list(modes or MODES)
    # one process per mode; in one process the modes share the simulated data
    groups = [(name,) for name in names] if jobs > 1 else [tuple(names)]
    cells = [(noise, seed, g) for noise in noises for seed in seeds for g in groups]
    dirs = [None if out_dir is None else
            str(Path(out_dir) / "_".join([c[0], f"seed{c[1]}"] + ([c[2][0]] if jobs > 1 else [])))
            for c in cells]  # fmt: skip
    jobs = max(1, min(int(jobs), len(cells)))
    if threads is None and jobs > 1:
        threads = max(1, available_cores() // jobs)
    args = [(c, d, threads, kw) for c, d in zip(cells, dirs, strict=True)]
    if jobs == 1:
        results = [_cell(*a) for a in args]
    else:  # the workers do not log: each finished cell is logged here
        from concurrent.futures import as_completed

        results: list[Any] = [None] * len(args)
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_cell, *a): i for i, a in enumerate(args)}
            for done, fut in enumerate(as_completed(futures), 1):
                results[futures[fut]] = fut.result()
                for row in results[futures[fut]]:
                    log.info("bench modes: cell %d of %d: %s", done, len(args), format_row(row))
    order = {name: i for i, name in enumerate(names)}
    rows = [r for rs in results for r in rs]
    key = {(n, s): i for i, (n, s, _) in enumerate(cells)}
    return sorted(rows, key=lambda r: (key[(r["data"]["noise"], r["data"]["seed"])],
                                       r["k"], order[r["mode"]]))  # fmt: skip


def _cell(cell: tuple[str, int, tuple[str, ...]], out_dir: str | None, threads: int | None,
          kw: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    from contextlib import nullcontext

    from companion.threads import limit_threads

    noise, seed, names = cell
    with limit_threads(threads) if threads else nullcontext():
        return run_modes_benchmark(out_dir, seed=seed, modes=list(names), noise=noise, **kw)


def _params(name: str, k: int, seed: int, device: str, extra: dict[str, Any] | None) -> Any:
    values = {"n_classes": k, "seed": seed, "device": device, **(extra or {}), **MODES[name]}
    return validate_params(values, ClassifyParams)


def _row(name: str, k: int, p: Any, res: Any, f: dict[str, Any], wall: float) -> dict[str, Any]:
    return {
        "mode": name,
        "k": k,
        "n": f["n_particles"],
        "classes_below_10pct": f["classes_below_10pct"],
        "empty_classes": f["empty_classes"],
        "largest_class_fraction": f["largest_class_fraction"],
        "largest_class": f["largest_class"],
        "cap": f["cap"],
        "cap_respected": f["cap_respected"],
        "nmi": f["nmi"],
        "ari": f["ari"],
        "nmi_good": f["nmi_good"],
        "ari_good": f["ari_good"],
        "state_purity": f["state_purity"],
        "view_purity": f["view_purity"],
        "classes_per_state": f["classes_per_state"],
        "junk_recall": f["junk_recall"],
        "junk_in_good_classes": f["junk_in_good_classes"],
        "junk_classes": f["junk_classes"],
        "wall_s": wall,
        "device": res.device,
        "params": p.resolved(),
    }


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def format_row(r: dict[str, Any]) -> str:
    cap = f"{r['largest_class']}/{r['cap']}" if r["cap"] is not None else f"{r['largest_class']}/-"
    states = " ".join(f"{v}" for s, v in r["classes_per_state"].items() if int(s) >= 0)
    return (
        f"{r['mode']:<20} {r['data']['noise'][:5]:<5} {r['data']['seed']:>4} {r['k']:>3} "
        f"{r['classes_below_10pct']:>6} "
        f"{_fmt(r['largest_class_fraction'], True):>7} {_fmt(r['nmi']):>6} {_fmt(r['ari']):>6} "
        f"{_fmt(r['state_purity'], True):>7} {states:>10} {_fmt(r['junk_recall'], True):>7} "
        f"{_fmt(r['junk_in_good_classes'], True):>8} {r['wall_s']:>7.0f} {cap:>11}"
    )


def format_modes(rows: list[dict[str, Any]]) -> str:
    """One line per (K, mode)."""
    head = (
        f"{'mode':<20} {'noise':<5} {'seed':>4} {'K':>3} {'<10%':>6} {'largest':>7} "
        f"{'NMI':>6} {'ARI':>6} "
        f"{'st.pur':>7} {'cls/state':>10} {'jk.rec':>7} {'jk.good':>8} {'wall s':>7} "
        f"{'max/cap':>11}"
    )
    lines = [head] + [format_row(r) for r in rows]
    if rows:
        d = rows[0]["data"]
        lines.append(
            f"data: {d['n']} simulated particles, box {d['box']} ({d['psize']:.2f} Å/px), SNR "
            f"{d['snr']}, {d['n_views']} views × {d['n_states']} states (last: domain "
            f"missing), {100 * d['junk_fraction']:.0f}% junk; device {rows[0]['device']}"
            + "".join(f"; {k}={v}" for k, v in d.get("set", {}).items())
        )
        lines.append(
            "<10%: classes below 10% of the mean size; largest: largest class / N; NMI, ARI "
            "against true view×state; st.pur: state purity (good particles); cls/state: classes "
            "each flexible-domain state is the majority of; jk.rec: junk recall; jk.good: junk "
            "fraction inside good classes; max/cap: largest class / cap"
        )
    return "\n".join(lines)


SUMMARY_KEYS = ("nmi", "ari", "state_purity", "junk_recall", "junk_in_good_classes",
                "largest_class_fraction", "classes_below_10pct")  # fmt: skip


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (noise, K, mode): the median over seeds of each figure in SUMMARY_KEYS, with the
    seeds' minimum and maximum."""
    import numpy as np

    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["data"]["noise"], r["k"], r["mode"]), []).append(r)
    out = []
    for (noise, k, mode), rs in cells.items():
        m = {"noise": noise, "k": k, "mode": mode, "seeds": [r["data"]["seed"] for r in rs]}
        for key in SUMMARY_KEYS:
            v = np.array([r[key] for r in rs], dtype=float)
            m[key] = float(np.median(v))
            m[key + "_range"] = [float(v.min()), float(v.max())]
        out.append(m)
    return out


def anneal_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (noise, seed, K): does anneal-off have higher junk recall AND less junk in good
    classes than the default?"""
    by = {(r["data"]["noise"], r["data"]["seed"], r["k"], r["mode"]): r for r in rows}
    out = []
    for (noise, seed, k, mode), d in by.items():
        a = by.get((noise, seed, k, "anneal-off"))
        if mode != "default" or a is None:
            continue
        out.append({
            "noise": noise, "seed": seed, "k": k,
            "junk_recall": [d["junk_recall"], a["junk_recall"]],
            "junk_in_good": [d["junk_in_good_classes"], a["junk_in_good_classes"]],
            "better": bool(a["junk_recall"] > d["junk_recall"]
                           and a["junk_in_good_classes"] < d["junk_in_good_classes"]),
        })  # fmt: skip
    return out


def format_summary(rows: list[dict[str, Any]]) -> str:
    """Median table over seeds, then the anneal-off vs default cells."""
    lines = [
        f"{'median over seeds':<20} {'noise':<8} {'K':>3} {'NMI':>6} {'ARI':>6} {'st.pur':>7} "
        f"{'jk.rec':>7} {'jk.good':>8} {'largest':>7} {'<10%':>5}"
    ]
    for m in medians(rows):
        lines.append(
            f"{m['mode']:<20} {m['noise']:<8} {m['k']:>3} {_fmt(m['nmi']):>6} "
            f"{_fmt(m['ari']):>6} {_fmt(m['state_purity'], True):>7} "
            f"{_fmt(m['junk_recall'], True):>7} {_fmt(m['junk_in_good_classes'], True):>8} "
            f"{_fmt(m['largest_class_fraction'], True):>7} {m['classes_below_10pct']:>5.0f}"
        )
    cells = anneal_cells(rows)
    if cells:
        ok = sum(c["better"] for c in cells)
        lines.append(f"anneal-off better on junk (recall up AND junk in good down): {ok} of "
                     f"{len(cells)} (noise, seed, K) cells")  # fmt: skip
        for c in cells:
            if not c["better"]:
                lines.append(
                    f"  not in {c['noise']} seed {c['seed']} K {c['k']}: recall "
                    f"{_fmt(c['junk_recall'][0], True)} -> {_fmt(c['junk_recall'][1], True)}, "
                    f"junk in good {_fmt(c['junk_in_good'][0], True)} -> "
                    f"{_fmt(c['junk_in_good'][1], True)}"
                )
    return "\n".join(lines)


def _cli(args: argparse.Namespace) -> int:
    from companion.report import jsonable

    extra = parse_set(args.set_params)
    if args.jobs < 1:
        from companion.errors import ParameterError

        raise ParameterError(f"--jobs {args.jobs}: give at least 1")
    rows = run_modes_cells(
        args.seed, noises=args.noise, modes=args.modes, jobs=args.jobs, out_dir=args.out,
        n=args.n_particles, k_values=tuple(args.n_classes), box=args.box, snr=args.snr,
        device=args.device, params=extra or None, ice_fraction=args.ice_fraction,
    )  # fmt: skip
    table = Path(args.table)
    table.write_text(json.dumps(jsonable(rows), indent=2) + "\n")  # medians: medians(rows)
    print(f"table written to {table}", file=sys.stderr)
    if args.json:
        json.dump(jsonable(rows), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_modes(rows))
        print(format_summary(rows))
    return 0
