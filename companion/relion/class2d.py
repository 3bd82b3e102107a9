"""relion_refine-style 2D outputs: ``{root}_itNNN_{data,model,optimiser,sampling}.star``
and ``{root}_itNNN_classes.mrcs``.

The files match what RELION's own 2D classification writes (3.1.3 layout, checked against
``relion_refine`` output), so Subset selection / ``relion_display``
and ``relion_class_ranker`` open them: all four STAR files share one root, the optimiser
names the model, the model's ``rlnReferenceImage`` rows point into the classes stack.
Groups are RELION's micrograph groups (``ParticleSet.group``): the data file numbers them
(``rlnGroupNumber``, 1-based, in order of first appearance, as relion_refine does) and the
model has one ``data_model_group_N`` per group with its noise spectrum and scale (what 3.1
reads) and one ``data_model_optics_group_N`` per optics group (what 4.0+ reads).
``rlnNrOpticsGroups`` is written for 4.0/5.0 only (3.1 warns about it on every read); 5.0
files say ``# version 50001``. Sampling is written as RELION states it: the coarse steps
before its one order of adaptive oversampling, i.e. twice the steps companion searched with.
Paths inside the files are relative to the RELION project directory (the directory jobs
run in), which is ``particles.project_dir``; outside it they are absolute.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from companion.classify.result import ClassResult
from companion.io.atomic import atomic_write_text
from companion.io.mrc import write_mrc_stack
from companion.particles import ParticleSet
from companion.relion.pipeline import detect_version, normalise_version, star_version
from companion.relion.star import format_star, write_star
from companion.relion.tables import RelionTables
from companion.select import class_scores

NO_RESOLUTION = 999.0  # what RELION writes for an undetermined resolution


def _finite(values: Any) -> np.ndarray:
    """float64 values with undetermined (non-finite) entries as RELION's 999."""
    arr = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(arr), arr, np.copysign(NO_RESOLUTION, np.nan_to_num(arr)))


def relion_path(path: str | Path, project_dir: str | Path) -> str:
    """A path as RELION refers to it: relative to the project directory, else absolute."""
    full = Path(os.path.abspath(path))
    try:
        return full.relative_to(Path(os.path.abspath(project_dir))).as_posix()
    except ValueError:
        return full.as_posix()


