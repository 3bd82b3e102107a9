"""Simulated particle sets with known truth, written as a RELION project and a CryoSPARC .cs.

The protein (:mod:`companion.simulate.phantom`) has a rigid domain and a flexible domain
seen in several states (hinge angles; the last state has the domain missing), projected in a
few distinct views with unequal populations. A fraction of particles is junk: particles at
the edge of dense gold/carbon support, particles overlapped by contamination, pure noise.
Every particle gets a uniform in-plane rotation, a small shift, its micrograph's CTF
(defocus spread and astigmatism) and noise at the requested SNR, and is normalised as
RELION's extraction does (:mod:`companion.simulate.micrographs`).

Closer to real data, each off by default (the defaults give the original, white-noise
data set, file for file): ``noise="coloured"`` (detector noise through an MTF + CTF-modulated
low-pass ice noise, ``ice_fraction`` of the variance), ``scale_sd`` (per-particle intensity
scale, log-normal: ice thickness), ``disordered_fraction`` (a less-ordered sub-population of
good particles: arm at a random hinge angle in ±50°, blurred; their ``state`` in the truth is
the drawn nominal state), and steeper ``view_weights`` for more preferred views.

Output directory layout::

    OUT/particles.star        RELION 3.1 particles (image paths relative to OUT)
    OUT/particles.cs          the same particles for CryoSPARC (OUT is the project dir)
    OUT/stacks/mic_NNNNN.mrcs one stack per micrograph (float32, protein WHITE)
    OUT/truth.csv             one row per particle, in particle-file order (see TRUTH_COLUMNS)
    OUT/simulation.json       the parameters and derived numbers (noise sd, diameter, rate)

Image contrast: stacks hold protein white (RELION's convention); the .cs records that with
``blob/sign = -1`` (the rule lives in :mod:`companion.cryosparc.conventions`), so both
readers give identical images. SNR = variance of the CTF-modulated clean projection inside
the particle circle (mean defocus, averaged over views and states) / noise variance.
Geometry is RELION's: see :mod:`companion.simulate.phantom` for how ``psi_deg`` and the shift
move the density; RELION would recover ``rlnAnglePsi = -psi_deg`` (+ a per-class constant) and
``rlnOriginX/YAngst = -shift * psize``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from companion.errors import ParameterError
from companion.particles import CtfParams, ParticleSet
from companion.simulate.micrographs import (
    BG_RADIUS,
    GOOD,
    JUNK_KINDS,
    NOISE_KINDS,
    NoiseModel,
    Optics,
    Plan,
    Renderer,
    draw_extras,
    draw_plan,
)
from companion.simulate.phantom import state_has_arm, true_projections

__all__ = [
    "JUNK_KINDS",
    "TRUTH_COLUMNS",
    "SimulationInfo",
    "load_truth",
    "simulate",
    "true_labels",
    "true_projections",
]

log = logging.getLogger(__name__)

TRUTH_COLUMNS = (
    "image_name",  # as rlnImageName: NNNNNN@stacks/mic_NNNNN.mrcs (relative to OUT)
    "view",  # 0-based view of a good particle; -1 for junk
    "state",  # 0-based state (the last one: flexible domain missing); -1 for junk
    "junk",  # '' for a good particle, else gold_edge / contamination / noise
    "psi_deg",  # in-plane angle applied (counter-clockwise in (x=column, y=row))
    "shift_x_px",  # shift applied (pixels; the particle centre moved by +shift)
    "shift_y_px",
    "micrograph",  # micrograph name (stack file stem)
    "defocus",  # mean defocus (dU + dV) / 2 of the micrograph, Å
    "defocus_u",
    "defocus_v",
    "defocus_angle",
    "intensity_scale",  # signal scale of the particle (ice thickness); 1 when not simulated
    "disordered",  # 1: the less-ordered sub-population (random hinge, blurred arm)
    "hinge_deg",  # its hinge angle; empty for everyone else
)
STACK_DIR = "stacks"


@dataclass
class SimulationInfo:
    """What :func:`simulate` wrote, its parameters and derived numbers."""

    out_dir: str
    n: int
    box: int
    psize: float
    snr: float
    seed: int
    n_views: int
    n_states: int
    view_weights: list[float]
    state_weights: list[float]
    junk_fraction: float
    junk_weights: dict[str, float]
    max_shift: float
    per_micrograph: int
    n_micrographs: int
    defocus_range: tuple[float, float]
    max_astigmatism: float
    voltage: float
    cs: float
    amp_contrast: float
    n_optics_groups: int
    noise_sd: float
    particle_diameter_A: float
    bg_radius_px: float
    noise: str = "white"
    ice_fraction: float = 0.0
    ice_resolution: float = 0.0
    scale_sd: float = 0.0
    disordered_fraction: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    images_seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Particles per second for the whole run (images, stacks, STAR, .cs, truth)."""
        return self.n / self.seconds if self.seconds > 0 else float("nan")

    @property
    def star_path(self) -> Path:
        return Path(self.out_dir) / "particles.star"

    @property
    def cs_path(self) -> Path:
        return Path(self.out_dir) / "particles.cs"

    @property
    def truth_path(self) -> Path:
        return Path(self.out_dir) / "truth.csv"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rate_particles_per_s"] = self.rate
        return d


