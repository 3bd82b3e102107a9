"""Simulate a particle set with known truth (RELION STAR + CryoSPARC .cs + truth.csv).

The protein has a rigid domain and a flexible domain in several states (hinge angles; the
last state has the domain missing), seen in a few distinct views with unequal populations.
A fraction is junk: particles at a gold/carbon edge, particles overlapped by contamination,
pure noise. Each particle gets a uniform in-plane rotation, a small shift, its micrograph's
CTF (defocus 0.8-2.5 µm, astigmatism) and noise at --snr (signal variance / noise
variance inside the particle), normalised as RELION extraction does (protein white,
background mean 0, sd 1). Noise is white unless --noise coloured (detector noise through an
MTF + ice noise: a low-pass field times the CTF, --ice-fraction of the variance).
--scale-sd gives each particle its own intensity scale (ice thickness), --disordered-fraction
adds a less-ordered sub-population (arm at a random hinge angle, blurred); truth.csv records
intensity_scale, disordered and hinge_deg. With none of these the data set is the original.

Writes OUT/particles.star (paths relative to OUT), OUT/particles.cs (OUT as the project
directory), OUT/stacks/mic_NNNNN.mrcs (one per micrograph), OUT/truth.csv (image_name, view,
state, junk, psi_deg, shift_x_px, shift_y_px, micrograph, defocus, ...) and
OUT/simulation.json. The same --seed gives the same files.

Examples:
  companion simulate sim --n-particles 2000 --seed 1
  companion info sim/particles.star
  companion simulate real --n-particles 5000 --box 64 --psize 3 --noise coloured \\
      --scale-sd 0.2 --disordered-fraction 0.15 --n-views 6 --view-weights 8,4,2,1,1,1
  companion simulate big --n-particles 100000 --box 128 --psize 1.5 --snr 0.05 --n-views 6 \\
      --view-weights 6,5,4,3,2,1 --junk-fraction 0.2
"""

from __future__ import annotations

import argparse
import json
import sys

from companion.commands.options import add_n_particles
from companion.errors import ParameterError


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="output directory (new, empty or a simulation)")
    add_n_particles(parser, 2000, aliases=("-n",))
    parser.add_argument("--box", type=int, default=128, help="box size in pixels (default 128)")
    parser.add_argument("--psize", type=float, default=1.5, help="pixel size in Å (default 1.5)")
    parser.add_argument(
        "--snr", type=float, default=0.05, help="signal/noise variance inside the particle (0.05)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--n-views", type=int, default=4, help="distinct views (default 4)")
    parser.add_argument(
        "--n-states",
        type=int,
        default=4,
        help="flexible-domain states, the last with the domain missing (default 4)",
    )
    parser.add_argument(
        "--view-weights", type=_floats, default=None, help="relative view populations, e.g. 4,3,2,1"
    )
    parser.add_argument(
        "--state-weights", type=_floats, default=None, help="relative state populations"
    )
    parser.add_argument(
        "--junk-fraction", type=float, default=0.15, help="fraction of junk (default 0.15)"
    )
    parser.add_argument(
        "--junk-weights",
        type=_floats,
        default=None,
        help="relative weights of gold_edge,contamination,noise (default 0.4,0.3,0.3)",
    )
    parser.add_argument(
        "--max-shift",
        type=float,
        default=None,
        metavar="FRACTION",
        help="max shift per axis as a fraction of the box, as in companion classify (default 0.03)",
    )
    parser.add_argument(
        "--per-micrograph", type=int, default=200, help="particles per micrograph (default 200)"
    )
    parser.add_argument(
        "--defocus",
        type=_floats,
        default=[8000.0, 25000.0],
        metavar="MIN,MAX",
        help="mean defocus range in Å (default 8000,25000)",
    )
    parser.add_argument(
        "--optics-groups", type=int, default=1, help="number of optics groups (default 1)"
    )
    parser.add_argument(
        "--noise", choices=["white", "coloured"], default="white", help="noise kind (white)"
    )
    parser.add_argument(
        "--ice-fraction",
        type=float,
        default=0.5,
        help="coloured noise: fraction of the noise variance from ice (default 0.5)",
    )
    parser.add_argument(
        "--ice-resolution",
        type=float,
        default=20.0,
        help="coloured noise: low-pass of the ice field in Å (default 20)",
    )
    parser.add_argument(
        "--scale-sd", type=float, default=0.0, help="log-sd of per-particle intensity (0)"
    )
    parser.add_argument(
        "--disordered-fraction",
        type=float,
        default=0.0,
        help="fraction of good particles in a less-ordered population (0)",
    )
    parser.add_argument("--json", action="store_true", help="print simulation.json on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from companion.simulate import simulate

    if len(args.defocus) != 2:
        raise ParameterError(f"--defocus {args.defocus}: give MIN,MAX in Å")
    if args.max_shift is not None and not 0 <= args.max_shift <= 0.5:
        raise ParameterError(
            f"--max-shift {args.max_shift:g}: a fraction of the box between 0 and 0.5 (as in "
            f"companion classify), e.g. 3 px of a {args.box} px box is "
            f"{3 / args.box:.3f}"
        )
    info = simulate(
        args.out,
        args.n_particles,
        box=args.box,
        psize=args.psize,
        snr=args.snr,
        seed=args.seed,
        n_views=args.n_views,
        n_states=args.n_states,
        view_weights=args.view_weights,
        state_weights=args.state_weights,
        junk_fraction=args.junk_fraction,
        junk_weights=args.junk_weights,
        max_shift=None if args.max_shift is None else args.max_shift * args.box,
        per_micrograph=args.per_micrograph,
        defocus_range=(args.defocus[0], args.defocus[1]),
        n_optics_groups=args.optics_groups,
        noise=args.noise,
        ice_fraction=args.ice_fraction,
        ice_resolution=args.ice_resolution,
        scale_sd=args.scale_sd,
        disordered_fraction=args.disordered_fraction,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        c = info.counts
        print(
            f"{info.n} particles ({c.get('good', 0)} good, "
            f"{info.n - c.get('good', 0)} junk) in {info.n_micrographs} micrographs, "
            f"box {info.box} px, {info.psize:g} Å/px, SNR {info.snr:g} → {info.out_dir}\n"
            f"  {info.files.get('star', '-')}\n  {info.files.get('cs', '-')}\n"
            f"  {info.files['truth']}\n"
            f"  {info.seconds:.1f} s ({info.rate:.0f} particles/s)"
        )
    return 0
