"""Measure speed, scale and quality (bench speed|quality|modes|select|scale|assign|subclassify).

Every benchmark first prints the machine it ran on (CPU model, cores, GPU if any).

  speed    particles/s and particle×class evaluations/s per iteration, the GEMM FLOP/s
           achieved against this machine's measured float32 matmul peak, on --device cpu,
           gpu or both; with --relion, RELION 3.1 (relion_refine on PATH) classifies the
           same particles with the same K, psi step, offsets and iterations, and the time
           ratio per iteration is printed.
  quality  simulates a flexible-domain set with junk and known truth, classifies it and
           prints NMI/ARI against true view×state, junk recall, junk inside good classes,
           classes below 10% of the mean size, the largest class fraction, state purity and
           per-class correlation of the average with the true projection.
  modes    default, annealing-off, balanced and balanced + annealing-off on the same
           particles, one row per mode.
  select   --select auto on simulated data with junk, 3 seeds (--noise white coloured):
           good particles kept and junk in the selection for whole classes and with the
           per-particle stage, and the class-level floor (junk inside junk-minority classes).
  scale    wall time and CPU seconds (per stage: preprocessing, online iterations, full
           passes), peak RSS, cache disk use and throughput at N = 10k, 100k, 1M (box 64)
           and K 50, 200; fitted exponents of CPU time vs N and K; resumable (rerun the
           same command), prints ETAs. With --cluster local:N: the first N and K without
           Dask, on 1 worker and on N workers (wall time, speedup, overhead per iteration).
  subclassify  flexible-domain state purity and "domain fell off" recall without and with
           --subclassify (one main run each), the extra wall/CPU time, and the AUC of
           --stability for good particles vs junk.
  stability  --stability R over seeds: AUC of the per-particle stability, good particles vs
           junk (and per junk kind) and vs disordered ones; CPU (main + R-1 runs) / main,
           with shared preprocessing (--per-run: also each run its own).
  assign   the balanced-mode solvers (soft Sinkhorn E-step, final capped labels) on an
           N × K score matrix with an attractor built in: seconds, extra memory, cap kept,
           particles moved, score given up for the cap.

Examples:
  companion bench speed                              # CPU, 1000 particles, K 20, box 128
  companion bench speed --device both --n-particles 20000 --n-classes 100 --json
  companion bench speed --relion --n-particles 500 --n-classes 10 --box 64
  companion bench quality                            # 10,000 particles, K 24
  companion bench quality --n-particles 2000 --n-classes 12 --anneal off --json
  companion bench modes --json
  companion bench select --noise white coloured      # 3 seeds × 2,000 particles, K 16
  companion bench scale --n-particles 2000,8000 --n-classes 10,40 --out /tmp/bs
  companion bench scale --cluster local:2 --n-particles 4000 --n-classes 20 --out /tmp/bc
  companion bench assign                             # N 1,000,000, K 200, CPU
  companion bench subclassify --noise white coloured  # 4,000 particles, box 48, K 24 50
  companion bench stability --per-run               # 3 seeds × 2,000 particles, K 12, R 3
  companion bench assign --device both --n-particles 200000 --n-classes 500
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from companion.commands.options import add_n_particles, add_threads_option, check_out_dir
from companion.params import ClassifyParams, add_params_arguments

K_ALIAS = {"n_classes": ("--classes",)}  # the old spelling in demo and bench


def add_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    sp = sub.add_parser(
        "speed", help="throughput vs the machine's matmul peak and RELION", formatter_class=fmt
    )
    sp.add_argument("--device", choices=["cpu", "gpu", "both"], default="cpu")
    add_n_particles(sp, 1000)
    sp.add_argument("--box", type=int, default=128, help="box in pixels [default: 128]")
    sp.add_argument("--iters", type=int, default=2, help="full passes [default: 2]")
    add_params_arguments(sp, ClassifyParams, only=("n_classes", "search", "tf32"),
                         defaults={"n_classes": 20, "search": "fast"}, aliases=K_ALIAS)  # fmt: skip
    sp.add_argument(
        "--resolution",
        type=float,
        default=6.0,
        help="resolution limit (Å) of the runs and of the steady-state pass timed from "
        "converged references [default: 6]",
    )
    sp.add_argument(
        "--relion",
        action="store_true",
        help="also run relion_refine on the same particles and compare",
    )
    sp.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for companion and RELION's --j [default: the cores available to "
        "this process]",
    )
    _common(sp)
    sp.set_defaults(_bench=_speed)

    qp = sub.add_parser(
        "quality", help="classes against the truth of a simulated set", formatter_class=fmt
    )
    add_n_particles(qp, 10000, minimum=10)
    qp.add_argument("--box", type=int, default=128, help="box in pixels [default: 128]")
    qp.add_argument("--psize", type=float, default=None, help="pixel size Å [default: 192 Å / box]")
    qp.add_argument("--snr", type=float, default=0.05, help="simulated SNR [default: 0.05]")
    qp.add_argument(
        "--noise",
        choices=["white", "coloured"],
        default="white",
        help="simulated noise (coloured: MTF detector noise + CTF-modulated ice) [white]",
    )
    qp.add_argument(
        "--ice-fraction", type=float, default=0.5, help="coloured: ice share of the noise [0.5]"
    )
    qp.add_argument(
        "--scale-sd", type=float, default=0.0, help="per-particle intensity log-sd [default: 0]"
    )
    _common(qp, seed=False)  # --seed comes with the classification parameters
    add_params_arguments(qp, ClassifyParams, defaults={"n_classes": 24}, aliases=K_ALIAS)
    qp.set_defaults(_bench=_quality)

    from companion.bench import assign as bench_assign
    from companion.bench import modes as bench_modes
    from companion.bench import select as bench_select

    mp = sub.add_parser(
        "modes", help="default / annealing-off / balanced modes compared", formatter_class=fmt
    )
    bench_modes.add_args(mp)
    _overwrite(mp)
    mp.set_defaults(_bench=_modes)

    ap = sub.add_parser(
        "assign", help="balanced-mode assignment: seconds and memory at scale", formatter_class=fmt
    )
    bench_assign.add_args(ap)
    ap.set_defaults(_bench=_assign)

    lp = sub.add_parser(
        "select", help="--select auto against the truth: good kept, junk in the selection",
        formatter_class=fmt,
    )  # fmt: skip
    bench_select.add_args(lp)
    _overwrite(lp)
    lp.set_defaults(_bench=_select)
    from companion.bench import subclassify as bench_subclassify

    sb = sub.add_parser(
        "subclassify", help="--subclassify purity / fell-off recall / time; --stability AUC",
        formatter_class=fmt,
    )  # fmt: skip
    bench_subclassify.add_args(sb)
    _overwrite(sb)
    sb.set_defaults(_bench=_subclassify)
    from companion.bench import stability as bench_stability

    st = sub.add_parser(
        "stability", help="--stability: AUC good vs junk / disordered over seeds; CPU cost",
        formatter_class=fmt,
    )  # fmt: skip
    bench_stability.add_args(st)
    _overwrite(st)
    st.set_defaults(_bench=_stability)
    sc = sub.add_parser(
        "scale",
        help="wall and CPU time, peak RSS and cache size vs N and K (resumable)",
        formatter_class=fmt,
    )
    sc.add_argument("--n-particles", default="10000,100000,1000000", metavar="LIST",
                    help="particle counts [default: 10000,100000,1000000]")  # fmt: skip
    sc.add_argument("--n-classes", default="50,200", metavar="LIST",
                    help="K values; the first at every N, the others at the smallest N "
                    "[default: 50,200]")  # fmt: skip
    sc.add_argument("--box", type=int, default=64, help="box in pixels [default: 64]")
    sc.add_argument(
        "--base",
        type=int,
        default=10000,
        help="distinct simulated images, tiled to larger N [default: 10000]",
    )
    sc.add_argument(
        "--out",
        metavar="DIR",
        default="bench_scale",
        help="data, runs and finished points: rerun the same command to resume (any other "
        "non-empty directory is refused without --overwrite) [default: bench_scale]",
    )
    _overwrite(sc, "start again: remove the finished points (scale.json) and runs/ in --out")
    sc.add_argument(
        "--max-iterations",
        type=int,
        default=None,
        help="stop each point after this many iterations (memory check at large N; times "
        "are then not those of the full schedule)",
    )
    sc.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    add_threads_option(sc)
    add_params_arguments(sc, ClassifyParams, only=[f for f in ClassifyParams.model_fields
                                                  if f != "n_classes"])  # fmt: skip
    sc.set_defaults(_bench=_scale)


def _common(p: argparse.ArgumentParser, seed: bool = True) -> None:
    if seed:
        p.add_argument("--seed", type=int, default=0, help="simulation and run seed")
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="keep data and outputs here [default: a temporary directory]",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    _overwrite(p)


def _overwrite(
    p: argparse.ArgumentParser, text: str = "write into a non-empty --out [default: refuse it]"
) -> None:
    p.add_argument("--overwrite", action="store_true", help=text)


def main(args: argparse.Namespace) -> int:
    out = getattr(args, "out", None)
    if out is not None and not (args.bench == "scale" and _scale_resumes(Path(out), args)):
        check_out_dir(out, overwrite=args.overwrite, resume=False, nonempty=True)
    return int(args._bench(args) or 0)


def _scale_resumes(out: Path, args: argparse.Namespace) -> bool:
    """Whether ``out`` holds an earlier bench scale to go on from (not with --overwrite)."""
    from companion.bench.scale import POINTS_FILE

    return not args.overwrite and (
        (out / POINTS_FILE).is_file() or (out / "runs").is_dir() or any(out.glob("base_*"))
    )


def _emit(args: argparse.Namespace, report: dict[str, Any], text: str) -> None:
    from companion.report import jsonable

    if args.json:
        json.dump(jsonable(report), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(text)


def _speed(args: argparse.Namespace) -> int:
    from pydantic import TypeAdapter

    from companion.bench.speed import describe_machine, format_speed, machine_info
    from companion.run import check_device

    devices = ("cpu", "gpu") if args.device == "both" else (args.device,)
    if "gpu" in devices:
        check_device("gpu")
    print(describe_machine(machine_info()), file=sys.stderr)
    from companion.bench.speed import run_speed_benchmark
    from companion.threads import limit_threads

    with limit_threads(args.threads) as threads:
        rep = run_speed_benchmark(
            n=args.n_particles,
            box=args.box,
            classes=args.n_classes,
            iters=args.iters,
            devices=devices,
            relion=args.relion,
            out_dir=Path(args.out) if args.out else None,
            seed=args.seed,
            threads=threads,
            search=args.search,
            resolution=args.resolution,
            tf32=TypeAdapter(bool).validate_python(getattr(args, "tf32", False)),
        )
    _emit(args, rep, format_speed(rep))
    return 0


def _quality(args: argparse.Namespace) -> int:
    from companion.bench.quality import format_quality, run_quality_benchmark
    from companion.bench.speed import describe_machine, machine_info

    overrides = {k: getattr(args, k) for k in ClassifyParams.model_fields if hasattr(args, k)}
    classes = overrides.pop("n_classes")
    device = overrides.pop("device", "auto")
    seed = overrides.pop("seed", 0)
    from companion.params import validate_params

    p = validate_params({"n_classes": classes, "device": device, "seed": seed, **overrides})
    p.check_feasible(args.n_particles)
    if device == "gpu":
        from companion.run import check_device

        check_device("gpu")
    print(describe_machine(machine_info()), file=sys.stderr)
    rep = run_quality_benchmark(
        n=args.n_particles,
        classes=classes,
        box=args.box,
        psize=args.psize or 192.0 / args.box,
        snr=args.snr,
        seed=seed,
        device=device,
        params=overrides,
        out_dir=Path(args.out) if args.out else None,
        noise=args.noise,
        ice_fraction=args.ice_fraction,
        scale_sd=args.scale_sd,
    )
    _emit(args, rep, format_quality(rep))
    return 0


def _modes(args: argparse.Namespace) -> int:
    from companion.bench.modes import run_modes_benchmark
    from companion.bench.speed import describe_machine, machine_info

    print(describe_machine(machine_info()), file=sys.stderr)
    return int(run_modes_benchmark(args) or 0)


def _select(args: argparse.Namespace) -> int:
    from companion.bench.select import format_select, run_select_benchmark
    from companion.bench.speed import describe_machine, machine_info

    print(describe_machine(machine_info()), file=sys.stderr)
    rep = run_select_benchmark(args)
    _emit(args, rep, format_select(rep))
    return 0


def _subclassify(args: argparse.Namespace) -> int:
    from companion.bench.speed import describe_machine, machine_info
    from companion.bench.subclassify import main as run

    print(describe_machine(machine_info()), file=sys.stderr)
    return run(args)


def _stability(args: argparse.Namespace) -> int:
    from companion.bench.speed import describe_machine, machine_info
    from companion.bench.stability import main as run

    print(describe_machine(machine_info()), file=sys.stderr)
    return run(args)


def _ints(text: str, what: str) -> list[int]:
    from companion.errors import ParameterError

    try:
        vals = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise ParameterError(f"{what} {text!r}: expected positive integers, e.g. 10000,100000")
    return vals


def _scale(args: argparse.Namespace) -> int:
    from companion.bench.scale import POINTS_FILE, format_scale, run_scale_benchmark
    from companion.bench.speed import describe_machine, machine_info
    from companion.params import validate_params

    ns, ks = _ints(args.n_particles, "--n-particles"), _ints(args.n_classes, "--n-classes")
    overrides = {k: getattr(args, k) for k in ClassifyParams.model_fields if hasattr(args, k)}
    overrides.pop("n_classes", None)
    overrides.pop("device", None)
    validate_params({"n_classes": ks[0], **overrides}).check_feasible(min(ns))
    out = Path(args.out)
    if args.overwrite:  # bench scale's own files only
        (out / POINTS_FILE).unlink(missing_ok=True)
        shutil.rmtree(out / "runs", ignore_errors=True)
    print(describe_machine(machine_info()), file=sys.stderr)
    seed = overrides.get("seed", 0)  # simulation and run seed (--seed)
    if overrides.get("cluster"):  # 1 worker against N on the first N and K
        from companion.bench.cluster import format_cluster, run_cluster_comparison

        rep = run_cluster_comparison(Path(args.out), ns[0], ks[0], args.box, seed, overrides,
                                     args.base)  # fmt: skip
        _emit(args, rep, format_cluster(rep))
        return 0
    rep = run_scale_benchmark(
        out, ns, ks, args.box, seed, overrides, args.base, args.max_iterations, args.threads
    )
    _emit(args, rep, format_scale(rep))
    return 0


def _assign(args: argparse.Namespace) -> int:
    from companion.bench.assign import format_assign, run_assign_benchmark
    from companion.bench.speed import describe_machine, machine_info
    from companion.run import check_device

    if args.device != "cpu":
        check_device("gpu")
    print(describe_machine(machine_info()), file=sys.stderr)
    rows = run_assign_benchmark(args.n_particles, args.n_classes, slack=args.slack,
                                spread=args.spread, device=args.device, seed=args.seed)  # fmt: skip
    _emit(args, {"runs": rows}, format_assign(rows))
    return 0