def _weights(w: Any, n: int, default: np.ndarray, what: str) -> np.ndarray:
    arr = default if w is None else np.asarray(w, dtype=np.float64).ravel()
    if len(arr) != n or np.any(arr < 0) or not np.isfinite(arr).all() or arr.sum() <= 0:
        raise ParameterError(f"{what}: need {n} non-negative weights, not all zero; got {w!r}")
    return arr / arr.sum()


def _prepare_out(out: Path) -> None:
    """Create ``out``; reuse it only if empty or holding an earlier simulation."""
    if out.exists() and not out.is_dir():
        raise ParameterError(f"{out}: exists and is not a directory — choose another OUT")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "simulation.json").is_file():
            raise ParameterError(
                f"{out}: directory is not empty and holds no earlier simulation — "
                "choose a new or empty OUT"
            )
        shutil.rmtree(out / STACK_DIR, ignore_errors=True)
    (out / STACK_DIR).mkdir(parents=True, exist_ok=True)


def simulate(
    out_dir: str | Path,
    n: int,
    box: int = 128,
    psize: float = 1.5,
    snr: float = 0.05,
    seed: int = 0,
    *,
    n_views: int = 4,
    n_states: int = 4,
    view_weights: Any = None,
    state_weights: Any = None,
    junk_fraction: float = 0.15,
    junk_weights: Any = None,
    max_shift: float | None = None,
    per_micrograph: int = 200,
    defocus_range: tuple[float, float] = (8000.0, 25000.0),
    max_astigmatism: float = 500.0,
    voltage: float = 300.0,
    cs: float = 2.7,
    amp_contrast: float = 0.1,
    n_optics_groups: int = 1,
    noise: str = "white",
    ice_fraction: float = 0.5,
    ice_resolution: float = 20.0,
    scale_sd: float = 0.0,
    disordered_fraction: float = 0.0,
    formats: tuple[str, ...] = ("star", "cs"),
    progress: bool = True,
) -> SimulationInfo:
    """Simulate ``n`` particles into ``out_dir`` (see the module docstring for the layout).

    Args:
        box, psize: image side (px, even) and pixel size (Å).
        snr: signal variance / noise variance inside the particle.
        seed: the same seed and parameters give identical files.
        n_views, n_states: projection directions of the rigid body; flexible-domain states
            (hinge angles, the last state without the domain when ``n_states >= 2``).
        view_weights, state_weights: relative populations (default: views 4:3:2:1-like
            linear decrease — a preferred-view distribution; states equal).
        junk_fraction, junk_weights: fraction of junk; relative weights of gold_edge,
            contamination, noise (default 0.4, 0.3, 0.3).
        max_shift: shifts uniform in ±max_shift px per axis (default 3% of the box).
        per_micrograph: particles per micrograph (each micrograph: one stack, one CTF).
        defocus_range, max_astigmatism: mean defocus uniform in the range (Å), dU - dV
            uniform in [0, max_astigmatism] Å, astigmatism angle uniform.
        noise: "white" (i.i.d. pixels) or "coloured" (detector noise through an MTF plus
            ice noise: white noise low-passed at ``ice_resolution`` Å times the CTF, a
            fraction ``ice_fraction`` of the noise variance); same total variance.
        scale_sd: log-sd of the per-particle intensity scale (0: all 1).
        disordered_fraction: fraction of good particles (of the states with the arm) in the
            less-ordered population (random hinge angle, blurred arm).
        formats: which particle files to write ("star", "cs").
    """
    t0 = time.perf_counter()
    out = Path(out_dir).resolve()
    n, box, n_views, n_states = int(n), int(box), int(n_views), int(n_states)
    if n < 1:
        raise ParameterError(f"-n {n}: need at least one particle")
    if box < 16 or box % 2:
        raise ParameterError(f"--box {box}: need an even box of at least 16 px")
    if not psize > 0 or not snr > 0:
        raise ParameterError(f"--psize {psize} and --snr {snr} must be positive")
    if n_views < 1 or n_states < 1:
        raise ParameterError("need at least one view and one state")
    if not 0 <= junk_fraction < 1:
        raise ParameterError(f"junk fraction {junk_fraction}: must be in [0, 1)")
    if per_micrograph < 1 or n_optics_groups < 1:
        raise ParameterError("per_micrograph and n_optics_groups must be >= 1")
    lo_df, hi_df = (float(v) for v in defocus_range)
    if not 0 < lo_df <= hi_df or max_astigmatism < 0 or max_astigmatism >= 2 * lo_df:
        raise ParameterError(f"defocus range {defocus_range} Å / astigmatism: out of range")
    if noise not in NOISE_KINDS:
        raise ParameterError(f"--noise {noise!r}: use one of {', '.join(NOISE_KINDS)}")
    if not 0 <= ice_fraction <= 1 or not ice_resolution > 0:
        raise ParameterError(
            f"--ice-fraction {ice_fraction} must be in [0, 1] and --ice-resolution "
            f"{ice_resolution} Å positive"
        )
    if not 0 <= scale_sd <= 1 or not 0 <= disordered_fraction <= 1:
        raise ParameterError(
            f"--scale-sd {scale_sd} and --disordered-fraction {disordered_fraction}: must be "
            "in [0, 1]"
        )
    unknown = set(formats) - {"star", "cs"}
    if unknown:
        raise ParameterError(f"unknown output formats {sorted(unknown)}: use 'star' and/or 'cs'")
    vw = _weights(view_weights, n_views, np.arange(n_views, 0, -1.0), "view weights")
    sw = _weights(state_weights, n_states, np.ones(n_states), "state weights")
    jw = _weights(junk_weights, len(JUNK_KINDS), np.array([0.4, 0.3, 0.3]), "junk weights")
    shift = 0.03 * box if max_shift is None else float(max_shift)
    if shift < 0 or shift > box / 4:
        raise ParameterError(f"max shift {shift} px: must be in [0, box/4]")

    _prepare_out(out)
    # a third stream for the newer draws keeps the first two (the original data) unchanged
    plan_seq, noise_seq, extra_seq = np.random.SeedSequence(seed).spawn(3)
    plan = draw_plan(
        np.random.default_rng(plan_seq),
        n,
        view_weights=vw,
        state_weights=sw,
        junk_fraction=junk_fraction,
        junk_weights=jw,
        max_shift=shift,
        per_micrograph=per_micrograph,
        defocus_range=(lo_df, hi_df),
        max_astigmatism=max_astigmatism,
    )
    draw_extras(np.random.default_rng(extra_seq), plan, scale_sd=float(scale_sd),
                disordered_fraction=float(disordered_fraction),
                states_with_arm=state_has_arm(n_states))  # fmt: skip
    colour = NoiseModel(noise, float(ice_fraction), float(ice_resolution))
    optics = Optics(psize, voltage, cs, amp_contrast)
    renderer = Renderer(box, optics, n_views, n_states, colour)
    noise_sd = renderer.calibrate_noise(snr, np.outer(vw, sw), 0.5 * (lo_df + hi_df))
    n_mic = len(plan.defocus_u)
    stacks = [out / STACK_DIR / f"mic_{m + 1:05d}.mrcs" for m in range(n_mic)]
    t_img = _write_stacks(renderer, plan, stacks, psize, noise_seq, progress)

    particles = _particle_set(
        out, plan, stacks, box, psize, n_optics_groups, voltage, cs, amp_contrast
    )
    files = {"truth": str(out / "truth.csv"), "stacks": str(out / STACK_DIR)}
    truth = _truth_table(plan, stacks, out)
    truth.to_csv(out / "truth.csv", index=False)
    if "star" in formats:
        from companion.relion import write_particles as write_star

        write_star(out / "particles.star", particles, image_root=out)
        files["star"] = str(out / "particles.star")
    if "cs" in formats:
        from companion.cryosparc import write_particles as write_cs

        write_cs(out / "particles.cs", particles, project_dir=out)
        files["cs"] = str(out / "particles.cs")

    kinds = truth["junk"].to_numpy()
    counts = {"good": int((kinds == "").sum())} | {k: int((kinds == k).sum()) for k in JUNK_KINDS}
    info = SimulationInfo(
        out_dir=str(out),
        n=n,
        box=box,
        psize=float(psize),
        snr=float(snr),
        seed=int(seed),
        n_views=n_views,
        n_states=n_states,
        view_weights=vw.tolist(),
        state_weights=sw.tolist(),
        junk_fraction=float(junk_fraction),
        junk_weights=dict(zip(JUNK_KINDS, jw.tolist(), strict=True)),
        max_shift=shift,
        per_micrograph=int(per_micrograph),
        n_micrographs=n_mic,
        defocus_range=(lo_df, hi_df),
        max_astigmatism=float(max_astigmatism),
        voltage=float(voltage),
        cs=float(cs),
        amp_contrast=float(amp_contrast),
        n_optics_groups=int(n_optics_groups),
        noise_sd=noise_sd,
        particle_diameter_A=2 * renderer.radius * box * float(psize),
        bg_radius_px=BG_RADIUS * box,
        noise=noise,
        ice_fraction=float(ice_fraction) if noise == "coloured" else 0.0,
        ice_resolution=float(ice_resolution) if noise == "coloured" else 0.0,
        scale_sd=float(scale_sd),
        disordered_fraction=float(disordered_fraction),
        counts=counts,
        files=files,
        images_seconds=t_img,
    )
    info.seconds = time.perf_counter() - t0
    (out / "simulation.json").write_text(json.dumps(info.to_dict(), indent=2) + "\n")
    log.info(
        "simulated %d particles (%d micrographs) in %.1f s (%.0f particles/s) → %s",
        n,
        n_mic,
        info.seconds,
        info.rate,
        out,
    )
    return info


