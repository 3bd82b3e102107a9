"""relion_refine-style 2D outputs: ``{root}_itNNN_{data,model,optimiser,sampling}.star``
and ``{root}_itNNN_classes.mrcs``.

The files match what RELION's own 2D classification writes (3.1.3 layout, checked against
``relion_refine`` output and ../shared/RELION.md), so Subset selection / ``relion_display``
and ``relion_class_ranker`` open them: all four STAR files share one root, the optimiser
names the model, the model's ``rlnReferenceImage`` rows point into the classes stack.
The model carries both the 3.1 noise tables (``data_model_group_N``) and the 4.0+ ones
(``data_model_optics_group_N`` with ``rlnNrOpticsGroups``) so every version reads it.
Paths inside the files are relative to the RELION project directory (the directory jobs
run in), which is ``particles.project_dir``; outside it they are absolute.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np

from companion.classify.result import ClassResult
from companion.particles import ParticleSet
from companion.relion.pipeline import atomic_write_text
from companion.select import class_scores

STAR_VERSION = "# version 30001"
NO_RESOLUTION = 999.0  # what RELION writes for an undetermined resolution


# --- small STAR formatting helpers (these files are a few hundred lines at most) ---------


def fmt(value: Any) -> str:
    """One STAR value the way RELION writes it (0/1 booleans, fixed or exponent floats)."""
    if isinstance(value, bool | np.bool_):
        return "1" if value else "0"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        x = float(value)
        if not math.isfinite(x):
            return f"{NO_RESOLUTION:.6f}" if x > 0 else f"{-NO_RESOLUTION:.6f}"
        if x == 0.0 or 1e-3 <= abs(x) < 1e7:
            return f"{x:.6f}"
        return f"{x:.6e}"
    text = str(value)
    return f'"{text}"' if (not text or any(c.isspace() for c in text)) else text


def star_pairs(name: str, pairs: Sequence[tuple[str, Any]]) -> str:
    """A key-value (non-loop) data block."""
    width = max(len(k) for k, _ in pairs) + 6
    lines = ["", STAR_VERSION, "", f"data_{name}", ""]
    lines += [f"_{k:<{width}} {fmt(v):>12}" for k, v in pairs]
    return "\n".join(lines) + "\n \n"


def star_loop(name: str, columns: dict[str, Sequence[Any]]) -> str:
    """A loop data block from equal-length columns."""
    lines = ["", STAR_VERSION, "", f"data_{name}", "", "loop_ "]
    lines += [f"_{label} #{i} " for i, label in enumerate(columns, start=1)]
    cols = [[fmt(v) for v in vals] for vals in columns.values()]
    n = len(cols[0]) if cols else 0
    widths = [max([len(c) for c in col] + [1]) for col in cols]
    for r in range(n):
        lines.append(" ".join(f"{col[r]:>{w}}" for col, w in zip(cols, widths, strict=True)) + " ")
    return "\n".join(lines) + "\n \n"


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
    from companion.relion import RelionTables

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


def data_columns(particles: ParticleSet, result: ClassResult) -> dict[str, np.ndarray]:
    """The per-particle columns relion_refine 2D adds to the particle table (input order).

    Particles an intermediate (online) iteration has not seen yet (``class_id == -1``) get
    ``rlnClassNumber`` 0.
    """
    n = len(particles)
    if result.n_particles != n:
        raise ValueError(f"result has {result.n_particles} particles, particle set has {n}")
    psize = particles.psize.astype(np.float64)
    shift = np.asarray(result.shift_px, dtype=np.float64)
    zeros = np.zeros(n, dtype=np.float64)
    return {
        "rlnAngleRot": zeros,
        "rlnAngleTilt": zeros,
        "rlnAnglePsi": np.asarray(result.psi_deg, dtype=np.float64),
        "rlnOriginXAngst": shift[:, 0] * psize,
        "rlnOriginYAngst": shift[:, 1] * psize,
        "rlnClassNumber": np.asarray(result.class_id, dtype=np.int64) + 1,
        "rlnNormCorrection": np.asarray(result.norm_correction, dtype=np.float64),
        "rlnLogLikeliContribution": np.asarray(result.loglik, dtype=np.float64),
        "rlnMaxValueProbDistribution": np.asarray(result.max_prob, dtype=np.float64),
        "rlnNrOfSignificantSamples": np.asarray(result.n_significant, dtype=np.int64),
    }


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
    from companion.relion import write_particles  # the RELION I/O engineer's writer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = class2d_paths(out_dir, root, iteration)
    project = Path(particles.project_dir)
    inside = _inside(out_dir, project)  # else: absolute paths
    names = {k: relion_path(p, project) if inside else os.path.abspath(p) for k, p in paths.items()}
    names["root"] = names["data"].removesuffix(f"_it{iteration:03d}_data.star")

    write_particles(
        paths["data"],
        particles,
        data_columns(particles, result),
        image_root=_image_root(out_dir, particles),
    )
    write_classes_mrcs(paths["classes"], result.averages, particles.pixel_size)
    optics = read_optics_rows(paths["data"])
    atomic_write_text(paths["model"], model_star(particles, result, names["classes"], optics))
    atomic_write_text(paths["sampling"], sampling_star(particles, result))
    atomic_write_text(paths["optimiser"], optimiser_star(particles, result, iteration, names))
    return paths


def write_classes_mrcs(path: str | Path, averages: np.ndarray, psize: float) -> None:
    """K × box × box float32 stack with the pixel size in the header (atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(averages, dtype=np.float32))
            mrc.set_image_stack()
            mrc.voxel_size = float(psize)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_optics_rows(path: str | Path) -> list[tuple[int, str]]:
    """``(rlnOpticsGroup, rlnOpticsGroupName)`` of a particle STAR file's optics table."""
    labels: list[str] = []
    rows: list[tuple[int, str]] = []
    in_optics = in_loop = False
    with open(path) as fh:
        for raw in fh:
            line = raw.strip()
            if line.startswith("data_"):
                if in_optics or line != "data_optics":
                    break  # the optics table comes first; never scan the particle rows
                in_optics = True
                continue
            if not in_optics or not line or line.startswith("#"):
                continue
            if line.startswith("loop_"):
                in_loop = True
            elif line.startswith("_"):
                labels.append(line.split()[0][1:])
            elif in_loop and labels:
                values = line.split()
                group = int(values[labels.index("rlnOpticsGroup")])
                name_col = (
                    labels.index("rlnOpticsGroupName") if "rlnOpticsGroupName" in labels else None
                )
                name = values[name_col] if name_col is not None else f"opticsGroup{group}"
                rows.append((group, name))
    return rows


