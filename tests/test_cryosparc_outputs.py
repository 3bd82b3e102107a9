"""CryoSPARC conventions and 2D outputs: alignments2D fields, pose/shift, class averages."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from cryosparc.dataset import Dataset
from fake_result import make_fake_result

from companion.cryosparc import (
    alignments2d_fields,
    class_average_fields,
    read_particles,
    write_class2d_outputs,
    write_particles,
)
from companion.cryosparc import conventions as cv

# alignments2D/* as CRYOSPARC.md lists them (name, dtype, shape), in CryoSPARC's order
SPEC_ALIGNMENTS2D = [
    ("alignments2D/split", "<u4", ()),
    ("alignments2D/shift", "<f4", (2,)),
    ("alignments2D/pose", "<f4", ()),
    ("alignments2D/psize_A", "<f4", ()),
    *[
        (f"alignments2D/{f}", "<f4", ())
        for f in (
            "error error_min resid_pow slice_pow image_pow cross_cor alpha alpha_min weight "
            "pose_ess shift_ess class_posterior"
        ).split()
    ],
    ("alignments2D/class", "<u4", ()),
    ("alignments2D/class_ess", "<f4", ()),
]


@pytest.fixture
def j2(real_data):
    """The real CryoSPARC 2D export: particles with alignments2D as CryoSPARC writes them."""
    return real_data / "cryosparc_J2_particles_exported.cs"


def _descr(fields: dict[str, np.ndarray]) -> list[tuple]:
    return [(name, a.dtype.str, a.shape[1:]) for name, a in fields.items()]


# ----------------------------------------------------------------------------- fields


def test_alignments2d_fields_match_spec_and_real_export(j2):
    ps = read_particles(j2)
    result = make_fake_result(len(ps), 5, ps.box, psize=ps.pixel_size)
    fields = alignments2d_fields(ps, result)
    assert _descr(fields) == SPEC_ALIGNMENTS2D
    real = [f for f in Dataset.load(j2).descr() if f[0].startswith("alignments2D/")]
    mine = Dataset([("uid", np.arange(len(ps), dtype=np.uint64)), *fields.items()]).descr()[1:]
    assert mine == real  # field for field: names, order, dtypes, shapes
    assert all(a.shape[0] == len(ps) for a in fields.values())


def test_alignments2d_values_come_from_the_result(j2):
    ps = read_particles(j2)
    r = make_fake_result(len(ps), 4, ps.box, seed=7)
    f = alignments2d_fields(ps, r)
    np.testing.assert_array_equal(f["alignments2D/class"], r.class_id)
    assert not f["alignments2D/split"].any()  # CryoSPARC 2D writes 0 (the real export: all 0)
    np.testing.assert_array_equal(f["alignments2D/class_posterior"], r.class_prob)
    np.testing.assert_array_equal(f["alignments2D/class_ess"], r.class_ess)
    np.testing.assert_array_equal(f["alignments2D/psize_A"], ps.psize)
    np.testing.assert_allclose(f["alignments2D/shift"], r.shift_px, rtol=1e-6)
    np.testing.assert_allclose(
        cv.psi_from_pose(f["alignments2D/pose"]) % 360, r.psi_deg % 360, atol=1e-4
    )
    np.testing.assert_allclose(f["alignments2D/error"], -2 * r.loglik, rtol=1e-6)
    for name, value in (
        ("alpha", 1),
        ("alpha_min", 1),
        ("weight", 0),
        ("error_min", 0),
        ("resid_pow", 0),
        ("pose_ess", 0),
        ("shift_ess", 0),
    ):
        assert np.all(f[f"alignments2D/{name}"] == value), name


def test_error_relation_is_cryosparcs(j2):
    """error = image_pow - cross_cor + slice_pow and alpha_min = cross_cor / (2 slice_pow),
    as in the real export; companion writes them that way when the classifier gives powers."""
    real = Dataset.load(j2)
    img, cc, sl = (
        np.asarray(real[f"alignments2D/{k}"]) for k in ("image_pow", "cross_cor", "slice_pow")
    )
    np.testing.assert_allclose(real["alignments2D/error"], img - cc + sl, rtol=1e-5)
    np.testing.assert_allclose(real["alignments2D/alpha_min"], cc / (2 * sl), rtol=1e-5)
    ps = read_particles(j2)
    base = make_fake_result(len(ps), 5, ps.box)
    r = replace(base, image_pow=img, cross_cor=cc, slice_pow=sl)
    f = alignments2d_fields(ps, r)
    np.testing.assert_allclose(f["alignments2D/error"], real["alignments2D/error"], rtol=1e-5)
    np.testing.assert_allclose(
        f["alignments2D/alpha_min"], real["alignments2D/alpha_min"], rtol=1e-5
    )


# ----------------------------------------------------------------------------- geometry


def test_pose_and_shift_round_trip_with_relion_values():
    psi = np.array([-180.0, -90.0, -30.0, -1e-9, 0.0, 45.0, 179.9, 190.0, 359.99], np.float32)
    pose = cv.pose_from_psi(psi)
    assert pose.dtype == np.float32 and np.all((pose >= 0) & (pose < 2 * np.pi))
    np.testing.assert_allclose(pose[[1, 2, 4, 5]], np.radians([270, 330, 0, 45]), rtol=1e-6)
    back = cv.psi_from_pose(pose)
    diff = (back - psi + 180) % 360 - 180
    np.testing.assert_allclose(diff, 0, atol=1e-4)
    # the real CryoSPARC poses survive pose -> psi -> pose
    real_pose = np.array([5.8985004, 1.6669675, 0.25645655, 3.9750764], np.float32)
    np.testing.assert_allclose(cv.pose_from_psi(cv.psi_from_pose(real_pose)), real_pose, rtol=1e-6)
    # shift: RELION origin sign, rescaled to alignments2D/psize_A
    origin = np.array([[3.0, -2.0], [-7.5, 0.25]], np.float32)
    np.testing.assert_array_equal(cv.shift_from_origin(origin, [1.5, 1.5]), origin)
    s = cv.shift_from_origin(origin, [1.5, 1.5], [3.0, 0.75])
    np.testing.assert_allclose(s, origin * np.array([[0.5], [2.0]]))
    np.testing.assert_allclose(cv.origin_from_shift(s, [3.0, 0.75], [1.5, 1.5]), origin)
    assert cv.pose_from_psi(np.float32([-1e-12]))[0] == 0.0


def test_class_index_and_exposure_group_conventions():
    np.testing.assert_array_equal(cv.idx_from_class([0, 3, 7]), np.array([0, 3, 7], np.uint32))
    np.testing.assert_array_equal(cv.class_from_idx(np.uint32([0, 3])), [0, 3])
    np.testing.assert_array_equal(cv.optics_group_from_exp_group(np.uint32([0, 23])), [1, 24])
    np.testing.assert_array_equal(cv.exp_group_from_optics_group([1, 24]), [0, 23])
    assert cv.strip_path_prefix(">J1/a.mrc") == "J1/a.mrc"
    assert cv.strip_path_prefix("J1/a.mrc") == "J1/a.mrc"


def test_class_average_fields():
    r = make_fake_result(30, 6, 24)
    f = class_average_fields(r, "J7/class_averages.mrc", 1.25)
    assert list(f) == ["blob/path", "blob/idx", "blob/shape", "blob/psize_A", "blob/sign"]
    assert _descr(f) == [
        ("blob/path", "|O", ()),
        ("blob/idx", "<u4", ()),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4", ()),
        ("blob/sign", "<f4", ()),
    ]
    np.testing.assert_array_equal(f["blob/idx"], np.arange(6))
    assert set(f["blob/path"]) == {"J7/class_averages.mrc"}
    assert np.all(f["blob/shape"] == 24) and np.all(f["blob/psize_A"] == 1.25)
    assert np.all(cv.contrast_from_sign(f["blob/sign"]) == 1)  # averages are protein white


# ----------------------------------------------------------------------------- outputs


def _check_outputs(paths, ps, result, uids):
    assert set(paths) == {"particles", "class_averages", "class_averages_mrc"}
    parts = Dataset.load(paths["particles"])
    assert parts.fields() == ["uid"] + [f[0] for f in SPEC_ALIGNMENTS2D]
    assert parts.descr()[1:] == [(n, d, *([s] if s else [])) for n, d, s in SPEC_ALIGNMENTS2D]
    np.testing.assert_array_equal(parts["uid"], uids)
    np.testing.assert_array_equal(parts["alignments2D/class"], result.class_id)

    k, box = result.n_classes, ps.box
    assert mrcfile.validate(str(paths["class_averages_mrc"]), print_file=open("/dev/null", "w"))
    with mrcfile.open(paths["class_averages_mrc"]) as mrc:
        assert mrc.is_image_stack()
        assert mrc.data.shape == (k, box, box) and mrc.data.dtype == np.float32
        np.testing.assert_allclose(mrc.voxel_size.x, ps.pixel_size, rtol=1e-6)
        np.testing.assert_array_equal(mrc.data, result.averages)

    t = Dataset.load(paths["class_averages"])
    assert t.fields() == ["uid", "blob/path", "blob/idx", "blob/shape", "blob/psize_A", "blob/sign"]
    assert len(t) == k and len(np.unique(t["uid"])) == k
    np.testing.assert_array_equal(t["blob/idx"], np.arange(k))
    mrc = Path(paths["class_averages_mrc"]).resolve()
    try:  # CryoSPARC paths are relative to the project directory
        expect = mrc.relative_to(Path(ps.project_dir).resolve()).as_posix()
    except ValueError:
        expect = mrc.as_posix()
    assert set(t["blob/path"]) == {expect}
    np.testing.assert_array_equal(t["blob/shape"], np.full((k, 2), box))
    # every particle's class names a template row (class <-> blob/idx)
    assert set(parts["alignments2D/class"]) <= set(t["blob/idx"])


def test_write_class2d_outputs_for_a_cs_input(j2, tmp_path):
    ps = read_particles(j2)
    result = make_fake_result(len(ps), 5, ps.box, psize=ps.pixel_size)
    paths = write_class2d_outputs(tmp_path / "out", ps, result)
    src = Dataset.load(j2)
    _check_outputs(paths, ps, result, src["uid"])
    # joined on uid with the input (as CryoSPARC joins passthrough), every particle is kept
    joined = src.drop_fields(lambda f: f.startswith("alignments2D/"), copy=True).innerjoin(
        Dataset.load(paths["particles"])
    )
    assert len(joined) == len(src)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "class_averages.cs",
        "class_averages.mrc",
        "particles.cs",
    ]


def test_offline_class_averages_path_is_relative_to_the_project(j2, tmp_path):
    ps = dataclasses.replace(read_particles(j2), project_dir=tmp_path)
    result = make_fake_result(len(ps), 3, ps.box, seed=2)
    paths = write_class2d_outputs(tmp_path / "J9" / "companion", ps, result)
    t = Dataset.load(paths["class_averages"])
    assert set(t["blob/path"]) == {"J9/companion/class_averages.mrc"}


def test_write_class2d_outputs_for_a_generated_set_matches_write_particles(j2, tmp_path):
    ps = read_particles(j2)
    ps.passthrough = None  # as if the particles came from the simulator or a STAR file
    write_particles(tmp_path / "input.cs", ps)
    result = make_fake_result(len(ps), 3, ps.box, seed=2)
    paths = write_class2d_outputs(tmp_path, ps, result)
    _check_outputs(paths, ps, result, Dataset.load(tmp_path / "input.cs")["uid"])


def test_outputs_are_all_or_nothing(j2, tmp_path, monkeypatch):
    ps = read_particles(j2)
    result = make_fake_result(len(ps), 5, ps.box)
    out = tmp_path / "out"
    out.mkdir()
    (out / "particles.cs").write_bytes(b"old")
    real_save = Dataset.save
    calls = []

    def fail_second(self, file, **kw):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(self, file, **kw)

    monkeypatch.setattr(Dataset, "save", fail_second)
    with pytest.raises(OSError):
        write_class2d_outputs(out, ps, result)
    assert [p.name for p in out.iterdir()] == ["particles.cs"]
    assert (out / "particles.cs").read_bytes() == b"old"


def test_outputs_reject_a_result_of_another_size(j2, tmp_path):
    ps = read_particles(j2)
    with pytest.raises(ValueError):
        write_class2d_outputs(tmp_path, ps, make_fake_result(len(ps) + 1, 3, ps.box))
    assert list(tmp_path.iterdir()) == []