def _write_stacks(
    renderer: Renderer,
    plan: Plan,
    stacks: list[Path],
    psize: float,
    noise_seq: np.random.SeedSequence,
    progress: bool,
) -> float:
    """Render and write every micrograph's stack; returns the seconds spent."""
    from tqdm import tqdm

    from companion.io.mrc import write_mrc_stack

    t0 = time.perf_counter()
    bounds = np.searchsorted(plan.micrograph, np.arange(len(stacks) + 1))
    seqs = noise_seq.spawn(len(stacks))
    bar = tqdm(
        total=len(plan.micrograph),
        unit="particle",
        desc="simulate",
        file=sys.stderr,
        disable=not progress,
    )
    with bar:
        for m, path in enumerate(stacks):
            idx = np.arange(bounds[m], bounds[m + 1])
            images = renderer.micrograph(plan, idx, m, np.random.default_rng(seqs[m]))
            write_mrc_stack(path, images, psize)
            bar.update(len(idx))
    return time.perf_counter() - t0


def _particle_set(
    out: Path,
    plan: Plan,
    stacks: list[Path],
    box: int,
    psize: float,
    n_optics_groups: int,
    voltage: float,
    cs: float,
    amp_contrast: float,
) -> ParticleSet:
    n = len(plan.micrograph)
    mic = plan.micrograph
    starts = np.searchsorted(mic, np.arange(len(stacks)))
    ctf = CtfParams(
        defocus_u=plan.defocus_u[mic],
        defocus_v=plan.defocus_v[mic],
        defocus_angle=plan.defocus_angle[mic],
        voltage=np.full(n, voltage),
        cs=np.full(n, cs),
        amp_contrast=np.full(n, amp_contrast),
        phase_shift=np.zeros(n),
        bfactor=np.zeros(n),
        scale=np.ones(n),
    )
    return ParticleSet(
        source_path=out / "particles.star",
        project_dir=out,
        stack_paths=stacks,
        stack_index=mic,
        image_index=np.arange(n) - starts[mic],
        box=box,
        psize=np.float32(psize),
        optics_group=(mic % n_optics_groups) + 1,
        ctf=ctf,
        contrast=np.float32(1.0),
        ctf_premultiplied=False,
        phase_flipped=False,
        host="simulate",
    )