def _shell_columns(result: ClassResult, box: int, psize: float) -> dict[str, np.ndarray]:
    s = np.arange(box // 2 + 1)
    inv = s / (box * psize)
    ang = np.where(s > 0, box * psize / np.maximum(s, 1), NO_RESOLUTION)
    return {"rlnSpectralIndex": s, "rlnResolution": inv, "rlnAngstromResolution": ang}


def model_star(
    particles: ParticleSet,
    result: ClassResult,
    classes_name: str,
    optics: list[tuple[int, str]],
) -> str:
    """The text of ``_model.star`` (model_general, classes, class_N, groups, noise tables)."""
    box, psize, k = particles.box, particles.pixel_size, result.n_classes
    params = result.params
    optics = optics or [(int(g), f"opticsGroup{int(g)}") for g in result.optics_groups]
    n_optics = max(g for g, _ in optics)
    counts = np.bincount(particles.optics_group, minlength=n_optics + 1)
    norm = np.asarray(result.norm_correction, dtype=np.float64)
    general = [
        ("rlnReferenceDimensionality", 2),
        ("rlnDataDimensionality", 2),
        ("rlnOriginalImageSize", int(box)),
        ("rlnCurrentResolution", float(result.current_resolution_A)),
        ("rlnCurrentImageSize", int(result.work_box)),
        ("rlnPaddingFactor", 2.0),
        ("rlnIsHelix", 0),
        ("rlnFourierSpaceInterpolator", 1),
        ("rlnMinRadiusNnInterpolation", 10),
        ("rlnPixelSize", float(psize)),
        ("rlnNrClasses", int(k)),
        ("rlnNrBodies", 1),
        ("rlnNrGroups", int(n_optics)),
        ("rlnNrOpticsGroups", int(n_optics)),
        ("rlnTau2FudgeFactor", float(params.get("tau2_fudge", 2.0))),
        ("rlnNormCorrectionAverage", float(norm.mean()) if norm.size else 1.0),
        ("rlnSigmaOffsetsAngst", float(result.sigma_offsets_A)),
        ("rlnOrientationalPriorMode", 0),
        ("rlnSigmaPriorRotAngle", 0.0),
        ("rlnSigmaPriorTiltAngle", 0.0),
        ("rlnSigmaPriorPsiAngle", 0.0),
        ("rlnLogLikelihood", float(result.loglik_total)),
        ("rlnAveragePmax", float(result.avg_pmax)),
    ]
    sizes = np.asarray(result.class_sizes)
    shells = _shell_columns(result, box, psize)
    in_limit = shells["rlnAngstromResolution"] >= result.current_resolution_A - 1e-6
    prior = np.asarray(result.prior_offset_px, dtype=np.float64) * psize
    classes = {
        "rlnReferenceImage": [f"{i + 1:06d}@{classes_name}" for i in range(k)],
        "rlnClassDistribution": np.asarray(result.class_distribution, dtype=np.float64),
        "rlnAccuracyRotations": np.asarray(result.accuracy_rot_deg, dtype=np.float64),
        "rlnAccuracyTranslationsAngst": np.asarray(result.accuracy_trans_A, dtype=np.float64),
        "rlnEstimatedResolution": np.asarray(result.resolution_A, dtype=np.float64),
        "rlnOverallFourierCompleteness": np.where(sizes > 0, in_limit.mean(), 0.0),
        "rlnClassPriorOffsetX": prior[:, 0],
        "rlnClassPriorOffsetY": prior[:, 1],
        "rlnClassScore": class_scores(result).astype(np.float64),  # RELION 4 class ranker's
    }
    text = star_pairs("model_general", general) + star_loop("model_classes", classes)
    for i in range(k):
        text += star_loop(
            f"model_class_{i + 1}",
            {
                **shells,
                "rlnSsnrMap": np.asarray(result.ssnr[i], dtype=np.float64),
                "rlnGoldStandardFsc": np.asarray(result.frc[i], dtype=np.float64),
                "rlnFourierCompleteness": np.where(in_limit & (sizes[i] > 0), 1.0, 0.0),
                "rlnReferenceSigma2": np.asarray(result.sigma2_ref[i], dtype=np.float64),
                "rlnReferenceTau2": np.asarray(result.tau2[i], dtype=np.float64),
                "rlnSpectralOrientabilityContribution": np.zeros(box // 2 + 1),
            },
        )
    text += star_loop(
        "model_groups",
        {
            "rlnGroupNumber": [g for g, _ in optics],
            "rlnGroupName": [name for _, name in optics],
            "rlnGroupNrParticles": [int(counts[g]) for g, _ in optics],
            "rlnGroupScaleCorrection": [1.0] * len(optics),
        },
    )
    noise = _noise_by_group(result, [g for g, _ in optics], box)
    for prefix in ("model_group_", "model_optics_group_"):  # 3.1 reads the first, 4.0+ the second
        for g, _ in optics:
            text += star_loop(
                f"{prefix}{g}",
                {
                    "rlnSpectralIndex": shells["rlnSpectralIndex"],
                    "rlnResolution": shells["rlnResolution"],
                    "rlnSigma2Noise": noise[g],
                },
            )
    return text


def _noise_by_group(result: ClassResult, groups: list[int], box: int) -> dict[int, np.ndarray]:
    rows = {int(g): i for i, g in enumerate(np.asarray(result.optics_groups).ravel())}
    sigma = np.asarray(result.sigma2_noise, dtype=np.float64)
    fallback = sigma.mean(axis=0) if sigma.size else np.zeros(box // 2 + 1)
    return {g: sigma[rows[g]] if g in rows else fallback for g in groups}


def sampling_star(particles: ParticleSet, result: ClassResult) -> str:
    """The text of ``_sampling.star`` (in-plane and translational sampling in Å)."""
    p = result.params
    psi = float(p.get("psi_step", 6.0))
    offset_range = float(p.get("max_shift", 0.1)) * particles.box * particles.pixel_size
    offset_step = float(p.get("shift_step", 1.0)) * float(result.work_psize)
    pairs = [
        ("rlnIs3DSampling", 0),
        ("rlnIs3DTranslationalSampling", 0),
        ("rlnPsiStep", psi),
        ("rlnOffsetRange", offset_range),
        ("rlnOffsetStep", offset_step),
        ("rlnHelicalOffsetStep", -1.0),
        ("rlnSamplingPerturbInstance", 0.0),
        ("rlnSamplingPerturbFactor", 0.5),
        ("rlnHealpixOrderOriginal", 2),
        ("rlnPsiStepOriginal", psi),
        ("rlnOffsetRangeOriginal", offset_range),
        ("rlnOffsetStepOriginal", offset_step),
    ]
    return star_pairs("sampling_general", pairs)


def particle_diameter_A(particles: ParticleSet, params: dict[str, Any]) -> float:
    """The mask diameter used (Å): the parameter, else 90% of the box."""
    d = params.get("particle_diameter")
    return float(d) if d else 0.9 * particles.box * particles.pixel_size


def refine_command(particles: ParticleSet, result: ClassResult, names: dict[str, str]) -> str:
    """A relion_refine command line equivalent to the run (RELION reads it on continue)."""
    p = result.params
    work_psize = float(result.work_psize)
    offset_range = float(p.get("max_shift", 0.1)) * particles.box * particles.pixel_size
    parts = [
        f"--o {names['root']}",
        f"--i {relion_path(particles.source_path, particles.project_dir)}",
        "--ctf",
        f"--iter {result.n_iterations}",
        f"--tau2_fudge {fmt(float(p.get('tau2_fudge', 2.0)))}",
        f"--particle_diameter {fmt(particle_diameter_A(particles, p))}",
        f"--K {result.n_classes}",
        "--flatten_solvent --zero_mask",
        f"--strict_highres_exp {fmt(float(p.get('max_resolution', 6.0)))}",
        "--oversampling 1",
        f"--psi_step {fmt(float(p.get('psi_step', 6.0)))}",
        f"--offset_range {fmt(offset_range / particles.pixel_size)}",
        f"--offset_step {fmt(float(p.get('shift_step', 1.0)) * work_psize / particles.pixel_size)}",
        f"--random_seed {int(p.get('seed', 0))}",
    ]
    if p.get("recenter", True):
        parts.append("--center_classes")
    return " ".join(parts) + " --j 1 "


def optimiser_star(
    particles: ParticleSet,
    result: ClassResult,
    iteration: int,
    names: dict[str, str],
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
    pairs: list[tuple[str, Any]] = [
        ("rlnOutputRootName", names["root"]),
        ("rlnModelStarFile", names["model"]),
        ("rlnExperimentalDataStarFile", names["data"]),
        ("rlnOrientSamplingStarFile", names["sampling"]),
        ("rlnCurrentIteration", int(iteration)),
        ("rlnNumberOfIterations", int(result.n_iterations)),
        ("rlnDoSplitRandomHalves", 0),
        ("rlnJoinHalvesUntilThisResolution", -1.0),
        ("rlnAdaptiveOversampleOrder", 1),
        ("rlnAdaptiveOversampleFraction", 0.999),
        ("rlnRandomSeed", int(p.get("seed", 0))),
        ("rlnParticleDiameter", particle_diameter_A(particles, p)),
        ("rlnWidthMaskEdge", 5),
        ("rlnDoZeroMask", 1),
        ("rlnDoSolventFlattening", 1),
        ("rlnDoSolventFscCorrection", 0),
        ("rlnSolventMaskName", "None"),
        ("rlnSolventMask2Name", "None"),
        ("rlnBodyStarFile", "None"),
        ("rlnTauSpectrumName", "None"),
        ("rlnMaximumCoarseImageSize", -1),
        ("rlnHighresLimitExpectation", float(p.get("max_resolution", -1.0))),
        ("rlnLowresLimitExpectation", -1.0),
        ("rlnIncrementImageSize", 10),
        ("rlnDoMapEstimation", 1),
        ("rlnDoFastSubsetOptimisation", 0),
        ("rlnDoExternalReconstruct", 0),
        ("rlnDoStochasticGradientDescent", 0),
        ("rlnDoStochasticEM", 0),
        ("rlnSgdInitialIterations", 50),
        ("rlnSgdFinalIterations", 50),
        ("rlnSgdInBetweenIterations", 200),
        ("rlnSgdInitialResolution", 35.0),
        ("rlnSgdFinalResolution", 15.0),
        ("rlnSgdInitialSubsetSize", 100),
        ("rlnSgdFinalSubsetSize", 500),
        ("rlnSgdMuFactor", 0.0),
        ("rlnSgdSigma2FudgeInitial", 8.0),
        ("rlnSgdSigma2FudgeHalflife", -1),
        ("rlnSgdSkipAnneal", 0),
        ("rlnSgdSubsetSize", -1),
        ("rlnSgdWriteEverySubset", 1),
        ("rlnSgdStepsize", 0.5),
        ("rlnDoAutoRefine", 0),
        ("rlnAutoLocalSearchesHealpixOrder", 4),
        ("rlnNumberOfIterWithoutResolutionGain", 0),
        ("rlnBestResolutionThusFar", best),
        ("rlnNumberOfIterWithoutChangingAssignments", 0),
        ("rlnDoSkipAlign", 0),
        ("rlnDoSkipRotate", 0),
        ("rlnOverallAccuracyRotations", float(acc_rot.mean()) if acc_rot.size else 0.0),
        ("rlnOverallAccuracyTranslationsAngst", float(acc_trans.mean()) if acc_trans.size else 0.0),
        ("rlnChangesOptimalOrientations", float(hist.get("changes_orientations", 0.0))),
        ("rlnChangesOptimalOffsets", float(hist.get("changes_offsets", 0.0))),
        ("rlnChangesOptimalClasses", float(hist.get("changes_classes", 0.0))),
        ("rlnSmallestChangesOrientations", float(hist.get("changes_orientations", 0.0))),
        ("rlnSmallestChangesOffsets", float(hist.get("changes_offsets", 0.0))),
        ("rlnSmallestChangesClasses", int(hist.get("changes_classes_count", 0))),
        ("rlnLocalSymmetryFile", "None"),
        ("rlnDoHelicalRefine", 0),
        ("rlnIgnoreHelicalSymmetry", 0),
        ("rlnFourierMask", "None"),
        ("rlnHelicalTwistInitial", 0.0),
        ("rlnHelicalRiseInitial", 0.0),
        ("rlnHelicalCentralProportion", 0.3),
        ("rlnNrHelicalNStart", 1),
        ("rlnHelicalMaskTubeInnerDiameter", -1.0),
        ("rlnHelicalMaskTubeOuterDiameter", -1.0),
        ("rlnHelicalSymmetryLocalRefinement", 0),
        ("rlnHelicalSigmaDistance", -1.0),
        ("rlnHelicalKeepTiltPriorFixed", 0),
        ("rlnHasConverged", 0),
        ("rlnHasHighFscAtResolLimit", 0),
        ("rlnHasLargeSizeIncreaseIterationsAgo", 0),
        ("rlnDoCorrectNorm", int(bool(np.any(np.abs(norm - 1.0) > 1e-6)))),
        ("rlnDoCorrectScale", 0),
        ("rlnDoCorrectCtf", 1),
        ("rlnDoIgnoreCtfUntilFirstPeak", 0),
        ("rlnCtfDataArePhaseFlipped", int(bool(np.any(particles.phase_flipped)))),
        ("rlnDoOnlyFlipCtfPhases", 0),
        ("rlnRefsAreCtfCorrected", 1),
        ("rlnFixSigmaNoiseEstimates", int(fixed_noise)),
        ("rlnFixSigmaOffsetEstimates", 0),
        ("rlnMaxNumberOfPooledParticles", 1),
    ]
    head = (
        f"# RELION optimiser; version 3.1.3 (written by companion {__version__})\n"
        f"# {refine_command(particles, result, names)}\n"
    )
    return head + star_pairs("optimiser_general", pairs)


# --- a Subset-selection-like output -------------------------------------------------------


def write_selection(
    out_dir: str | Path,
    particles: ParticleSet,
    result: ClassResult,
    classes: Sequence[int],
    classes_mrcs: str | Path,
) -> dict[str, Path]:
    """What RELION's Subset selection writes for chosen classes (1-based numbers):
    ``particles.star`` (their particles, with the 2D columns) and ``class_averages.star``
    (their ``model_classes`` rows, ``rlnReferenceImage`` into ``classes_mrcs``)."""
    from companion.relion import write_particles

    out_dir = Path(out_dir)
    chosen = np.asarray(sorted({int(c) for c in classes}), dtype=np.int64)
    k = result.n_classes
    if chosen.size == 0 or chosen.min() < 1 or chosen.max() > k:
        raise ValueError(f"selected classes must be in 1..{k}, got {list(chosen)}")
    labels = np.asarray(result.class_id, dtype=np.int64) + 1
    idx = np.flatnonzero(np.isin(labels, chosen))
    cols = {name: values[idx] for name, values in data_columns(particles, result).items()}
    project = Path(particles.project_dir)
    inside = _inside(out_dir, project)
    out = {
        "particles": out_dir / "particles.star",
        "class_averages": out_dir / "class_averages.star",
    }
    write_particles(
        out["particles"], particles.subset(idx), cols, image_root=_image_root(out_dir, particles)
    )
    psize = particles.pixel_size
    name = relion_path(classes_mrcs, project) if inside else os.path.abspath(classes_mrcs)
    rows = chosen - 1
    prior = np.asarray(result.prior_offset_px, dtype=np.float64)[rows] * psize
    table = {
        "rlnReferenceImage": [f"{c:06d}@{name}" for c in chosen],
        "rlnClassNumber": chosen,
        "rlnClassDistribution": np.asarray(result.class_distribution, dtype=np.float64)[rows],
        "rlnAccuracyRotations": np.asarray(result.accuracy_rot_deg, dtype=np.float64)[rows],
        "rlnAccuracyTranslationsAngst": np.asarray(result.accuracy_trans_A, dtype=np.float64)[rows],
        "rlnEstimatedResolution": np.asarray(result.resolution_A, dtype=np.float64)[rows],
        "rlnClassPriorOffsetX": prior[:, 0],
        "rlnClassPriorOffsetY": prior[:, 1],
    }
    atomic_write_text(out["class_averages"], star_loop("model_classes", table))
    return out