def _inside(path: Path, directory: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(Path(os.path.abspath(directory)))
        return True
    except ValueError:
        return False


def _image_root(out_dir: Path, particles: ParticleSet) -> Path | None:
    """RELION tables keep their image names as read; generated names are written relative to
    the project directory (where RELION runs) when the output lies inside it."""
    if isinstance(particles.passthrough, RelionTables):
        return None
    project = Path(particles.project_dir)
    return project if _inside(out_dir, project) else None


# --- the file set ------------------------------------------------------------------------


def class2d_paths(out_dir: str | Path, root: str, iteration: int) -> dict[str, Path]:
    """The five file paths of one iteration (keys data/model/optimiser/sampling/classes)."""
    base = Path(out_dir) / f"{root}_it{iteration:03d}"
    return {
        "data": Path(f"{base}_data.star"),
        "model": Path(f"{base}_model.star"),
        "optimiser": Path(f"{base}_optimiser.star"),
        "sampling": Path(f"{base}_sampling.star"),
        "classes": Path(f"{base}_classes.mrcs"),
    }


@dataclass
class Groups:
    """The micrograph groups of one written particle table (RELION numbering).

    number: int64[N], ``rlnGroupNumber`` (1-based, in order of first appearance);
    rows: int64[G], each written group's index in ``ParticleSet.group_names`` (and in
    ``ClassResult.sigma2_noise`` / ``group_scale``); names: the groups' names;
    counts: int64[G], particles per group.
    """

    number: np.ndarray
    rows: np.ndarray
    names: list[str]
    counts: np.ndarray


def written_groups(particles: ParticleSet) -> Groups:
    """Groups as relion_refine numbers them for this particle table."""
    codes, uniques = pd.factorize(particles.group)
    rows = np.asarray(uniques, dtype=np.int64)
    return Groups(
        number=codes.astype(np.int64) + 1,
        rows=rows,
        names=[particles.group_names[r] for r in rows],
        counts=np.bincount(codes, minlength=len(rows)).astype(np.int64),
    )


def relion_flavour(particles: ParticleSet) -> str:
    """The RELION version the files are for: set by the External job
    (``RelionTables.relion_version``), else 5.0 for a 5.0 input, else the project's."""
    tables = particles.passthrough
    if not isinstance(tables, RelionTables):
        return detect_version(particles.project_dir)
    if not tables.relion_version:  # kept: the writers run once per iteration
        tables.relion_version = (
            "5.0" if tables.version == "50001" else detect_version(particles.project_dir)
        )
    return normalise_version(tables.relion_version)


OVERSAMPLING = 1  # the adaptive oversampling order stated to RELION (fine step = coarse / 2)
POOLED_PARTICLES = 3  # --pool of RELION's 2D GUI


def data_columns(
    particles: ParticleSet, result: ClassResult, groups: Groups | None = None
) -> dict[str, Any]:
    """The per-particle columns relion_refine 2D adds to the particle table (input order).

    Particles an intermediate (online) iteration has not seen yet (``class_id == -1``) get
    ``rlnClassNumber`` 0. ``rlnGroupNumber`` numbers the micrograph groups; ``rlnGroupName``
    is added where RELION could not form the same groups from the table itself (no
    ``rlnGroupName`` or ``rlnMicrographName`` column in the source).
    """
    n = len(particles)
    if result.n_particles != n:
        raise ValueError(f"result has {result.n_particles} particles, particle set has {n}")
    groups = groups or written_groups(particles)
    psize = particles.psize.astype(np.float64)
    shift = np.asarray(result.shift_px, dtype=np.float64)
    zeros = np.zeros(n, dtype=np.float64)
    cols: dict[str, Any] = {
        "rlnAngleRot": zeros,
        "rlnAngleTilt": zeros,
        "rlnAnglePsi": np.asarray(result.psi_deg, dtype=np.float64),
        "rlnOriginXAngst": shift[:, 0] * psize,
        "rlnOriginYAngst": shift[:, 1] * psize,
        "rlnClassNumber": np.asarray(result.class_id, dtype=np.int64) + 1,
        "rlnGroupNumber": groups.number,
        "rlnNormCorrection": np.asarray(result.norm_correction, dtype=np.float64),
        "rlnLogLikeliContribution": np.asarray(result.loglik, dtype=np.float64),
        "rlnMaxValueProbDistribution": np.asarray(result.max_prob, dtype=np.float64),
        "rlnNrOfSignificantSamples": np.asarray(result.n_significant, dtype=np.int64),
    }
    scale = scale_factors(particles, result)
    if scale is not None:
        cols["rlnCtfScalefactor"] = scale
    cols.update(posterior_columns(result))
    if needs_group_name(particles):
        cols["rlnGroupName"] = pd.Categorical.from_codes(
            groups.number - 1, categories=pd.Index(groups.names, dtype=object)
        )
    cols.update(companion_columns(result))
    return cols


PARENT_CLASS = "companionParentClass"  # not an rln label (RELION 3.1/4/5 ignore it)
STABILITY = "companionStability"
#: the per-particle features of --select auto (companion.select): float32, read back exactly
LOWRES_POWER = "companionLowresPower"
LOGLIK_GAIN = "companionLoglikGain"


def companion_columns(result: ClassResult) -> dict[str, np.ndarray]:
    """companion's own per-particle columns: the main-run class of the particle's class
    (--subclassify, 1-based), its stability (--stability) and the per-particle features of
    ``--select auto`` (``companionLowresPower``, ``companionLoglikGain`` in nats; where the
    result has them); RELION ignores them."""
    cols: dict[str, np.ndarray] = {}
    for label, values in ((LOWRES_POWER, result.lowres_power), (LOGLIK_GAIN, result.loglik_gain)):
        if values is not None:
            cols[label] = np.asarray(values, dtype=np.float32)
    labels = np.asarray(result.class_id, dtype=np.int64)
    if result.parent_class is not None:
        parent = np.asarray(result.parent_class, dtype=np.int64)
        cols[PARENT_CLASS] = np.where(labels >= 0, parent[np.maximum(labels, 0)] + 1, 0)
    if result.stability is not None:
        cols[STABILITY] = np.asarray(result.stability, dtype=np.float64)
    return cols


#: extra labels for the class posteriors (RELION 3.1.3, 4.0.2 and 5.0.1 define no label
#: starting with "companion"; 3.1.3 reads them, warns once per label and keeps them)
POSTERIOR_LABELS = ("companionClass{}", "companionPosterior{}", "companionLogLikelihood{}")
ASSIGNED_POSTERIOR = "companionAssignedPosterior"


def posterior_columns(result: ClassResult) -> dict[str, np.ndarray]:
    """``companionClass1 companionPosterior1 companionLogLikelihood1 … companionClassP …
    companionAssignedPosterior``: the P most probable classes (1-based as rlnClassNumber; 0
    where not computed), their posteriors and log-likelihoods, then the posterior of the
    class the particle was assigned (rlnClassNumber); nothing when the result has none."""
    n_top = result.n_posteriors
    if not n_top:
        return {}
    cls = np.asarray(result.post_class, dtype=np.int64) + 1
    prob = np.asarray(result.post_prob, dtype=np.float64)
    ll = np.asarray(result.post_loglik, dtype=np.float64)
    cols: dict[str, np.ndarray] = {}
    for i in range(n_top):
        c, p, lab = (name.format(i + 1) for name in POSTERIOR_LABELS)
        cols[c], cols[p], cols[lab] = np.maximum(cls[:, i], 0), prob[:, i], ll[:, i]
    cols[ASSIGNED_POSTERIOR] = np.asarray(result.class_prob, dtype=np.float64)
    return cols


def scale_factors(particles: ParticleSet, result: ClassResult) -> np.ndarray | None:
    """``rlnCtfScalefactor`` with companion's per-particle intensity scale folded in (the
    input's factor × the scale), when --scale-correction was on; else None (the input
    column is kept as read). RELION multiplies the CTF by rlnCtfScalefactor (ctf.h), which
    is companion's model (scale · CTF · reference), so relion_refine continues with it."""
    if result.scale is None or result.params.get("scale_correction", "off") != "on":
        return None
    return np.asarray(particles.ctf.scale, np.float64) * np.asarray(result.scale, np.float64)


def needs_group_name(particles: ParticleSet) -> bool:
    """True when RELION could not form ``particles``' groups from the table it reads (no
    ``rlnGroupName`` or ``rlnMicrographName`` column in the source): write rlnGroupName."""
    tables = particles.passthrough
    return not (
        isinstance(tables, RelionTables)
        and {"rlnGroupName", "rlnMicrographName"} & set(tables.particles.columns)
    )


def write_class2d_outputs(
    out_dir: str | Path,
    root: str,
    particles: ParticleSet,
    result: ClassResult,
    iteration: int,
) -> dict[str, Path]:
    """Write ``{root}_it{iteration:03d}_{data,model,optimiser,sampling}.star`` and
    ``_classes.mrcs`` into ``out_dir``; returns their paths (keys data/model/optimiser/
    sampling/classes). Each file is written to a temporary name and renamed, the data and
    classes first, the optimiser (which names the others) last.
    """
    from companion.relion.writing import write_particles

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = class2d_paths(out_dir, root, iteration)
    project = Path(particles.project_dir)
    inside = _inside(out_dir, project)  # else: absolute paths
    names = {k: relion_path(p, project) if inside else os.path.abspath(p) for k, p in paths.items()}
    names["root"] = names["data"].removesuffix(f"_it{iteration:03d}_data.star")
    flavour = relion_flavour(particles)
    version = star_version(flavour)
    groups = written_groups(particles)

    optics, optics_ids = write_particles(
        paths["data"],
        particles,
        data_columns(particles, result, groups),
        image_root=_image_root(out_dir, particles),
        version=version,
    )
    write_classes_mrcs(paths["classes"], result.averages, particles.pixel_size)
    model = model_blocks(particles, result, names["classes"], optics, optics_ids, groups, flavour)
    write_star(paths["model"], model, version)
    write_star(paths["sampling"], {"sampling_general": sampling_pairs(particles, result)}, version)
    atomic_write_text(
        paths["optimiser"], optimiser_star(particles, result, iteration, names, flavour)
    )
    return paths


def write_classes_mrcs(path: str | Path, averages: np.ndarray, psize: float) -> None:
    """K × box × box float32 stack, header as RELION writes a 2D stack (atomic)."""
    write_mrc_stack(path, averages, psize, single_section_cell=True)


def _shell_columns(box: int, psize: float) -> dict[str, np.ndarray]:
    s = np.arange(box // 2 + 1)
    inv = s / (box * psize)
    ang = np.where(s > 0, box * psize / np.maximum(s, 1), NO_RESOLUTION)
    return {"rlnSpectralIndex": s, "rlnResolution": inv, "rlnAngstromResolution": ang}


def ssnr_resolution_shell(ssnr: np.ndarray, occupied: np.ndarray) -> int:
    """RELION's current resolution (``updateCurrentResolution``) as a shell index: over the
    occupied classes, the last shell before the spectral SNR first drops below 1."""
    best = 0
    for k in np.flatnonzero(occupied):
        below = np.flatnonzero(ssnr[k, 1:] < 1.0)
        best = max(best, int(below[0]) if below.size else ssnr.shape[1] - 1)
    return best


def group_noise(particles: ParticleSet, result: ClassResult) -> np.ndarray:
    """sigma²_noise (G, S) in ``particles.group_names`` order; a result with one row per
    optics group (older results) gives each group its optics group's spectrum."""
    sigma = np.asarray(result.sigma2_noise, dtype=np.float64)
    n_groups = len(particles.group_names)
    if sigma.shape[0] == n_groups:
        return sigma
    first = pd.Series(particles.optics_group).groupby(particles.group).first()
    optics_of = np.zeros(n_groups, np.int64)
    optics_of[first.index.to_numpy()] = first.to_numpy()
    rows = {int(g): i for i, g in enumerate(np.asarray(result.optics_groups).ravel())}
    fallback = sigma.mean(axis=0)
    return np.stack([sigma[rows[g]] if g in rows else fallback for g in optics_of.tolist()])


def group_scale(particles: ParticleSet, result: ClassResult) -> np.ndarray:
    """Per-group intensity scale (G,) in ``group_names`` order (1 where not estimated)."""
    scale = np.asarray(getattr(result, "group_scale", ()), dtype=np.float64).ravel()
    n_groups = len(particles.group_names)
    return scale if scale.shape == (n_groups,) else np.ones(n_groups)


def model_blocks(
    particles: ParticleSet,
    result: ClassResult,
    classes_name: str,
    optics: pd.DataFrame,
    optics_ids: np.ndarray,
    groups: Groups,
    flavour: str = "4.0",
) -> dict[str, Any]:
    """The blocks of ``_model.star`` (model_general, classes, class_N, groups, group_N,
    optics_group_N) for the particle table written with ``optics`` / ``optics_ids``."""
    box, psize, k = particles.box, particles.pixel_size, result.n_classes
    params = result.params
    norm = np.asarray(result.norm_correction, dtype=np.float64)
    sizes = np.asarray(result.class_sizes)
    ssnr = np.asarray(result.ssnr, dtype=np.float64)
    shells = _shell_columns(box, psize)
    res_shell = ssnr_resolution_shell(ssnr, sizes > 0)
    current = box * psize / res_shell if res_shell > 0 else NO_RESOLUTION
    general: dict[str, Any] = {
        "rlnReferenceDimensionality": 2,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": int(box),
        "rlnCurrentResolution": float(current),
        "rlnCurrentImageSize": int(result.work_box),
        "rlnPaddingFactor": 2.0,
        "rlnIsHelix": 0,
        "rlnFourierSpaceInterpolator": 1,
        "rlnMinRadiusNnInterpolation": 10,
        "rlnPixelSize": float(psize),
        "rlnNrClasses": int(k),
        "rlnNrBodies": 1,
        "rlnNrGroups": len(groups.names),
        "rlnNrOpticsGroups": len(optics),
        "rlnTau2FudgeFactor": float(params.get("tau2_fudge", 2.0)),
        "rlnNormCorrectionAverage": float(norm.mean()) if norm.size else 1.0,
        "rlnSigmaOffsetsAngst": float(result.sigma_offsets_A),
        "rlnOrientationalPriorMode": 0,
        "rlnSigmaPriorRotAngle": 0.0,
        "rlnSigmaPriorTiltAngle": 0.0,
        "rlnSigmaPriorPsiAngle": 0.0,
        "rlnLogLikelihood": float(result.loglik_total),
        "rlnAveragePmax": float(result.avg_pmax),
    }
    if flavour == "3.1":
        del general["rlnNrOpticsGroups"]  # 3.1 warns "unknown label" on every read
    in_limit = shells["rlnSpectralIndex"] <= max(res_shell, 1)
    prior = np.asarray(result.prior_offset_px, dtype=np.float64) * psize
    blocks: dict[str, Any] = {
        "model_general": general,
        "model_classes": pd.DataFrame(
            {
                "rlnReferenceImage": [f"{i + 1:06d}@{classes_name}" for i in range(k)],
                "rlnClassDistribution": np.asarray(result.class_distribution, np.float64),
                "rlnAccuracyRotations": np.asarray(result.accuracy_rot_deg, np.float64),
                "rlnAccuracyTranslationsAngst": np.asarray(result.accuracy_trans_A, np.float64),
                "rlnEstimatedResolution": _finite(result.resolution_A),
                "rlnOverallFourierCompleteness": np.where(sizes > 0, in_limit.mean(), 0.0),
                "rlnClassPriorOffsetX": prior[:, 0],
                "rlnClassPriorOffsetY": prior[:, 1],
                "rlnClassScore": class_scores(result).astype(np.float64),  # RELION 4 ranker's
            }
        ),
    }
    for i in range(k):
        blocks[f"model_class_{i + 1}"] = pd.DataFrame(
            {
                **shells,
                "rlnSsnrMap": ssnr[i],
                "rlnGoldStandardFsc": np.asarray(result.frc[i], dtype=np.float64),
                "rlnFourierCompleteness": np.where(in_limit & (sizes[i] > 0), 1.0, 0.0),
                "rlnReferenceSigma2": np.asarray(result.sigma2_ref[i], dtype=np.float64),
                "rlnReferenceTau2": np.asarray(result.tau2[i], dtype=np.float64),
                "rlnSpectralOrientabilityContribution": np.zeros(box // 2 + 1),
            }
        )
    noise = group_noise(particles, result)[groups.rows]
    scale = group_scale(particles, result)[groups.rows]
    blocks["model_groups"] = pd.DataFrame(
        {
            "rlnGroupNumber": np.arange(1, len(groups.names) + 1, dtype=np.int64),
            "rlnGroupName": pd.Series(groups.names, dtype=object),
            "rlnGroupNrParticles": groups.counts,
            "rlnGroupScaleCorrection": scale,
        }
    )
    spectral = {
        "rlnSpectralIndex": shells["rlnSpectralIndex"],
        "rlnResolution": shells["rlnResolution"],
    }
    for g in range(len(groups.names)):  # what 3.1 reads: one noise spectrum per group
        blocks[f"model_group_{g + 1}"] = pd.DataFrame({**spectral, "rlnSigma2Noise": noise[g]})
    # 4.0+ reads one spectrum per optics group: the particle-weighted mean of its groups
    ids = pd.to_numeric(optics["rlnOpticsGroup"], errors="coerce").to_numpy(np.int64)
    for o in ids.tolist():
        w = np.bincount(groups.number[optics_ids == o] - 1, minlength=len(groups.names))
        spectrum = (w @ noise) / w.sum() if w.sum() else noise.mean(axis=0)
        blocks[f"model_optics_group_{o}"] = pd.DataFrame({**spectral, "rlnSigma2Noise": spectrum})
    return blocks


def coarse_sampling(particles: ParticleSet, result: ClassResult) -> dict[str, float]:
    """The sampling as RELION states it (coarse steps, before ``OVERSAMPLING`` orders of
    adaptive oversampling halve them): ``psi_step`` (°), ``offset_range`` / ``offset_step``
    (Å). Companion searched with half these steps, the same effective sampling."""
    p = result.params
    factor = 2.0**OVERSAMPLING
    return {
        "psi_step": factor * float(p.get("psi_step", 6.0)),
        "offset_range": float(p.get("max_shift", 0.1)) * particles.box * particles.pixel_size,
        "offset_step": factor * float(p.get("shift_step", 1.0)) * float(result.work_psize),
    }


def sampling_pairs(particles: ParticleSet, result: ClassResult) -> dict[str, Any]:
    """The ``sampling_general`` block of ``_sampling.star`` (steps in ° and Å)."""
    c = coarse_sampling(particles, result)
    return {
        "rlnIs3DSampling": 0,
        "rlnIs3DTranslationalSampling": 0,
        "rlnPsiStep": c["psi_step"],
        "rlnOffsetRange": c["offset_range"],
        "rlnOffsetStep": c["offset_step"],
        "rlnHelicalOffsetStep": -1.0,
        "rlnSamplingPerturbInstance": 0.0,
        "rlnSamplingPerturbFactor": 0.5,
        "rlnHealpixOrderOriginal": 2,
        "rlnPsiStepOriginal": c["psi_step"],
        "rlnOffsetRangeOriginal": c["offset_range"],
        "rlnOffsetStepOriginal": c["offset_step"],
    }


def particle_diameter_A(particles: ParticleSet, params: dict[str, Any]) -> float:
    """The mask diameter used (Å): the parameter, else 90% of the box."""
    d = params.get("particle_diameter")
    return float(d) if d else 0.9 * particles.box * particles.pixel_size


def random_seed(params: dict[str, Any]) -> int:
    """The seed stated to RELION: never 0 (RELION then skips randomising particle order)."""
    return int(params.get("seed", 0)) or 1


def _num(x: float) -> str:
    return f"{x:g}"


def refine_command(particles: ParticleSet, result: ClassResult, names: dict[str, str]) -> str:
    """A relion_refine command line equivalent to the run (RELION reads it on continue)."""
    p = result.params
    c = coarse_sampling(particles, result)
    px = particles.pixel_size
    parts = [
        f"--o {names['root']}",
        f"--i {relion_path(particles.source_path, particles.project_dir)}",
        "--ctf",
        f"--iter {result.n_iterations}",
        f"--tau2_fudge {_num(float(p.get('tau2_fudge', 2.0)))}",
        f"--particle_diameter {_num(particle_diameter_A(particles, p))}",
        f"--K {result.n_classes}",
        "--flatten_solvent --zero_mask",
        f"--strict_highres_exp {_num(float(p.get('max_resolution', 6.0)))}",
        f"--oversampling {OVERSAMPLING}",
        f"--psi_step {_num(c['psi_step'])}",
        f"--offset_range {_num(c['offset_range'] / px)}",
        f"--offset_step {_num(c['offset_step'] / px)}",
        f"--pool {POOLED_PARTICLES}",
        f"--random_seed {random_seed(p)}",
    ]
    if len(particles.group_names) > 1:
        parts.append("--scale")
    if p.get("recenter", True):
        parts.append("--center_classes")
    return " ".join(parts) + " --j 1 "


def optimiser_star(
    particles: ParticleSet,
    result: ClassResult,
    iteration: int,
    names: dict[str, str],
    flavour: str = "4.0",
) -> str:
    """The text of ``_optimiser.star`` (every field of relion_refine 3.1's 2D optimiser)."""
    from companion import __version__

    p = result.params
    res = np.asarray(result.resolution_A, dtype=np.float64)
    finite = res[np.isfinite(res) & (res > 0)]
    best = float(1.0 / finite.min()) if finite.size else 0.0
    hist = result.history[-1] if result.history else {}
    fixed_noise = p.get("noise_model", "estimated") != "estimated"
    norm = np.asarray(result.norm_correction, dtype=np.float64)
    sizes = np.asarray(result.class_sizes)
    filled = sizes > 0
    acc_rot = np.asarray(result.accuracy_rot_deg, dtype=np.float64)[filled]
    acc_trans = np.asarray(result.accuracy_trans_A, dtype=np.float64)[filled]
    scale = group_scale(particles, result)
    pairs: dict[str, Any] = {
        "rlnOutputRootName": names["root"],
        "rlnModelStarFile": names["model"],
        "rlnExperimentalDataStarFile": names["data"],
        "rlnOrientSamplingStarFile": names["sampling"],
        "rlnCurrentIteration": int(iteration),
        "rlnNumberOfIterations": int(result.n_iterations),
        "rlnDoSplitRandomHalves": 0,
        "rlnJoinHalvesUntilThisResolution": -1.0,
        "rlnAdaptiveOversampleOrder": OVERSAMPLING,
        "rlnAdaptiveOversampleFraction": 0.999,
        "rlnRandomSeed": random_seed(p),
        "rlnParticleDiameter": particle_diameter_A(particles, p),
        "rlnWidthMaskEdge": 5,
        "rlnDoZeroMask": 1,
        "rlnDoSolventFlattening": 1,
        "rlnDoSolventFscCorrection": 0,
        "rlnSolventMaskName": "None",
        "rlnSolventMask2Name": "None",
        "rlnBodyStarFile": "None",
        "rlnTauSpectrumName": "None",
        "rlnMaximumCoarseImageSize": -1,
        "rlnHighresLimitExpectation": float(p.get("max_resolution", -1.0)),
        "rlnLowresLimitExpectation": -1.0,
        "rlnIncrementImageSize": 10,
        "rlnDoMapEstimation": 1,
        "rlnDoFastSubsetOptimisation": 0,
        "rlnDoExternalReconstruct": 0,
        "rlnDoStochasticGradientDescent": 0,
        "rlnDoStochasticEM": 0,
        "rlnSgdInitialIterations": 50,
        "rlnSgdFinalIterations": 50,
        "rlnSgdInBetweenIterations": 200,
        "rlnSgdInitialResolution": 35.0,
        "rlnSgdFinalResolution": 15.0,
        "rlnSgdInitialSubsetSize": 100,
        "rlnSgdFinalSubsetSize": 500,
        "rlnSgdMuFactor": 0.0,
        "rlnSgdSigma2FudgeInitial": 8.0,
        "rlnSgdSigma2FudgeHalflife": -1,
        "rlnSgdSkipAnneal": 0,
        "rlnSgdSubsetSize": -1,
        "rlnSgdWriteEverySubset": 1,
        "rlnSgdStepsize": 0.5,
        "rlnDoAutoRefine": 0,
        "rlnAutoLocalSearchesHealpixOrder": 4,
        "rlnNumberOfIterWithoutResolutionGain": 0,
        "rlnBestResolutionThusFar": best,
        "rlnNumberOfIterWithoutChangingAssignments": 0,
        "rlnDoSkipAlign": 0,
        "rlnDoSkipRotate": 0,
        "rlnOverallAccuracyRotations": float(acc_rot.mean()) if acc_rot.size else 0.0,
        "rlnOverallAccuracyTranslationsAngst": float(acc_trans.mean()) if acc_trans.size else 0.0,
        "rlnChangesOptimalOrientations": float(hist.get("changes_orientations", 0.0)),
        "rlnChangesOptimalOffsets": float(hist.get("changes_offsets", 0.0)),
        "rlnChangesOptimalClasses": float(hist.get("changes_classes", 0.0)),
        "rlnSmallestChangesOrientations": float(hist.get("changes_orientations", 0.0)),
        "rlnSmallestChangesOffsets": float(hist.get("changes_offsets", 0.0)),
        "rlnSmallestChangesClasses": int(hist.get("changes_classes_count", 0)),
        "rlnLocalSymmetryFile": "None",
        "rlnDoHelicalRefine": 0,
        "rlnIgnoreHelicalSymmetry": 0,
        "rlnFourierMask": "None",
        "rlnHelicalTwistInitial": 0.0,
        "rlnHelicalRiseInitial": 0.0,
        "rlnHelicalCentralProportion": 0.3,
        "rlnNrHelicalNStart": 1,
        "rlnHelicalMaskTubeInnerDiameter": -1.0,
        "rlnHelicalMaskTubeOuterDiameter": -1.0,
        "rlnHelicalSymmetryLocalRefinement": 0,
        "rlnHelicalSigmaDistance": -1.0,
        "rlnHelicalKeepTiltPriorFixed": 0,
        "rlnHasConverged": 0,
        "rlnHasHighFscAtResolLimit": 0,
        "rlnHasLargeSizeIncreaseIterationsAgo": 0,
        "rlnDoCorrectNorm": int(bool(np.any(np.abs(norm - 1.0) > 1e-6))),
        "rlnDoCorrectScale": int(len(particles.group_names) > 1 and bool(np.any(scale != 1.0))),
        "rlnDoCorrectCtf": 1,
        "rlnDoIgnoreCtfUntilFirstPeak": 0,
        "rlnCtfDataArePhaseFlipped": int(bool(np.any(particles.phase_flipped))),
        "rlnDoOnlyFlipCtfPhases": 0,
        "rlnRefsAreCtfCorrected": 1,
        "rlnFixSigmaNoiseEstimates": int(fixed_noise),
        "rlnFixSigmaOffsetEstimates": 0,
        "rlnMaxNumberOfPooledParticles": POOLED_PARTICLES,
    }
    program = {"3.1": "3.1.3", "4.0": "4.0.2", "5.0": "5.0.1"}.get(flavour, flavour)
    head = (
        f"# RELION optimiser; version {program} (written by companion {__version__})\n"
        f"# {refine_command(particles, result, names)}\n"
    )
    return head + format_star({"optimiser_general": pairs}, star_version(flavour))


# --- a Subset-selection-like output -------------------------------------------------------


def write_selected(
    out_dir: Path,
    particles: ParticleSet,
    result: ClassResult,
    keep: np.ndarray,
    paths: dict[str, Path],
    *,
    chosen: np.ndarray | None = None,
) -> dict[str, Path]:
    """The Host selection writer: :func:`write_selection` of the classes ``keep`` (only the
    particles ``chosen``, bool per particle, when given)."""
    classes = [int(c) + 1 for c in np.flatnonzero(keep)]
    out = write_selection(out_dir, particles, result, classes, paths["classes"],
                          selected=chosen)  # fmt: skip
    return {"selected_particles": out["particles"], "selected_classes": out["class_averages"]}


def write_selection(
    out_dir: str | Path,
    particles: ParticleSet,
    result: ClassResult,
    classes: Sequence[int],
    classes_mrcs: str | Path,
    *,
    selected: np.ndarray | None = None,
) -> dict[str, Path]:
    """What RELION's Subset selection writes for chosen classes (1-based numbers):
    ``particles.star`` (their particles — only those of ``selected``, bool per particle,
    when given — with the 2D columns) and ``class_averages.star``
    (a ``data_`` block: their ``model_classes`` rows, ``rlnReferenceImage`` into
    ``classes_mrcs``, then ``rlnIsHelix`` and ``rlnClassNumber`` last, as relion_display
    saves selected class averages)."""
    from companion.relion.writing import write_particles

    out_dir = Path(out_dir)
    chosen = np.asarray(sorted({int(c) for c in classes}), dtype=np.int64)
    k = result.n_classes
    if chosen.size == 0 or chosen.min() < 1 or chosen.max() > k:
        raise ValueError(f"selected classes must be in 1..{k}, got {list(chosen)}")
    labels = np.asarray(result.class_id, dtype=np.int64) + 1
    member = np.isin(labels, chosen)
    if selected is not None:
        member &= np.asarray(selected, dtype=bool)
    idx = np.flatnonzero(member)
    subset = particles.subset(idx)
    cols = data_columns(particles, result)
    cols = {name: values[idx] for name, values in cols.items() if name != "rlnGroupName"}
    groups = written_groups(subset)  # renumbered for the subset, as RELION would read it
    cols["rlnGroupNumber"] = groups.number
    if needs_group_name(particles):
        cols["rlnGroupName"] = np.asarray(groups.names, dtype=object)[groups.number - 1]
    project = Path(particles.project_dir)
    inside = _inside(out_dir, project)
    out = {
        "particles": out_dir / "particles.star",
        "class_averages": out_dir / "class_averages.star",
    }
    version = star_version(relion_flavour(particles))
    write_particles(
        out["particles"], subset, cols, image_root=_image_root(out_dir, particles), version=version
    )
    psize = particles.pixel_size
    name = relion_path(classes_mrcs, project) if inside else os.path.abspath(classes_mrcs)
    rows = chosen - 1
    prior = np.asarray(result.prior_offset_px, dtype=np.float64)[rows] * psize
    table = pd.DataFrame(
        {
            "rlnReferenceImage": [f"{c:06d}@{name}" for c in chosen],
            "rlnClassDistribution": np.asarray(result.class_distribution, np.float64)[rows],
            "rlnAccuracyRotations": np.asarray(result.accuracy_rot_deg, np.float64)[rows],
            "rlnAccuracyTranslationsAngst": np.asarray(result.accuracy_trans_A, np.float64)[rows],
            "rlnEstimatedResolution": _finite(np.asarray(result.resolution_A)[rows]),
            "rlnClassPriorOffsetX": prior[:, 0],
            "rlnClassPriorOffsetY": prior[:, 1],
            "rlnIsHelix": np.zeros(len(chosen), dtype=np.int64),
            "rlnClassNumber": chosen,
        }
    )
    write_star(out["class_averages"], {"": table}, version)
    return out
