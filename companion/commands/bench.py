"""Measure speed and quality (bench speed | bench quality | bench modes | bench assign).

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
  assign   the balanced-mode solvers (soft Sinkhorn E-step, final capped labels) on an
           N × K score matrix with an attractor built in: seconds, extra memory, cap kept,
           particles moved, score given up for the cap.

Examples:
  companion bench speed                              # CPU, 1000 particles, K 20, box 128
  companion bench speed --device both --n 20000 --classes 100 --json
  companion bench speed --relion --n 500 --classes 10 --box 64
  companion bench quality                            # 10,000 particles, K 24
  companion bench quality --n 2000 --classes 12 --anneal off --json
  companion bench modes --json
  companion bench assign                             # N 1,000,000, K 200, CPU
  companion bench assign --device both --n 200000 --classes 500
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from companion.params import ClassifyParams, add_params_arguments


def add_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    sp = sub.add_parser(
        "speed", help="throughput vs the machine's matmul peak and RELION", formatter_class=fmt
    )
    sp.add_argument("--device", choices=["cpu", "gpu", "both"], default="cpu")
    sp.add_argument("--n", type=int, default=1000, help="particles [default: 1000]")
    sp.add_argument("--box", type=int, default=128, help="box in pixels [default: 128]")
    sp.add_argument("--classes", type=int, default=20, help="K [default: 20]")
    sp.add_argument("--iters", type=int, default=2, help="full passes [default: 2]")
    sp.add_argument(
        "--search",
        choices=["fast", "exhaustive"],
        default="fast",
        help="pose search (see companion classify --help) [default: fast]",
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
        help="RELION threads (--j) [default: the cores available]",
    )
    _common(sp)
    sp.set_defaults(_bench=_speed)

    qp = sub.add_parser(
        "quality", help="classes against the truth of a simulated set", formatter_class=fmt
    )
    qp.add_argument("--n", type=int, default=10000, help="particles [default: 10000]")
    qp.add_argument("--classes", type=int, default=24, help="K [default: 24]")
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
    add_params_arguments(qp, ClassifyParams)
    qp.set_defaults(_bench=_quality)

    from companion import bench_assign, bench_modes

    mp = sub.add_parser(
        "modes", help="default / annealing-off / balanced modes compared", formatter_class=fmt
    )
    bench_modes.add_args(mp)
    mp.set_defaults(_bench=_modes)

    ap = sub.add_parser(
        "assign", help="balanced-mode assignment: seconds and memory at scale", formatter_class=fmt
    )
    bench_assign.add_args(ap)
    ap.set_defaults(_bench=_assign)


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


def main(args: argparse.Namespace) -> int:
    return int(args._bench(args) or 0)


def _emit(args: argparse.Namespace, report: dict[str, Any], text: str) -> None:
    from companion.report import jsonable

    if args.json:
        json.dump(jsonable(report), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(text)


def _speed(args: argparse.Namespace) -> int:
    from companion.bench_speed import describe_machine, format_speed, machine_info
    from companion.run import check_device

    devices = ("cpu", "gpu") if args.device == "both" else (args.device,)
    if "gpu" in devices:
        check_device("gpu")
    print(describe_machine(machine_info()), file=sys.stderr)
    from companion.bench_speed import run_speed_benchmark

    rep = run_speed_benchmark(
        n=args.n,
        box=args.box,
        classes=args.classes,
        iters=args.iters,
        devices=devices,
        relion=args.relion,
        out_dir=Path(args.out) if args.out else None,
        seed=args.seed,
        threads=args.threads,
        search=args.search,
    )
    _emit(args, rep, format_speed(rep))
    return 0


def _quality(args: argparse.Namespace) -> int:
    from companion.bench_quality import format_quality, run_quality_benchmark
    from companion.bench_speed import describe_machine, machine_info

    overrides = {k: getattr(args, k) for k in ClassifyParams.model_fields if hasattr(args, k)}
    classes = overrides.pop("n_classes", args.classes)
    device = overrides.pop("device", "auto")
    seed = overrides.pop("seed", 0)
    from companion.params import validate_params

    p = validate_params({"n_classes": classes, "device": device, "seed": seed, **overrides})
    p.check_feasible(args.n)
    if device == "gpu":
        from companion.run import check_device

        check_device("gpu")
    print(describe_machine(machine_info()), file=sys.stderr)
    rep = run_quality_benchmark(
        n=args.n,
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
    from companion.bench_modes import run_modes_benchmark
    from companion.bench_speed import describe_machine, machine_info

    print(describe_machine(machine_info()), file=sys.stderr)
    return int(run_modes_benchmark(args) or 0)


def _assign(args: argparse.Namespace) -> int:
    from companion.bench_assign import format_assign, run_assign_benchmark
    from companion.bench_speed import describe_machine, machine_info
    from companion.run import check_device

    if args.device != "cpu":
        check_device("gpu")
    print(describe_machine(machine_info()), file=sys.stderr)
    rows = run_assign_benchmark(args.n, args.classes, slack=args.slack, spread=args.spread,
                                device=args.device, seed=args.seed)  # fmt: skip
    _emit(args, {"runs": rows}, format_assign(rows))
    return 0
