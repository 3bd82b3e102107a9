"""Simulate a small flexible-domain data set, classify it, and compare the classes with the truth.

A first run on any machine, no data needed (measured: 155 s and 0.67 GB on a shared,
busy 2-core VM; see the README). The simulated protein has a rigid domain and a flexible
domain in several states (one with the domain missing), seen in a few preferred views, with
junk (gold edges, contamination, noise), CTF and noise. The demo writes, under --out:

  data/                the simulated RELION project (particles.star, stacks/, truth.csv)
                       and the same particles as CryoSPARC particles.cs
  classes/             the classification: run_itNNN_{data,model,optimiser,sampling}.star,
                       run_itNNN_classes.mrcs, class_averages.png (gallery with class sizes
                       and resolutions), class_occupancy.png, summary.json
  truth_comparison.json  how the classes compare with the truth

and prints the comparison: NMI/ARI against the true view×state, junk recall, nearly empty
classes, the largest class, state purity, correlation of each average with the true projection.

Examples:
  companion demo                              # defaults, output in ./companion-demo
  companion demo --out /tmp/demo --anneal off # a weaker attractor (see README)
  companion demo --balance equal              # spread particles over all classes
  companion demo --n-particles 5000 --n-classes 24 --device gpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from companion.commands.options import add_n_particles, add_threads_option, check_out_dir
from companion.params import ClassifyParams, add_params_arguments

# Sized for a first run of minutes on 2 CPU cores: a 64-px box at 3 Å/px (the same 192 Å particle
# box as the default simulation at 128 px), 12 classes, a shortened online-EM schedule.
DEMO_N = 2000
DEMO_CLASSES = 12
DEMO_BOX = 64
DEMO_PSIZE = 3.0
DEMO_SNR = 0.08
DEMO_SCHEDULE = {"online_iters": 12, "batch_per_class": 60, "full_iters": 2, "anneal_iters": 8}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        "-o",
        default="companion-demo",
        metavar="DIR",
        help="output directory [default: ./companion-demo]",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a finished demo in --out")
    add_n_particles(parser, DEMO_N, minimum=10)
    parser.add_argument("--box", type=int, default=DEMO_BOX, help=argparse.SUPPRESS)
    add_threads_option(parser)
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    add_params_arguments(
        parser,
        ClassifyParams,
        only=("n_classes", "seed", "device", "anneal", "balance", "max_per_class"),
        defaults={"n_classes": DEMO_CLASSES, "seed": 0, "device": "auto", "anneal": "on",
                  "balance": "off", "max_per_class": None},
        aliases={"n_classes": ("--classes",)},
        title="classification parameters (see companion classify --help)",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    from companion.bench.quality import evaluate, format_figures
    from companion.params import validate_params
    from companion.preflight import check_run
    from companion.report import jsonable, write_json
    from companion.run import run_classification
    from companion.simulate import load_truth, simulate
    from companion.sources import open_particles
    from companion.threads import limit_threads

    params: ClassifyParams = validate_params(
        {
            "n_classes": args.n_classes,
            "device": args.device,
            "seed": args.seed,
            "anneal": args.anneal,
            "balance": args.balance,
            "max_per_class": args.max_per_class,
            **DEMO_SCHEDULE,
        }
    )
    check_run(params, args.n_particles)  # before simulating: the run's one check
    out = Path(args.out)
    check_out_dir(out, overwrite=args.overwrite, resume=False)
    n = args.n_particles
    data = out / "data"
    psize = DEMO_PSIZE * DEMO_BOX / args.box
    print(f"simulating {n} particles (box {args.box}, {psize:g} Å/px) in {data}", file=sys.stderr)
    sim = simulate(data, n, box=args.box, psize=psize, snr=DEMO_SNR, seed=args.seed)
    particles = open_particles(data / "particles.star", None)
    with limit_threads(args.threads):
        run = run_classification(particles, params, out / "classes", checked=True)
    res = run.result
    figures = evaluate(
        res.class_id,
        load_truth(data),
        n_classes=res.n_classes,
        averages=res.averages,
        n_views=sim.n_views,
        n_states=sim.n_states,
        psize=particles.pixel_size,
        max_resolution=params.max_resolution,
        cap=res.cap,
    )
    comparison = {"simulation": sim.to_dict(), "figures": figures, "summary": run.summary}
    write_json(out / "truth_comparison.json", comparison)
    if args.json:
        json.dump(jsonable(comparison), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(
        f"classes compared with the truth ({sim.n_views} views × {sim.n_states} states, "
        f"{figures['n_junk']} junk particles):"
    )
    for line in format_figures(figures):
        print("  " + line)
    print(f"gallery: {run.paths['gallery']}")
    print(f"summary: {run.paths['summary']}")
    print(f"comparison: {out / 'truth_comparison.json'}")
    if args.anneal == "on" and args.balance == "off":
        print(
            "compare the modes on the same particles: add --anneal off (a weaker attractor) or "
            "--balance equal (no nearly empty classes), with another --out"
        )
    return 0
