"""relion_refine-style 2D outputs (companion.relion.write_class2d_outputs): every field RELION.md
lists for Subset selection and relion_class_ranker, shared root, geometry columns, the classes
stack, and Debian RELION 3.1.3 reading the files (relion_star_handler; relion_refine --continue
parses optimiser + model + sampling + data + classes in one go)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from companion.params import ClassifyParams
from companion.relion import read_particles, write_class2d_outputs
from companion.relion.class2d import class2d_paths, write_selection
from companion.relion.star import read_star

try:
    from fake_result import make_fake_result
except ImportError:  # pragma: no cover - the fixture module is the CryoSPARC I/O engineer's
    from tests.fake_result import make_fake_result

N, K, BOX, PSIZE = 24, 3, 32, 4.0

# RELION.md: what relion_class_ranker / Subset selection read
MODEL_GENERAL = (
    "rlnReferenceDimensionality rlnOriginalImageSize rlnCurrentResolution rlnCurrentImageSize "
    "rlnPaddingFactor rlnFourierSpaceInterpolator rlnMinRadiusNnInterpolation rlnPixelSize "
    "rlnNrClasses rlnNrGroups rlnTau2FudgeFactor rlnNormCorrectionAverage "
    "rlnOrientationalPriorMode rlnSigmaPriorRotAngle rlnSigmaPriorTiltAngle rlnSigmaPriorPsiAngle "
    "rlnLogLikelihood rlnAveragePmax rlnSigmaOffsetsAngst rlnNrOpticsGroups"
).split()
MODEL_CLASSES = (
    "rlnReferenceImage rlnAccuracyRotations rlnAccuracyTranslationsAngst rlnClassDistribution "
    "rlnClassPriorOffsetX rlnClassPriorOffsetY rlnEstimatedResolution"
).split()
MODEL_CLASS_N = (
    "rlnSpectralIndex rlnResolution rlnAngstromResolution rlnSsnrMap rlnGoldStandardFsc "
    "rlnFourierCompleteness rlnReferenceSigma2 rlnReferenceTau2"
).split()
MODEL_OPTICS_N = "rlnSpectralIndex rlnResolution rlnSigma2Noise".split()
OPTIMISER = (
    "rlnModelStarFile rlnExperimentalDataStarFile rlnParticleDiameter "
    "rlnDoIgnoreCtfUntilFirstPeak rlnCtfDataArePhaseFlipped rlnDoOnlyFlipCtfPhases "
    "rlnDoCorrectCtf rlnOutputRootName"
).split()
DATA_ADDED = (
    "rlnAnglePsi rlnOriginXAngst rlnOriginYAngst rlnClassNumber rlnNormCorrection "
    "rlnLogLikeliContribution rlnMaxValueProbDistribution rlnNrOfSignificantSamples "
    "rlnAngleRot rlnAngleTilt"
).split()


def make_project(root: Path, n: int = N, box: int = BOX, psize: float = PSIZE) -> Path:
    """A RELION project: one stack, two optics groups, one micrograph per optics group."""
    rng = np.random.default_rng(1)
    (root / "Extract" / "job002").mkdir(parents=True)
    yy, xx = np.mgrid[:box, :box] - box // 2
    imgs = (rng.normal(size=(n, box, box)) + 2.0 * (xx**2 + yy**2 < 36)).astype(np.float32)
    with mrcfile.new(root / "Extract" / "job002" / "stack.mrcs") as m:
        m.set_data(imgs)
        m.voxel_size = psize
    rows = []
    for i in range(n):
        g = 1 if i < n // 2 else 2
        rows.append(
            f"{i + 1:06d}@Extract/job002/stack.mrcs mic{g}.mrc {g} "
            f"{15000 + 10 * i:.1f} {14500 + 10 * i:.1f} 30.0 {100 + i} {200 + i}"
        )
    text = (
        "\n# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnOpticsGroupName #2\n"
        "_rlnAmplitudeContrast #3\n_rlnSphericalAberration #4\n_rlnVoltage #5\n"
        "_rlnImagePixelSize #6\n_rlnImageSize #7\n_rlnImageDimensionality #8\n"
        f"1 opticsGroup1 0.1 2.7 300 {psize} {box} 2\n2 opticsGroup2 0.1 2.7 300 {psize} {box} 2\n"
        "\n\n# version 30001\n\ndata_particles\n\nloop_\n_rlnImageName #1\n"
        "_rlnMicrographName #2\n_rlnOpticsGroup #3\n_rlnDefocusU #4\n_rlnDefocusV #5\n"
        "_rlnDefocusAngle #6\n_rlnCoordinateX #7\n_rlnCoordinateY #8\n" + "\n".join(rows) + "\n\n"
    )
    star = root / "Extract" / "job002" / "particles.star"
    star.write_text(text)
    return star


@pytest.fixture
def project(tmp_path, monkeypatch):
    proj = tmp_path / "project"
    proj.mkdir()
    star = make_project(proj)
    monkeypatch.chdir(proj)
    particles = read_particles(star, project_dir=proj)
    result = make_fake_result(N, K, BOX, psize=PSIZE, optics_groups=(1, 2), seed=3)
    result.params = ClassifyParams(n_classes=K, psi_step=12.0, seed=7).resolved()
    out = proj / "External" / "job003"
    paths = write_class2d_outputs(out, "run", particles, result, 3)
    return proj, particles, result, paths


def test_file_set_and_shared_root(project):
    proj, _, _, paths = project
    assert set(paths) == {"data", "model", "optimiser", "sampling", "classes"}
    assert paths == class2d_paths(proj / "External" / "job003", "run", 3)
    for p in paths.values():
        assert p.is_file(), p
    names = sorted(p.name for p in (proj / "External" / "job003").iterdir())
    assert names == sorted(p.name for p in paths.values())  # no temporary files left
    opt = read_star(paths["optimiser"])["optimiser_general"]
    assert opt["rlnOutputRootName"] == "External/job003/run"
    # relion_display derives the data file from the optimiser's root: all must share it
    for key, label in [
        ("model", "rlnModelStarFile"),
        ("data", "rlnExperimentalDataStarFile"),
        ("sampling", "rlnOrientSamplingStarFile"),
    ]:
        assert opt[label] == f"External/job003/run_it003_{key}.star"
        assert (proj / opt[label]).resolve() == paths[key].resolve()


def test_data_star_keeps_input_and_adds_2d_columns(project):
    proj, particles, result, paths = project
    src = read_star(proj / "Extract" / "job002" / "particles.star")
    blocks = read_star(paths["data"])
    df = blocks["particles"]
    in_cols = list(src["particles"].columns)
    assert list(df.columns[: len(in_cols)]) == in_cols  # passthrough, in order
    assert set(DATA_ADDED) <= set(df.columns)
    assert len(df) == N
    assert list(df["rlnImageName"]) == list(src["particles"]["rlnImageName"])
    np.testing.assert_array_equal(df["rlnClassNumber"].to_numpy(), result.class_id + 1)
    assert df["rlnClassNumber"].min() == 1 and df["rlnClassNumber"].max() == K
    np.testing.assert_allclose(df["rlnAnglePsi"], result.psi_deg, atol=1e-4)
    np.testing.assert_allclose(df["rlnOriginXAngst"], result.shift_px[:, 0] * PSIZE, atol=1e-4)
    np.testing.assert_allclose(df["rlnOriginYAngst"], result.shift_px[:, 1] * PSIZE, atol=1e-4)
    np.testing.assert_allclose(df["rlnMaxValueProbDistribution"], result.max_prob, atol=1e-5)
    np.testing.assert_array_equal(df["rlnNrOfSignificantSamples"], result.n_significant)
    assert (df["rlnAngleRot"] == 0).all() and (df["rlnAngleTilt"] == 0).all()
    optics = blocks["optics"]
    for label in ("rlnVoltage", "rlnSphericalAberration", "rlnImagePixelSize"):
        assert label in optics.columns
    assert len(optics) == 2


def test_model_star_has_every_field_subset_selection_and_class_ranker_read(project):
    proj, particles, result, paths = project
    model = read_star(paths["model"])
    general = model["model_general"]
    assert set(MODEL_GENERAL) <= set(general)
    assert general["rlnNrClasses"] == K
    assert general["rlnOriginalImageSize"] == BOX
    assert general["rlnPixelSize"] == pytest.approx(PSIZE)
    assert general["rlnNrOpticsGroups"] == len(read_star(paths["data"])["optics"])
    assert general["rlnNrGroups"] == len(model["model_groups"])
    classes = model["model_classes"]
    assert set(MODEL_CLASSES) <= set(classes.columns)
    assert len(classes) == K
    stack = paths["classes"]
    for i, ref in enumerate(classes["rlnReferenceImage"]):
        idx, name = ref.split("@")
        assert idx == f"{i + 1:06d}"  # row i is class i
        assert (proj / name).resolve() == stack.resolve()
    np.testing.assert_allclose(
        classes["rlnClassDistribution"], result.class_distribution, atol=1e-6
    )
    np.testing.assert_allclose(classes["rlnEstimatedResolution"], result.resolution_A, atol=1e-4)
    for k in range(1, K + 1):
        table = model[f"model_class_{k}"]
        assert set(MODEL_CLASS_N) <= set(table.columns)
        assert len(table) == BOX // 2 + 1
        np.testing.assert_allclose(table["rlnSsnrMap"], result.ssnr[k - 1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(table["rlnGoldStandardFsc"], result.frc[k - 1], atol=1e-6)
    groups = model["model_groups"]
    assert {"rlnGroupNumber", "rlnGroupName", "rlnGroupNrParticles"} <= set(groups.columns)
    assert int(groups["rlnGroupNrParticles"].sum()) == N
    for g in (1, 2):
        for prefix in ("model_optics_group_", "model_group_"):
            table = model[f"{prefix}{g}"]
            assert set(MODEL_OPTICS_N) <= set(table.columns)
            assert len(table) == BOX // 2 + 1
            assert (table["rlnSigma2Noise"] > 0).all()


def test_optimiser_has_every_field_of_relion_refine_2d(project, real_data):
    _, _, _, paths = project
    real = read_star(real_data / "run_it025_optimiser_2D.star")["optimiser_general"]
    ours = read_star(paths["optimiser"])["optimiser_general"]
    assert set(real) <= set(ours)
    assert set(OPTIMISER) <= set(ours)
    assert ours["rlnDoCorrectCtf"] == 1
    assert ours["rlnCurrentIteration"] == 3
    assert ours["rlnParticleDiameter"] == pytest.approx(0.9 * BOX * PSIZE)
    assert ours["rlnCtfDataArePhaseFlipped"] == 0
    assert ours["rlnRandomSeed"] == 7
    header = paths["optimiser"].read_text().splitlines()[:2]
    assert header[0].startswith("# RELION optimiser") and "version" in header[0]
    assert header[1].startswith("# --o External/job003/run --i Extract/job002/particles.star")


def test_sampling_matches_relion_layout(project, real_data):
    _, _, result, paths = project
    real = read_star(real_data / "run_it025_sampling_2D.star")["sampling_general"]
    ours = read_star(paths["sampling"])["sampling_general"]
    assert set(ours) == set(real)
    # RELION states the coarse step before one order of oversampling: a 12° search is 24°
    assert ours["rlnPsiStep"] == pytest.approx(24.0)
    assert ours["rlnPsiStepOriginal"] == pytest.approx(24.0)
    assert ours["rlnOffsetRange"] == pytest.approx(0.1 * BOX * PSIZE)
    step = result.params["shift_step"] * result.work_psize
    assert ours["rlnOffsetStep"] == pytest.approx(2 * step)
    opt = read_star(paths["optimiser"])["optimiser_general"]
    assert opt["rlnAdaptiveOversampleOrder"] == 1
    command = paths["optimiser"].read_text().splitlines()[1]
    assert " --oversampling 1 --psi_step 24 " in command
    assert f" --offset_step {2 * step / PSIZE:g} " in command


def test_classes_stack(project):
    _, _, result, paths = project
    with mrcfile.open(paths["classes"]) as m:
        assert m.data.shape == (K, BOX, BOX)
        assert m.data.dtype == np.float32
        assert float(m.voxel_size.x) == pytest.approx(PSIZE)
        assert m.header.ispg == 0  # an image stack, not a volume
        np.testing.assert_array_equal(m.data, result.averages)


def test_paths_absolute_outside_the_project(tmp_path, monkeypatch):
    proj = tmp_path / "project"
    proj.mkdir()
    star = make_project(proj)
    monkeypatch.chdir(proj)
    particles = read_particles(star, project_dir=proj)
    result = make_fake_result(N, K, BOX, psize=PSIZE, optics_groups=(1, 2))
    out = tmp_path / "elsewhere"
    paths = write_class2d_outputs(out, "run", particles, result, 1)
    model = read_star(paths["model"])
    ref = model["model_classes"]["rlnReferenceImage"].iloc[0]
    assert Path(ref.split("@")[1]).is_absolute() and Path(ref.split("@")[1]).is_file()
    opt = read_star(paths["optimiser"])["optimiser_general"]
    assert Path(opt["rlnModelStarFile"]).is_absolute()


def test_selection_outputs(project):
    proj, particles, result, paths = project
    out = proj / "External" / "job003"
    sel = write_selection(out, particles, result, [1, 3], paths["classes"])
    parts = read_star(sel["particles"])
    chosen = np.isin(result.class_id + 1, [1, 3])
    assert len(parts["particles"]) == int(chosen.sum())
    assert set(parts["particles"]["rlnClassNumber"]) == {1, 3}
    assert len(parts["optics"]) >= 1
    # laid out as Subset selection saves class averages: a data_ block, rlnClassNumber last
    text = sel["class_averages"].read_text()
    assert "\ndata_\n" in text
    avgs = read_star(sel["class_averages"])[""]
    assert list(avgs.columns)[-2:] == ["rlnIsHelix", "rlnClassNumber"]
    assert list(avgs["rlnIsHelix"]) == [0, 0]
    assert list(avgs["rlnClassNumber"]) == [1, 3]
    assert [r.split("@")[0] for r in avgs["rlnReferenceImage"]] == ["000001", "000003"]
    with pytest.raises(ValueError):
        write_selection(out, particles, result, [K + 1], paths["classes"])


def _star_handler(src: Path, dst: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["relion_star_handler", "--i", str(src), "--o", str(dst)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.relion
def test_relion_star_handler_reads_every_star(project):
    proj, particles, result, paths = project
    out = proj / "External" / "job003"
    sel = write_selection(out, particles, result, [2], paths["classes"])
    for src in [paths[k] for k in ("data", "model", "optimiser", "sampling")] + list(sel.values()):
        r = _star_handler(src, proj / f"copy_{src.name}")
        assert r.returncode == 0, f"{src}: {r.stderr[-2000:]}"
        assert "ERROR" not in r.stderr, r.stderr
    copy = read_star(proj / "copy_run_it003_data.star")
    assert len(copy["particles"]) == N
    assert list(copy["particles"]["rlnClassNumber"]) == list(result.class_id + 1)
    # 3.1.3's star_handler copies particle tables only; the other files must parse cleanly
    selected = read_star(proj / "copy_particles.star")["particles"]
    assert set(selected["rlnClassNumber"]) == {2}


@pytest.mark.relion
def test_relion_refine_continues_from_our_files(tmp_path, monkeypatch):
    """relion_refine 3.1.3 --continue reads optimiser, model, sampling, data and classes.

    RELION 3.1 forms groups from micrograph names, as companion does (one micrograph per
    optics group here; tests/test_relion_groups.py has several per optics group).
    """
    if shutil.which("relion_refine") is None:
        pytest.skip("relion_refine not on PATH")
    proj = tmp_path / "project"
    proj.mkdir()
    star = make_project(proj)
    monkeypatch.chdir(proj)
    particles = read_particles(star, project_dir=proj)
    result = make_fake_result(N, K, BOX, psize=PSIZE, optics_groups=(1, 2), seed=5)
    result.params = ClassifyParams(n_classes=K, psi_step=12.0, max_resolution=10.0).resolved()
    result.current_resolution_A = 10.0
    result.work_box = 24
    paths = write_class2d_outputs(proj / "External" / "job004", "run", particles, result, 2)
    cmd = [
        "relion_refine",
        "--continue",
        os.path.relpath(paths["optimiser"], proj),
        "--o",
        "External/job004/ct",
        "--iter",
        "3",
        "--j",
        "1",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    assert "ERROR" not in r.stderr
    ct = proj / "External" / "job004" / "ct_it003_model.star"
    assert ct.is_file()
    assert read_star(ct)["model_general"]["rlnNrClasses"] == K
    # rlnClassScore is RELION 4's class-ranker label: 3.1 warns, keeps it and goes on
    assert not re.search(r"unknown label: rln(?!NrOpticsGroups|ClassScore)", r.stdout + r.stderr)