def _truth_table(plan: Plan, stacks: list[Path], out: Path) -> pd.DataFrame:
    mic = plan.micrograph
    starts = np.searchsorted(mic, np.arange(len(stacks)))
    rel = np.array([p.relative_to(out).as_posix() for p in stacks], dtype=object)
    stems = np.array([p.stem for p in stacks], dtype=object)
    index = (np.arange(len(mic)) - starts[mic] + 1).astype(np.int64)
    names = [f"{i:06d}@{r}" for i, r in zip(index.tolist(), rel[mic].tolist(), strict=True)]
    good = plan.kind == GOOD
    junk = np.array([""] + list(JUNK_KINDS), dtype=object)[plan.kind]
    du, dv = plan.defocus_u[mic], plan.defocus_v[mic]
    return pd.DataFrame(
        {
            "image_name": names,
            "view": np.where(good, plan.view, -1).astype(np.int16),
            "state": np.where(good, plan.state, -1).astype(np.int16),
            "junk": junk,
            "psi_deg": np.round(plan.psi_deg.astype(np.float64), 4),
            "shift_x_px": np.round(plan.shift[:, 0].astype(np.float64), 4),
            "shift_y_px": np.round(plan.shift[:, 1].astype(np.float64), 4),
            "micrograph": stems[mic],
            "defocus": np.round(0.5 * (du.astype(np.float64) + dv), 2),
            "defocus_u": np.round(du.astype(np.float64), 2),
            "defocus_v": np.round(dv.astype(np.float64), 2),
            "defocus_angle": np.round(plan.defocus_angle[mic].astype(np.float64), 3),
            "intensity_scale": np.round(plan.scale.astype(np.float64), 5),
            "disordered": plan.disordered.astype(np.int8),
            "hinge_deg": np.round(plan.hinge_deg.astype(np.float64), 3),
        },
        columns=list(TRUTH_COLUMNS),
    )


