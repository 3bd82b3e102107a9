"""CryoSPARC .cs reading and writing: real files, round trips, bad input, images."""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from cryosparc.dataset import Dataset

from companion.cryosparc import conventions as cv
from companion.cryosparc import inspect_particles, read_particles, write_particles
from companion.cryosparc.dataset_io import particle_uids
from companion.errors import InputError, ParameterError
from companion.particles import CtfParams, ParticleSet

REAL_WITH_ROWS = [
    "cryosparc_J2_particles_exported.cs",
    "cryosparc_P12_J24_001_particles.cs",
    "empiar_10076_7.cs",
]


def assert_one_line(exc: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, msg


# ----------------------------------------------------------------------------- real files


@pytest.mark.parametrize("name", REAL_WITH_ROWS)
def test_reads_every_real_cs_without_images(real_data, name):
    path = real_data / name
    dset = Dataset.load(path)
    ps = read_particles(path)
    assert ps.host == "cryosparc"
    assert len(ps) == len(dset)
    assert ps.passthrough is not None and len(ps.passthrough) == len(dset)
    assert ps.box == int(dset["blob/shape"][0][0])
    np.testing.assert_array_equal(ps.image_index, dset["blob/idx"].astype(np.int64))
    np.testing.assert_array_equal(ps.psize, dset["blob/psize_A"])
    np.testing.assert_array_equal(ps.ctf.defocus_u, dset["ctf/df1_A"])
    np.testing.assert_array_equal(ps.ctf.defocus_v, dset["ctf/df2_A"])
    np.testing.assert_allclose(
        ps.ctf.defocus_angle, np.degrees(dset["ctf/df_angle_rad"]), rtol=1e-6, atol=1e-5
    )
    np.testing.assert_array_equal(ps.ctf.voltage, dset["ctf/accel_kv"])
    np.testing.assert_array_equal(ps.ctf.cs, dset["ctf/cs_mm"])
    np.testing.assert_array_equal(ps.ctf.amp_contrast, dset["ctf/amp_contrast"])
    np.testing.assert_array_equal(ps.optics_group, dset["ctf/exp_group_id"].astype(int) + 1)
    # every real file has blob/sign -1: stored images protein white, no flip (conventions.py)
    assert np.all(dset["blob/sign"] == -1) and np.all(ps.contrast == 1)
    # paths: absolute, '>' stripped, one entry per distinct stack
    paths = ps.image_paths()
    raw = [cv.strip_path_prefix(p) for p in dset["blob/path"]]
    assert all(Path(p).is_absolute() for p in ps.stack_paths)
    assert [os.path.relpath(p, ps.project_dir) for p in paths] == raw
    assert len(ps.stack_paths) == len(set(raw))
    assert not any(">" in str(p) for p in ps.stack_paths)


def test_zero_row_dataset_is_a_clear_error(real_data):
    path = real_data / "cryosparc_tools_4k_dataset.cs"
    with pytest.raises(InputError) as exc:
        read_particles(path)
    assert_one_line(exc, str(path), "0 rows")
    ps, problems = inspect_particles(path)
    assert ps is None
    text = " ".join(problems)
    assert "0 rows" in text and "no blob/* fields" in text and "no ctf/* fields" in text


def test_empiar_cs_and_star_describe_the_same_particles(real_data):
    ps = read_particles(real_data / "empiar_10076_7.cs")
    star = starfile.read(real_data / "empiar_10076_7.star")
    idx = star["rlnImageName"].str.split("@").str[0].astype(int).to_numpy() - 1
    np.testing.assert_array_equal(ps.image_index, idx)
    names = list(star["rlnImageName"].str.split("@").str[1])
    assert [Path(p).name for p in ps.image_paths()] == names
    np.testing.assert_allclose(ps.ctf.defocus_u, star["rlnDefocusU"], rtol=1e-6)
    np.testing.assert_allclose(ps.ctf.defocus_v, star["rlnDefocusV"], rtol=1e-6)
    np.testing.assert_allclose(ps.ctf.defocus_angle, star["rlnDefocusAngle"], atol=1e-5)
    np.testing.assert_allclose(ps.ctf.voltage, star["rlnVoltage"])
    np.testing.assert_allclose(ps.ctf.cs, star["rlnSphericalAberration"], rtol=1e-6)
    np.testing.assert_allclose(ps.ctf.amp_contrast, star["rlnAmplitudeContrast"], rtol=1e-6)
    apix = 1e4 * star["rlnDetectorPixelSize"] / star["rlnMagnification"]
    np.testing.assert_allclose(ps.psize, apix, rtol=1e-5)


@pytest.mark.parametrize("name", REAL_WITH_ROWS)
def test_round_trip_keeps_every_field_and_value(real_data, tmp_path, name):
    src = real_data / name
    out = tmp_path / "out.cs"
    write_particles(out, read_particles(src))
    assert Dataset.load(out) == Dataset.load(src)  # same fields, order, dtypes, values
    raw_in, raw_out = np.load(src), np.load(out)
    assert raw_out.dtype.names == raw_in.dtype.names
    for f in raw_in.dtype.names:
        np.testing.assert_array_equal(raw_out[f], raw_in[f])


def test_write_adds_and_replaces_fields_and_subsets(real_data, tmp_path):
    src = real_data / "cryosparc_J2_particles_exported.cs"
    ps = read_particles(src)
    n = len(ps)
    classes = np.arange(n, dtype=np.uint32)[::-1].copy()
    flags = np.arange(n) % 2 == 0
    write_particles(tmp_path / "a.cs", ps, {"alignments2D/class": classes, "companion/flag": flags})
    out = Dataset.load(tmp_path / "a.cs")
    orig = Dataset.load(src)
    assert out.fields()[:-1] == orig.fields() and out.fields()[-1] == "companion/flag"
    np.testing.assert_array_equal(out["alignments2D/class"], classes)
    np.testing.assert_array_equal(out["companion/flag"], flags.astype(np.uint8))
    np.testing.assert_array_equal(out["alignments2D/pose"], orig["alignments2D/pose"])

    idx = np.array([5, 0, 17, 3])
    write_particles(tmp_path / "b.cs", ps.subset(idx))
    assert Dataset.load(tmp_path / "b.cs") == orig.take(idx)
    with pytest.raises(ValueError):
        write_particles(tmp_path / "c.cs", ps, {"alignments2D/class": classes[:3]})
    assert not (tmp_path / "c.cs").exists()


# ----------------------------------------------------------------------------- project dir


def _dataset(n: int, paths: list[str], **overrides: np.ndarray) -> Dataset:
    fields = {
        "uid": np.arange(1, n + 1, dtype=np.uint64),
        "blob/path": np.array([paths[i % len(paths)] for i in range(n)], dtype=object),
        "blob/idx": np.arange(n, dtype=np.uint32),
        "blob/shape": np.tile(np.array([16, 16], dtype=np.uint32), (n, 1)),
        "blob/psize_A": np.full(n, 2.0, dtype=np.float32),
        "blob/sign": np.full(n, -1.0, dtype=np.float32),
        "ctf/accel_kv": np.full(n, 300.0, dtype=np.float32),
        "ctf/cs_mm": np.full(n, 2.7, dtype=np.float32),
        "ctf/amp_contrast": np.full(n, 0.1, dtype=np.float32),
        "ctf/df1_A": np.full(n, 15000.0, dtype=np.float32),
        "ctf/df2_A": np.full(n, 14000.0, dtype=np.float32),
        "ctf/df_angle_rad": np.full(n, 0.5, dtype=np.float32),
    }
    fields.update(overrides)
    return Dataset([(k, v) for k, v in fields.items() if v is not None])


def test_project_dir_is_found_from_the_cs_file_upwards(tmp_path):
    proj = tmp_path / "P3"
    (proj / "J1" / "imported").mkdir(parents=True)
    (proj / "exports" / "J5").mkdir(parents=True)
    (proj / "J1" / "imported" / "a.mrcs").write_bytes(b"")
    cs = proj / "exports" / "J5" / "p.cs"
    _dataset(4, [">J1/imported/a.mrcs"]).save(str(cs))
    ps = read_particles(cs)
    assert ps.project_dir == proj
    assert ps.stack_paths == [proj / "J1" / "imported" / "a.mrcs"]
    # explicit project dir wins; nothing found -> the .cs directory
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert read_particles(cs, project_dir=other).project_dir == other
    _dataset(4, ["J9/missing.mrcs"]).save(str(cs))
    assert read_particles(cs).project_dir == cs.parent
    with pytest.raises(InputError) as exc:
        read_particles(cs, project_dir=tmp_path / "nope")
    assert_one_line(exc, "nope", "--project-dir")


# ----------------------------------------------------------------------------- bad input


def test_missing_empty_and_non_cs_files(tmp_path, real_data):
    with pytest.raises(InputError) as exc:
        read_particles(tmp_path / "absent.cs")
    assert_one_line(exc, "absent.cs", "not found")
    empty = tmp_path / "empty.cs"
    empty.write_bytes(b"")
    with pytest.raises(InputError) as exc:
        read_particles(empty)
    assert_one_line(exc, "empty.cs", "empty")
    with pytest.raises(InputError) as exc:
        read_particles(real_data / "relion31.star")
    assert_one_line(exc, "relion31.star", "not a CryoSPARC .cs dataset", "STAR file")
    junk = tmp_path / "junk.cs"
    np.save(open(junk, "wb"), np.arange(10.0))
    with pytest.raises(InputError) as exc:
        read_particles(junk)
    assert_one_line(exc, "junk.cs")
    with pytest.raises(InputError) as exc:
        read_particles(tmp_path)
    assert_one_line(exc, "not a file")


@pytest.mark.parametrize(
    "overrides, parts",
    [
        (
            {k: None for k in ("blob/path", "blob/idx", "blob/shape", "blob/psize_A", "blob/sign")},
            ["no blob/* fields"],
        ),
        (
            {
                k: None
                for k in (
                    "ctf/accel_kv",
                    "ctf/cs_mm",
                    "ctf/amp_contrast",
                    "ctf/df1_A",
                    "ctf/df2_A",
                    "ctf/df_angle_rad",
                )
            },
            ["no ctf/* fields"],
        ),
        ({"blob/idx": None}, ["field blob/idx missing"]),
        ({"ctf/df2_A": None}, ["field ctf/df2_A missing"]),
        (
            {"ctf/df1_A": np.array([1e4, 1e4, np.nan, 1e4, np.nan], np.float32)},
            ["row 3 (and 1 more rows)", "ctf/df1_A is NaN"],
        ),
        (
            {"ctf/df2_A": np.array([1e4, np.inf, 1e4, 1e4, 1e4], np.float32)},
            ["row 2", "ctf/df2_A is infinite"],
        ),
        (
            {"ctf/bfactor": np.array([0, 0, 0, np.nan, 0], np.float32)},
            ["row 4", "ctf/bfactor is not a finite number"],
        ),
        (
            {"ctf/df2_A": np.array([1e4, 1e4, 1e4, -5.0, 1e4], np.float32)},
            ["row 4", "ctf/df2_A is negative"],
        ),
        (
            {"blob/psize_A": np.array([1, 1, 1, 1, 0], np.float32)},
            ["row 5", "blob/psize_A is not positive"],
        ),
        (
            {"blob/shape": np.array([[16, 16]] * 4 + [[32, 32]], np.uint32)},
            ["row 5", "blob/shape (32, 32) differs"],
        ),
        ({"blob/shape": np.array([[16, 24]] * 5, np.uint32)}, ["not square"]),
        ({"blob/sign": np.array([-1, -1, 0, -1, -1], np.float32)}, ["row 3", "blob/sign"]),
        (
            {"ctf/amp_contrast": np.array([0.1, 0.1, 0.1, 0.1, 1.5], np.float32)},
            ["row 5", "ctf/amp_contrast"],
        ),
        (
            {"ctf/accel_kv": np.array([300, 0, 300, 300, 300], np.float32)},
            ["row 2", "ctf/accel_kv"],
        ),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, overrides, parts):
    path = tmp_path / "bad.cs"
    _dataset(5, ["s.mrcs"], **overrides).save(str(path))
    with pytest.raises(InputError) as exc:
        read_particles(path)
    assert_one_line(exc, "bad.cs", *parts)


def test_inspect_collects_every_problem(tmp_path):
    path = tmp_path / "bad.cs"
    _dataset(
        5,
        ["s.mrcs"],
        **{
            "ctf/df1_A": np.array([np.nan, 1, 1, 1, 1], np.float32),
            "ctf/df2_A": np.array([1, -1, 1, 1, 1], np.float32),
            "blob/psize_A": np.array([1, 1, 0, 1, 1], np.float32),
            "blob/sign": None,
        },
    ).save(str(path))
    ps, problems = inspect_particles(path)
    assert ps is not None and len(ps) == 5
    text = "\n".join(problems)
    for part in (
        "row 1: ctf/df1_A is NaN",
        "row 2: ctf/df2_A is negative",
        "row 3: blob/psize_A",
        "no blob/sign field",
        "s.mrcs not found",
    ):
        assert part in text, text
    assert all("\n" not in p for p in problems)
    _, problems = inspect_particles(path, check_images=False)
    assert not any("not found" in p for p in problems)


def test_contrast_override():
    sign = np.array([-1.0, 1.0], np.float32)
    np.testing.assert_array_equal(cv.contrast_from_sign(sign), [1, -1])
    np.testing.assert_array_equal(cv.contrast_from_sign(sign, "auto"), [1, -1])
    np.testing.assert_array_equal(cv.contrast_from_sign(sign, "white"), [1, 1])
    np.testing.assert_array_equal(cv.contrast_from_sign(sign, "dark"), [-1, -1])
    np.testing.assert_array_equal(cv.contrast_from_sign(sign, "sign"), [-1, 1])
    np.testing.assert_array_equal(cv.contrast_from_sign(sign, -1), [-1, -1])
    for c in (1.0, -1.0):
        assert cv.contrast_from_sign(cv.sign_from_contrast(np.float32(c))) == c
    with pytest.raises(ParameterError):
        cv.contrast_from_sign(sign, "bright")


# ----------------------------------------------------------------------------- images


def _relion_like_set(tmp_path: Path, n: int = 12, box: int = 16) -> ParticleSet:
    """A ParticleSet as the RELION reader or the simulator makes it, with real stacks."""
    rng = np.random.default_rng(3)
    stacks = []
    for s in range(2):
        path = tmp_path / "Extract" / f"mic{s}.mrcs"
        path.parent.mkdir(parents=True, exist_ok=True)
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(rng.normal(size=(n // 2 + 1, box, box)).astype(np.float32))
        stacks.append(path)
    ctf = CtfParams(
        defocus_u=rng.uniform(8000, 30000, n),
        defocus_v=rng.uniform(8000, 30000, n),
        defocus_angle=rng.uniform(-180, 180, n),
        voltage=np.full(n, 300.0),
        cs=np.full(n, 2.7),
        amp_contrast=np.full(n, 0.1),
        phase_shift=rng.uniform(0, 90, n),
        bfactor=rng.uniform(0, 50, n),
        scale=np.ones(n),
    )
    return ParticleSet(
        source_path=tmp_path / "particles.star",
        project_dir=tmp_path,
        stack_paths=stacks,
        stack_index=np.arange(n) % 2,
        image_index=np.arange(n) // 2,
        box=box,
        psize=np.full(n, 1.5),
        optics_group=1 + np.arange(n) % 3,
        ctf=ctf,
        contrast=1.0,
        ctf_premultiplied=False,
        phase_flipped=False,
        host="relion",
    )


def test_star_like_set_written_as_cs_gives_identical_particles(tmp_path, real_data):
    ps = _relion_like_set(tmp_path)
    out = tmp_path / "particles.cs"
    write_particles(out, ps)
    dset = Dataset.load(out)
    real = Dataset.load(real_data / "empiar_10076_7.cs")
    assert dset.descr() == real.descr()  # CryoSPARC's import field set, order and dtypes
    assert np.all(dset["blob/sign"] == -1)
    assert list(dset["blob/path"][:2]) == ["Extract/mic0.mrcs", "Extract/mic1.mrcs"]

    back = read_particles(out)
    assert back.project_dir == tmp_path and back.stack_paths == ps.stack_paths
    assert back.box == ps.box
    for name in ("stack_index", "image_index", "psize", "optics_group", "contrast"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ps, name))
    for name, a in ps.ctf.as_dict().items():
        b = getattr(back.ctf, name)
        if name in ("defocus_angle", "phase_shift"):  # via float32 radians: 1 ulp at most
            np.testing.assert_allclose(b, a, rtol=2e-7, atol=1e-6)
        else:
            np.testing.assert_array_equal(b, a)
    idx = np.array([3, 0, 11, 6])
    np.testing.assert_array_equal(back.read_images(idx), ps.read_images(idx))


def test_generated_cs_paths_relative_to_project_dir_and_stable_uids(tmp_path):
    ps = _relion_like_set(tmp_path)
    sub = tmp_path / "out" / "deep"
    write_particles(sub / "a.cs", ps)
    write_particles(sub / "b.cs", ps, project_dir=tmp_path)
    a, b = Dataset.load(sub / "a.cs"), Dataset.load(sub / "b.cs")
    assert a["blob/path"][0] == "../../Extract/mic0.mrcs"
    assert b["blob/path"][0] == "Extract/mic0.mrcs"
    np.testing.assert_array_equal(a["uid"], b["uid"])  # uids do not depend on the output
    assert len(np.unique(a["uid"])) == len(ps)
    np.testing.assert_array_equal(a["uid"], particle_uids(ps))
    np.testing.assert_array_equal(
        read_particles(sub / "a.cs").read_images([5]), ps.read_images([5])
    )
    dup = ps.subset(np.array([0, 0, 1]))
    assert len(np.unique(particle_uids(dup))) == 3


def test_dark_contrast_is_written_as_sign_plus_one_and_flips_images(tmp_path):
    ps = _relion_like_set(tmp_path)
    ps.contrast[:] = -1.0
    write_particles(tmp_path / "d.cs", ps)
    assert np.all(Dataset.load(tmp_path / "d.cs")["blob/sign"] == 1)
    back = read_particles(tmp_path / "d.cs")
    raw = ps.read_images([2], normalise_contrast=False)
    np.testing.assert_array_equal(back.read_images([2]), -raw)
    white = read_particles(tmp_path / "d.cs", contrast="white")
    np.testing.assert_array_equal(white.read_images([2]), raw)


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch, real_data):
    ps = read_particles(real_data / "empiar_10076_7.cs")
    out = tmp_path / "p.cs"
    out.write_bytes(b"old")

    def boom(self, file, **kw):
        Path(file).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Dataset, "save", boom)
    with pytest.raises(OSError):
        write_particles(out, ps)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["p.cs"]
