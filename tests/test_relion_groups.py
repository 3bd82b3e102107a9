"""Micrograph groups end to end (issue 10, "Breaks a user" 1 and 2): ParticleSet.group from
rlnGroupName / rlnMicrographName / optics group (.cs: micrograph uid / path), rlnGroupNumber
and one data_model_group_N per group in the RELION outputs, per-group noise spectra and
intensity scale in the classifier, the sampling stated before oversampling, and Debian's
RELION 3.1.3 continuing from the files (it segfaulted when the model's groups did not match
the data's micrographs)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from companion.classify import classify
from companion.classify import fourier as fo
from companion.classify.groups import MIN_GROUP_PARTICLES, noise_rows
from companion.classify.score import Search
from companion.params import ClassifyParams
from companion.particles import CtfParams, ParticleSet
from companion.relion import read_particles, write_class2d_outputs
from companion.relion.class2d import write_selection
from companion.relion.star import read_star

try:
    from classify_data import make_particles
    from fake_result import make_fake_result
    from test_relion_class2d import BOX, PSIZE, K, N, make_project
except ImportError:  # pragma: no cover
    from tests.classify_data import make_particles
    from tests.fake_result import make_fake_result
    from tests.test_relion_class2d import BOX, PSIZE, K, N, make_project

MICS = ("micA.mrc", "mic1.mrc", "micC.mrc", "mic2.mrc")  # order of first appearance


def four_micrographs(root: Path) -> Path:
    """The class2d test project with four micrographs (6 particles each), two per optics group."""
    star = make_project(root)
    text = star.read_text().replace(" mic1.mrc ", " micA.mrc ", 6)
    star.write_text(text.replace(" mic2.mrc ", " micC.mrc ", 6))
    return star


@pytest.fixture
def project(tmp_path, monkeypatch):
    proj = tmp_path / "project"
    proj.mkdir()
    star = four_micrographs(proj)
    monkeypatch.chdir(proj)
    return proj, read_particles(star, project_dir=proj)


def grouped_result(particles: ParticleSet, seed: int = 5):
    """A fake result with one distinct noise spectrum and scale per group."""
    g = len(particles.group_names)
    r = make_fake_result(N, K, BOX, psize=PSIZE, optics_groups=(1, 2), seed=seed)
    r.sigma2_noise = (np.arange(1, g + 1)[:, None] * np.ones((1, BOX // 2 + 1))).astype(np.float32)
    r.group_scale = np.linspace(0.8, 1.2, g).astype(np.float32)
    r.params = ClassifyParams(n_classes=K, psi_step=6.0, max_resolution=10.0).resolved()
    r.work_box = 24
    return r


# ------------------------------------------------------------------ reading groups


def test_groups_default_to_optics_groups_and_follow_subset():
    n = 6
    zeros = np.zeros(n)
    ps = ParticleSet(
        source_path=Path("x.star"), project_dir=Path("."), stack_paths=[Path("a.mrcs")],
        stack_index=np.zeros(n), image_index=np.arange(n), box=16, psize=1.0,
        optics_group=[2, 2, 1, 1, 2, 1],
        ctf=CtfParams(zeros, zeros, zeros, zeros + 300, zeros + 2.7, zeros + 0.1, zeros,
                      zeros, zeros + 1),
        contrast=1.0, ctf_premultiplied=False, phase_flipped=False, host="relion",
    )  # fmt: skip
    assert ps.group_names == ("opticsGroup2", "opticsGroup1")
    assert ps.group.dtype == np.int32 and list(ps.group) == [0, 0, 1, 1, 0, 1]
    sub = ps.subset(np.array([5, 0]))
    assert list(sub.group) == [1, 0] and sub.group_names == ps.group_names
    with pytest.raises(ValueError, match="group"):
        replace(ps, group=np.full(n, 2), group_names=("a", "b"))


def test_star_groups_from_group_name_else_micrograph_else_optics(project, tmp_path):
    proj, ps = project
    assert ps.group_names == MICS
    assert list(np.bincount(ps.group)) == [6, 6, 6, 6]
    star = proj / "Extract" / "job002" / "particles.star"
    text = star.read_text()
    # rlnGroupName wins over the micrograph
    lines = text.splitlines()
    at = lines.index("_rlnCoordinateY #8")
    lines.insert(at + 1, "_rlnGroupName #9")
    rows = [i for i, line in enumerate(lines) if line.startswith("0000")]
    for j, i in enumerate(rows):
        lines[i] += f" g{j % 2}"
    named = proj / "named.star"
    named.write_text("\n".join(lines) + "\n\n")
    assert read_particles(named, project_dir=proj).group_names == ("g0", "g1")
    # no micrograph names: the optics group
    plain = proj / "plain.star"
    plain.write_text(text.replace("_rlnMicrographName", "_rlnCoordinateZ"))
    got = read_particles(plain, project_dir=proj)
    assert got.group_names == ("opticsGroup1", "opticsGroup2")


def test_cs_groups_from_micrograph_uid_else_path(tmp_path):
    try:
        from test_cryosparc_io import _dataset
    except ImportError:  # pragma: no cover
        from tests.test_cryosparc_io import _dataset
    from companion.cryosparc import read_particles as read_cs

    (tmp_path / "J1").mkdir()
    for name in ("a.mrcs", "b.mrcs"):
        (tmp_path / "J1" / name).write_bytes(b"")
    cs = tmp_path / "p.cs"
    _dataset(6, ["J1/a.mrcs", "J1/b.mrcs"]).save(str(cs))
    ps = read_cs(cs, project_dir=tmp_path)
    assert ps.group_names == ("J1/a.mrcs", "J1/b.mrcs") and list(ps.group) == [0, 1] * 3
    uids = np.array([7, 7, 9, 9, 7, 3], dtype=np.uint64)
    _dataset(6, ["J1/a.mrcs"], **{"location/micrograph_uid": uids}).save(str(cs))
    ps = read_cs(cs, project_dir=tmp_path)
    assert ps.group_names == ("7", "9", "3") and list(ps.group) == [0, 0, 1, 1, 0, 2]


def test_noise_rows_pool_small_groups_per_optics_group():
    m = MIN_GROUP_PARTICLES
    # groups 0 and 2 large; 1 and 3 small in optics group 1; 4 small in optics group 2
    sizes = [m, 3, m + 5, 4, 2]
    optics_of = [1, 1, 2, 1, 2]
    group = np.repeat(np.arange(5), sizes)
    optics = np.repeat(optics_of, sizes)
    per_particle, per_group = noise_rows(group, optics, 6)
    assert list(per_group[:5]) == [0, 2, 1, 2, 3]
    assert np.array_equal(per_particle, per_group[group])
    # rows stay bounded: a million particles on 100 000 micrographs of 10
    g = np.repeat(np.arange(100_000), 10)
    _, rows = noise_rows(g, np.ones_like(g), 100_000)
    assert rows.max() == 0


# ------------------------------------------------------------------ writing groups


def test_data_and_model_carry_every_group(project):
    proj, ps = project
    r = grouped_result(ps)
    paths = write_class2d_outputs(proj / "External" / "job003", "run", ps, r, 2)
    data = read_star(paths["data"])["particles"]
    assert list(data["rlnGroupNumber"]) == list(ps.group + 1)
    assert "rlnGroupName" not in data  # RELION forms the same groups from rlnMicrographName
    model = read_star(paths["model"])
    assert model["model_general"]["rlnNrGroups"] == 4
    groups = model["model_groups"]
    assert list(groups["rlnGroupNumber"]) == [1, 2, 3, 4]
    assert list(groups["rlnGroupName"]) == list(MICS)
    assert list(groups["rlnGroupNrParticles"]) == [6, 6, 6, 6]
    # Subset selection's "Regroup" looks up each particle's rlnGroupNumber in model_groups
    # (it failed "out of bounds! (1 objects present)" with one row per optics group)
    assert set(data["rlnGroupNumber"]) <= set(groups["rlnGroupNumber"])
    np.testing.assert_allclose(groups["rlnGroupScaleCorrection"], r.group_scale, rtol=1e-6)
    for g in range(4):
        np.testing.assert_allclose(model[f"model_group_{g + 1}"]["rlnSigma2Noise"], g + 1.0)
    # 4.0+: one spectrum per optics group, the particle-weighted mean of its groups
    np.testing.assert_allclose(model["model_optics_group_1"]["rlnSigma2Noise"], 1.5)
    np.testing.assert_allclose(model["model_optics_group_2"]["rlnSigma2Noise"], 3.5)
    assert "model_group_5" not in model
    opt = read_star(paths["optimiser"])["optimiser_general"]
    assert opt["rlnDoCorrectScale"] == 1
    # a selection renumbers the groups it holds, as RELION would read them
    chosen = int(r.class_id[ps.group == 2][0]) + 1
    sel = write_selection(proj / "External" / "job003", ps, r, [chosen], paths["classes"])
    parts = read_star(sel["particles"])["particles"]
    numbers = parts["rlnGroupNumber"].to_numpy()
    assert numbers.min() == 1 and set(numbers) == set(range(1, numbers.max() + 1))


def test_group_names_written_when_relion_cannot_form_them(tmp_path, monkeypatch):
    sim = make_particles(tmp_path / "sim", n=12, n_classes=2, box=16, n_stacks=3)
    ps = replace(sim.particles, host="relion", group=np.arange(12) % 3,
                 group_names=("x 1", "y", "z"))  # fmt: skip
    r = make_fake_result(12, 2, 16, optics_groups=(1,))
    r.params = ClassifyParams(n_classes=2).resolved()
    monkeypatch.chdir(tmp_path)
    paths = write_class2d_outputs(tmp_path / "out", "run", ps, r, 1)
    data = read_star(paths["data"])["particles"]
    assert list(data["rlnGroupName"]) == ["x 1", "y", "z"] * 4
    assert list(data["rlnGroupNumber"]) == [1, 2, 3] * 4
    model = read_star(paths["model"])
    assert list(model["model_groups"]["rlnGroupName"]) == ["x 1", "y", "z"]
    # a result from before groups (one spectrum per optics group) still writes every group
    np.testing.assert_allclose(model["model_group_3"]["rlnSigma2Noise"], 1.0)


@pytest.mark.parametrize("flavour", ["3.1", "4.0", "5.0"])
def test_version_flavours(project, flavour):
    proj, ps = project
    ps.passthrough.relion_version = flavour
    paths = write_class2d_outputs(proj / "External" / "job003", "run", ps, grouped_result(ps), 2)
    header = "# version 50001" if flavour == "5.0" else "# version 30001"
    for key in ("data", "model", "optimiser", "sampling"):
        text = paths[key].read_text()
        assert header in text and len(set(re.findall(r"# version \d+", text))) == 1, key
    general = read_star(paths["model"])["model_general"]
    assert ("rlnNrOpticsGroups" in general) == (flavour != "3.1")
    assert paths["optimiser"].read_text().startswith(f"# RELION optimiser; version {flavour}")


def test_optimiser_cosmetics_and_classes_header(project):
    proj, ps = project
    r = grouped_result(ps)
    r.params = ClassifyParams(n_classes=K, seed=0).resolved()
    paths = write_class2d_outputs(proj / "External" / "job003", "run", ps, r, 2)
    opt = read_star(paths["optimiser"])["optimiser_general"]
    assert opt["rlnRandomSeed"] != 0  # RELION skips randomising the particle order at 0
    assert opt["rlnMaxNumberOfPooledParticles"] == 3
    assert " --pool 3 " in paths["optimiser"].read_text().splitlines()[1]
    with mrcfile.open(paths["classes"]) as m:  # as relion_image_handler writes a stack
        assert int(m.header.ispg) == 0 and int(m.header.mz) == 1
        np.testing.assert_allclose(m.header.cella.tolist(), (BOX * PSIZE, BOX * PSIZE, PSIZE))
    # the current resolution is RELION's reading of the written SSNR map
    model = read_star(paths["model"])
    ssnr = np.stack([model[f"model_class_{k + 1}"]["rlnSsnrMap"] for k in range(K)])
    last = max(int(np.flatnonzero(row[1:] < 1)[0]) for row in ssnr)
    assert model["model_general"]["rlnCurrentResolution"] == pytest.approx(BOX * PSIZE / last)


def test_sampling_is_stated_before_oversampling(project):
    proj, ps = project
    r = grouped_result(ps)  # searched with 6° and 1 working pixel
    paths = write_class2d_outputs(proj / "External" / "job003", "run", ps, r, 2)
    sampling = read_star(paths["sampling"])["sampling_general"]
    assert sampling["rlnPsiStep"] == pytest.approx(12.0)
    assert sampling["rlnOffsetStep"] == pytest.approx(2 * r.work_psize)
    command = paths["optimiser"].read_text().splitlines()[1]
    assert " --oversampling 1 --psi_step 12 " in command
    assert f" --offset_step {2 * r.work_psize / PSIZE:g} " in command


# ------------------------------------------------------------------ the classifier


def _two_groups(tmp: Path, gain: float) -> tuple[ParticleSet, np.ndarray]:
    """The same four shapes on two 'micrographs', the second with ``gain``× the signal."""
    a = make_particles(tmp / "a", n=300, n_classes=4, box=48, psize=3.0, snr=1.0, seed=0)
    b = make_particles(tmp / "b", n=300, n_classes=4, box=48, psize=3.0, snr=gain**2,
                       seed=1, refs=a.refs)  # fmt: skip
    pa, pb = a.particles, b.particles
    ctf = CtfParams(**{k: np.concatenate([getattr(pa.ctf, k), getattr(pb.ctf, k)])
                       for k in pa.ctf.as_dict()})  # fmt: skip
    ps = ParticleSet(
        source_path=tmp / "p.star", project_dir=tmp, stack_paths=pa.stack_paths + pb.stack_paths,
        stack_index=np.concatenate([pa.stack_index, pb.stack_index + len(pa.stack_paths)]),
        image_index=np.concatenate([pa.image_index, pb.image_index]), box=48, psize=3.0,
        optics_group=1, ctf=ctf, contrast=1.0, ctf_premultiplied=False, phase_flipped=False,
        host="relion", group=np.repeat([0, 1], 300), group_names=("dim", "bright"),
    )  # fmt: skip
    return ps, np.concatenate([a.labels, b.labels])


def test_classifier_estimates_noise_and_scale_per_group(tmp_path):
    """Signal 1.5× stronger on the second micrograph: its scale comes out about 1.5× the
    first's (measured 1.45-1.46 over seeds 1-3; with equal signal 0.993-0.995), the first
    below 1, the second above."""
    ps, _ = _two_groups(tmp_path, 1.5)
    p = ClassifyParams(n_classes=4, max_resolution=8.0, online_iters=4, batch_per_class=60,
                       full_iters=2, seed=1, device="cpu")  # fmt: skip
    r = classify(ps, p)
    assert r.sigma2_noise.shape == (2, 48 // 2 + 1)
    assert r.group_scale.shape == (2,) and r.group_scale.dtype == np.float32
    assert r.group_scale[0] < 1.0 < r.group_scale[1]
    assert 1.25 < r.group_scale[1] / r.group_scale[0] < 1.75
    same, _ = _two_groups(tmp_path / "same", 1.0)
    s = classify(same, p).group_scale
    assert 0.95 < s[1] / s[0] < 1.05
    assert float(r.group_scale.mean()) == pytest.approx(1.0, abs=1e-4)  # equal counts


# ------------------------------------------------------------------ the real RELION


def _continue(proj: Path, paths: dict[str, Path], out: str, iters: int = 3
              ) -> subprocess.CompletedProcess:  # fmt: skip
    cmd = ["relion_refine", "--continue", os.path.relpath(paths["optimiser"], proj),
           "--o", out, "--iter", str(iters), "--j", "1"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=proj)


@pytest.mark.relion
def test_relion_continues_with_micrograph_groups_and_the_same_sampling(project):
    """relion_refine 3.1.3 --continue on four micrographs in two optics groups (it segfaulted
    in storeWeightedSums with one group per optics group), and the sampling it prints after
    oversampling is the one companion searched with."""
    if shutil.which("relion_refine") is None:
        pytest.skip("relion_refine not on PATH")
    proj, ps = project
    r = grouped_result(ps)
    geom = fo.Geometry.create(BOX, PSIZE, 2 * PSIZE, None)  # no Fourier cropping
    r.work_box, r.work_psize = geom.work_box, geom.work_psize
    search = Search.create(geom, r.params["psi_step"], r.params["max_shift"],
                           r.params["shift_step"], "exhaustive", np)  # fmt: skip
    paths = write_class2d_outputs(proj / "External" / "job004", "run", ps, r, 2)
    run = _continue(proj, paths, "External/job004/ct")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "ERROR" not in run.stderr
    for g in range(1, 5):  # RELION formed the same four groups the model holds
        assert f"particles in group {g}" in out
    assert "particles in group 5" not in out
    model = read_star(proj / "External" / "job004" / "ct_it003_model.star")
    assert list(model["model_groups"]["rlnGroupName"]) == list(MICS)
    fine = re.search(r"Oversampling= 1 .*\n\s*OrientationalSampling= (\S+) NrOrientations= (\d+)"
                     r"\n\s*TranslationalSampling= (\S+) NrTranslations= (\d+)", out)  # fmt: skip
    assert fine, out[-3000:]
    psi, n_orient, step_a, n_trans = (float(x) for x in fine.groups())
    assert psi == pytest.approx(r.params["psi_step"])
    assert n_orient / 4 == search.n_rot  # RELION 2D counts 4 (unused) directions per psi
    assert step_a == pytest.approx(r.params["shift_step"] * r.work_psize)
    # RELION's fine grid is its coarse grid oversampled, companion's a disc at the fine step:
    # the counts agree to the disc's edge (the bug gave 4×)
    assert 0.7 < n_trans / search.n_shift < 1.4


@pytest.mark.relion
def test_relion_continues_from_a_real_classification(tmp_path, monkeypatch):
    """The classifier's own result (three micrograph stacks, pooled into one noise row),
    written and continued by relion_refine 3.1.3 for one iteration."""
    if shutil.which("relion_refine") is None:
        pytest.skip("relion_refine not on PATH")
    sim = make_particles(tmp_path, n=120, n_classes=2, box=32, psize=4.0, snr=1.0, n_stacks=3)
    ps = replace(sim.particles, group=sim.particles.stack_index,
                 group_names=("m0", "m1", "m2"))  # fmt: skip
    p = ClassifyParams(n_classes=2, max_resolution=10.0, online_iters=2, batch_per_class=30,
                       full_iters=1, seed=2, device="cpu")  # fmt: skip
    r = classify(ps, p)
    assert r.sigma2_noise.shape[0] == 3 and np.allclose(r.group_scale, 1.0)  # one pooled row
    monkeypatch.chdir(tmp_path)
    paths = write_class2d_outputs(tmp_path / "External" / "job001", "run", ps, r, r.iteration)
    run = _continue(tmp_path, paths, "External/job001/ct", r.iteration + 1)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    model = read_star(tmp_path / "External" / "job001" / f"ct_it{r.iteration + 1:03d}_model.star")
    assert list(model["model_groups"]["rlnGroupName"]) == ["m0", "m1", "m2"]