def load_truth(out_dir: str | Path) -> pd.DataFrame:
    """``OUT/truth.csv`` as a DataFrame (``junk`` is '' for good particles, never NaN;
    ``hinge_deg`` NaN where not set)."""
    path = Path(out_dir)
    if path.is_dir():
        path = path / "truth.csv"
    truth = pd.read_csv(
        path,
        dtype={"junk": str, "micrograph": str, "image_name": str},
        keep_default_na=False,
    )
    # columns added later: a truth file written before them reads as the original data set
    if "intensity_scale" not in truth:
        truth["intensity_scale"] = 1.0
    if "disordered" not in truth:
        truth["disordered"] = 0
    truth["hinge_deg"] = pd.to_numeric(truth.get("hinge_deg", np.nan), errors="coerce")
    return truth


def true_labels(truth: pd.DataFrame, n_states: int | None = None) -> np.ndarray:
    """One integer label per particle: ``view * n_states + state`` for good particles,
    ``n_views * n_states + k`` for junk kind k (gold_edge, contamination, noise)."""
    view = truth["view"].to_numpy()
    state = truth["state"].to_numpy()
    ns = int(state.max()) + 1 if n_states is None else int(n_states)
    n_good = (int(view.max()) + 1) * ns
    labels = view.astype(np.int64) * ns + state
    for k, kind in enumerate(JUNK_KINDS):
        labels[truth["junk"].to_numpy() == kind] = n_good + k
    return labels
