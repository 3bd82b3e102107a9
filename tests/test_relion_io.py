"""RELION particle STAR I/O: real files read, exact round trips, bad input, RELION reads ours."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.errors import InputError
from companion.particles import CtfParams, ParticleSet
from companion.relion import (
    RelionTables,
    inspect_particles,
    read_particles,
    read_star,
    write_particles,
    write_star,
)

REAL_31 = ["relion31.star", "relion31.v2.star", "relion31.6opticsgroups.star", "relion5.star"]
OPTICS = """
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnVoltage #3
_rlnSphericalAberration #4
_rlnAmplitudeContrast #5
_rlnImagePixelSize #6
_rlnImageSize #7
_rlnImageDimensionality #8
1 opticsGroup1 300.0 2.7 0.1 1.5 16 2
2 opticsGroup2 200.0 2.0 0.07 1.5 16 2

"""
PARTICLE_LABELS = [
    "rlnImageName",
    "rlnMicrographName",
    "rlnOpticsGroup",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
]
GOOD_ROWS = [
    "000001@Extract/job005/mic1.mrcs mic1.mrc 1 15000.0 14000.0 30.0",
    "000002@Extract/job005/mic1.mrcs mic1.mrc 1 15100.0 14100.0 31.0",
    "000001@Extract/job005/mic2.mrcs mic2.mrc 2 21000.0 20000.0 -45.0",
    "000002@Extract/job005/mic2.mrcs mic2.mrc 2 21100.0 20100.0 -44.0",
]


def particles_star(rows=GOOD_ROWS, labels=PARTICLE_LABELS, optics: str = OPTICS) -> str:
    head = "\n".join(["", "# version 30001", "", "data_particles", "", "loop_"])
    lab = "\n".join(f"_{name} #{i + 1}" for i, name in enumerate(labels))
    return optics + head + "\n" + lab + "\n" + "\n".join(rows) + "\n\n"


def make_stack(path: Path, n: int, box: int = 16, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
    return data


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def assert_tables_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        x, y = a[col], b[col]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            assert x.dtype.kind == y.dtype.kind, col
            np.testing.assert_array_equal(x.to_numpy(), y.to_numpy(), err_msg=col)
        else:
            assert x.astype(str).tolist() == y.astype(str).tolist(), col
            assert not pd.api.types.is_numeric_dtype(y), col


# --- the real files -------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_31 + ["empiar_10076_7.star"])
def test_real_files_read(real_data, name):
    path = real_data / name
    ps = read_particles(path)
    blocks = read_star(path)
    table = blocks.get("particles", blocks.get(""))
    assert len(ps) == len(table) > 0
    assert ps.host == "relion" and np.all(ps.contrast == 1)
    assert isinstance(ps.passthrough, RelionTables) and len(ps.passthrough) == len(ps)
    # 1-based NNNNNN@ → 0-based, stacks absolute, resolved next to the STAR (not found anywhere)
    first = table["rlnImageName"].iloc[0]
    assert ps.image_index[0] == int(first.split("@")[0]) - 1
    assert ps.stack_paths[ps.stack_index[0]] == real_data / first.split("@")[1]
    assert all(p.is_absolute() for p in ps.stack_paths)
    np.testing.assert_allclose(ps.ctf.defocus_u, table["rlnDefocusU"], rtol=1e-6)
    np.testing.assert_allclose(ps.ctf.defocus_v, table["rlnDefocusV"], rtol=1e-6)
    if "rlnMicrographName" in table:  # strings stay strings, as read
        pt = ps.passthrough.particles["rlnMicrographName"]
        assert pt.tolist() == [str(m) for m in table["rlnMicrographName"]]


def test_relion31_values(real_data):
    ps = read_particles(real_data / "relion31.star")
    v2 = read_particles(real_data / "relion31.v2.star")  # optics table after particles
    for p in (ps, v2):
        assert p.box == 256 and len(p) == 5
        np.testing.assert_allclose(p.psize, 2.806, rtol=1e-6)
        np.testing.assert_allclose(p.ctf.voltage, 300.0)
        np.testing.assert_allclose(p.ctf.cs, 0.01, rtol=1e-6)
        np.testing.assert_allclose(p.ctf.amp_contrast, 0.1, rtol=1e-6)
        assert p.ctf.defocus_u[0] == np.float32(13108.082418)
        assert p.ctf.defocus_angle[0] == np.float32(-160.39)
        np.testing.assert_array_equal(p.image_index, np.arange(5))
        assert not p.ctf_premultiplied.any()


def test_six_optics_groups(real_data):
    ps = read_particles(real_data / "relion31.6opticsgroups.star")
    optics = ps.passthrough.optics.set_index("rlnOpticsGroup")
    assert len(optics) == 6 and ps.box == 196
    np.testing.assert_allclose(ps.psize, optics.loc[ps.optics_group, "rlnImagePixelSize"])
    np.testing.assert_allclose(ps.ctf.cs, optics.loc[ps.optics_group, "rlnSphericalAberration"])
    np.testing.assert_allclose(ps.ctf.voltage, 200.0)
    assert set(np.unique(ps.optics_group)) <= set(optics.index)


def test_relion5(real_data):
    ps = read_particles(real_data / "relion5.star")
    assert ps.passthrough.version == "50001" and ps.box == 448
    assert not ps.ctf_premultiplied.any()
    assert {p.name for p in ps.stack_paths} == {"toy_images_a.mrcs", "toy_images_b.mrcs"}
    np.testing.assert_array_equal(ps.image_index[:3], [0, 1, 2])
    zernike = ps.passthrough.optics["rlnOddZernike"].iloc[0]
    assert zernike.startswith("[0.0680480107376,")


def test_legacy_30(real_data):
    ps = read_particles(real_data / "empiar_10076_7.star")
    np.testing.assert_allclose(ps.psize, 1e4 * 5 / 38168, rtol=1e-6)
    np.testing.assert_allclose(ps.ctf.voltage, 300)
    np.testing.assert_allclose(ps.ctf.cs, 2.7, rtol=1e-6)
    tables = ps.passthrough
    assert tables.legacy and list(tables.optics["rlnOpticsGroup"]) == [1]
    assert "rlnMagnification" not in tables.particles and "rlnVoltage" not in tables.particles
    assert tables.particles["rlnMicrographName"].tolist() == [str(i) for i in range(1, 8)]
    assert ps.box == 0 and any("image size unknown" in p for p in ps.problems)


def test_data_style_file(real_data):
    path = real_data / "rln3.1_data_style.star"
    with pytest.raises(InputError, match=r"rln3\.1_data_style\.star.*rlnDefocusU"):
        read_particles(path)
    ps, problems = inspect_particles(path)
    assert ps is not None and len(ps) == 2 and ps.box == 400
    np.testing.assert_allclose(ps.psize, 1.04, rtol=1e-6)
    assert any("rlnDefocusU" in p for p in problems)
    assert any("2 particle tables" in p for p in problems)


@pytest.mark.parametrize(
    "name", ["postprocess.star", "run_it025_optimiser_2D.star", "default_pipeline.star"]
)
def test_non_particle_files_refused(real_data, name):
    with pytest.raises(InputError) as err:
        read_particles(real_data / name)
    msg = str(err.value)
    assert name in msg and "rlnImageName" in msg and "particles STAR" in msg
    assert "\n" not in msg
    if name == "postprocess.star":
        assert "post-processing" in msg


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_31)
def test_round_trip_exact(real_data, tmp_path, name):
    src = real_data / name
    ps = read_particles(src)
    out = tmp_path / "out.star"
    write_particles(out, ps)
    a, b = read_star(src), read_star(out)
    assert list(b) == ["optics", "particles"]
    assert_tables_equal(a["optics"], b["optics"])
    assert_tables_equal(a["particles"], b["particles"])
    text = out.read_text()
    assert f"# version {ps.passthrough.output_version}" in text
    assert "<NA>" not in text and "True" not in text and "False" not in text
    # writing what we wrote gives the same bytes
    again = tmp_path / "again.star"
    write_particles(again, read_particles(out))
    assert again.read_bytes() == out.read_bytes()


def test_legacy_written_as_31(real_data, tmp_path):
    out = tmp_path / "converted.star"
    write_particles(out, read_particles(real_data / "empiar_10076_7.star"))
    blocks = read_star(out)
    optics, table = blocks["optics"], blocks["particles"]
    assert list(optics.columns[:2]) == ["rlnOpticsGroup", "rlnOpticsGroupName"]
    np.testing.assert_allclose(optics["rlnImagePixelSize"], 1e4 * 5 / 38168)
    assert list(table.columns) == [
        "rlnImageName",
        "rlnMicrographName",
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnOpticsGroup",
    ]
    assert table["rlnMicrographName"].tolist() == [str(i) for i in range(1, 8)]
    assert "# version 30001" in out.read_text()


def test_legacy_offsets_and_box_from_stack(tmp_path):
    make_stack(tmp_path / "stack.mrcs", 3, box=24)
    text = (
        "data_\n\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnVoltage\n_rlnSphericalAberration\n"
        "_rlnAmplitudeContrast\n_rlnMagnification\n_rlnDetectorPixelSize\n_rlnOriginX\n"
        "1@stack.mrcs 10000 300 2.7 0.1 10000 2.0 1.5\n"
        "2@stack.mrcs 11000 300 2.7 0.1 10000 2.0 -2.0\n"
        "3@stack.mrcs 12000 200 2.7 0.1 10000 2.0 0.5\n"
    )
    ps = read_particles(write_text(tmp_path / "legacy.star", text))
    assert ps.box == 24 and len(ps.passthrough.optics) == 2
    np.testing.assert_array_equal(ps.optics_group, [1, 1, 2])
    np.testing.assert_allclose(ps.ctf.voltage, [300, 300, 200])
    np.testing.assert_allclose(ps.ctf.defocus_v, ps.ctf.defocus_u)  # V missing → U
    table = ps.passthrough.particles
    np.testing.assert_allclose(table["rlnOriginXAngst"], [3.0, -4.0, 1.0])
    assert "rlnOriginX" not in table
    assert list(ps.passthrough.optics["rlnImageSize"]) == [24, 24]
    np.testing.assert_allclose(ps.read_images(np.array([2]))[0].shape, (24, 24))


def test_add_and_replace_columns(real_data, tmp_path):
    ps = read_particles(real_data / "relion31.star")
    n = len(ps)
    psi = np.linspace(-179.5, 179.5, n)
    cols = {"rlnClassNumber": np.arange(n) + 7, "rlnAnglePsi": psi, "rlnIsGood": np.ones(n, bool)}
    out = tmp_path / "cols.star"
    write_particles(out, ps, cols, optics_columns={"rlnImagePixelSize": np.array([2.5])})
    src, got = read_star(real_data / "relion31.star"), read_star(out)
    before, after = list(src["particles"].columns), list(got["particles"].columns)
    assert after == before + ["rlnIsGood"]  # replaced in place, new appended
    np.testing.assert_array_equal(got["particles"]["rlnClassNumber"], np.arange(n) + 7)
    np.testing.assert_allclose(got["particles"]["rlnAnglePsi"], psi, atol=1e-6)
    np.testing.assert_array_equal(got["particles"]["rlnIsGood"], 1)
    assert got["optics"]["rlnImagePixelSize"].tolist() == [2.5]
    untouched = [c for c in before if c not in cols]
    assert_tables_equal(src["particles"][untouched], got["particles"][untouched])
    with pytest.raises(ValueError, match="rlnClassNumber"):
        write_particles(out, ps, {"rlnClassNumber": np.arange(n + 1)})


def test_subset_writes_subset(real_data, tmp_path):
    ps = read_particles(real_data / "relion31.6opticsgroups.star")
    idx = np.array([5, 0, 100])
    sub = ps.subset(idx)
    out = tmp_path / "sub.star"
    write_particles(out, sub, {"rlnClassNumber": np.array([1, 2, 3])})
    got = read_star(out)["particles"]
    src = read_star(real_data / "relion31.6opticsgroups.star")["particles"]
    assert got["rlnImageName"].tolist() == src["rlnImageName"].iloc[idx].tolist()
    assert len(read_star(out)["optics"]) == 6


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=30),
    st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=30),
)
def test_floats_round_trip_exactly(tmp_path_factory, f64, f32):
    path = tmp_path_factory.mktemp("fl") / "f.star"
    a = pd.DataFrame({"rlnA": np.array(f64)})
    b = pd.DataFrame({"rlnB": np.array(f32, dtype=np.float32)})
    write_star(path, {"a": a, "b": b, "kv": {"rlnC": f64[0]}})
    got = read_star(path)
    np.testing.assert_array_equal(got["a"]["rlnA"].to_numpy(), a["rlnA"].to_numpy())
    np.testing.assert_array_equal(got["b"]["rlnB"].to_numpy(np.float32), b["rlnB"].to_numpy())
    assert got["kv"]["rlnC"] == f64[0]


def test_write_star_formats(tmp_path):
    df = pd.DataFrame(
        {
            "rlnName": ["0001", "has space", "", None],
            "rlnFlag": [True, False, True, False],
            "rlnNullable": pd.array([1, None, 3, 4], dtype="Int64"),
            "rlnValue": [0.5, np.nan, -np.inf, -0.000704404],
            "rlnCount": np.array([0, -12, 345, 7], dtype=np.int32),
        }
    )
    path = tmp_path / "t.star"
    write_star(path, {"table": df, "general": {"rlnFlag": True, "rlnRoot": "a b", "rlnX": 2.25}})
    text = path.read_text()
    assert "<NA>" not in text and "True" not in text and "False" not in text
    assert text.startswith("\n# version 30001\n\ndata_table\n\nloop_\n_rlnName #1\n")
    got = read_star(path)
    t = got["table"]
    assert t["rlnName"].tolist() == ["0001", "has space", "", ""]
    assert t["rlnFlag"].tolist() == [1, 0, 1, 0]
    assert t["rlnCount"].tolist() == [0, -12, 345, 7]
    np.testing.assert_array_equal(t["rlnValue"], [0.5, np.nan, -np.inf, -0.000704404])
    np.testing.assert_array_equal(t["rlnNullable"], [1, np.nan, 3, 4])
    assert got["general"] == {"rlnFlag": 1, "rlnRoot": "a b", "rlnX": 2.25}
    write_star(path, {"x": pd.DataFrame({"rlnA": [1]})}, version_comment=50001)
    assert path.read_text().startswith("\n# version 50001\n")


def test_write_star_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "keep.star"
    write_star(path, {"a": pd.DataFrame({"rlnA": [1, 2]})})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        yield b"1\n"
        raise RuntimeError("disk full")

    monkeypatch.setattr("companion.relion.star.iter_table_bytes", boom)
    with pytest.raises(RuntimeError):
        write_star(path, {"a": pd.DataFrame({"rlnA": [3, 4]})})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.star"]


def test_larger_table_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    n = 20000
    df = pd.DataFrame(
        {
            "rlnImageName": [
                f"{i % 500 + 1:06d}@Extract/job1/m{i // 500:04d}.mrcs" for i in range(n)
            ],
            "rlnMicrographName": [f"MotionCorr/m{i // 500:04d}.mrc" for i in range(n)],
            "rlnDefocusU": np.round(rng.uniform(5000, 30000, n), 6),
            "rlnAnglePsi": rng.uniform(-180, 180, n),  # full double precision
            "rlnLogLikeliContribution": np.round(rng.uniform(2e5, 3e5, n), 1),
            "rlnClassNumber": rng.integers(1, 200, n),
        }
    )
    path = tmp_path / "big.star"
    write_star(path, {"particles": df})
    assert_tables_equal(df, read_star(path)["particles"])


# --- particles from elsewhere (generated tables) ------------------------------------------


def synthetic_set(tmp_path: Path, premultiplied: bool = False) -> ParticleSet:
    stacks = [tmp_path / "proj" / "Extract" / f"mic{i}.mrcs" for i in range(2)]
    for i, s in enumerate(stacks):
        make_stack(s, 3, seed=i)
    n = 6
    f32 = np.float32
    ctf = CtfParams(
        defocus_u=np.linspace(10000, 20000, n, dtype=f32) + f32(0.1),
        defocus_v=np.linspace(9000, 19000, n, dtype=f32),
        defocus_angle=np.linspace(-90, 90, n, dtype=f32),
        voltage=np.array([300, 300, 300, 200, 200, 200], dtype=f32),
        cs=np.full(n, 2.7, f32),
        amp_contrast=np.full(n, 0.07, f32),
        phase_shift=np.zeros(n, f32),
        bfactor=np.zeros(n, f32),
        scale=np.ones(n, f32),
    )
    return ParticleSet(
        source_path=tmp_path / "x.cs",
        project_dir=tmp_path / "proj",
        stack_paths=stacks,
        stack_index=np.array([0, 0, 0, 1, 1, 1]),
        image_index=np.array([0, 1, 2, 2, 1, 0]),
        box=16,
        psize=np.float32(1.5),
        optics_group=1,
        ctf=ctf,
        contrast=1.0,
        ctf_premultiplied=premultiplied,
        phase_flipped=False,
        host="cryosparc",
    )


def test_generated_tables_round_trip(tmp_path):
    ps = synthetic_set(tmp_path)
    out = tmp_path / "proj" / "particles.star"
    write_particles(out, ps)
    blocks = read_star(out)
    optics, table = blocks["optics"], blocks["particles"]
    assert list(optics.columns) == [
        "rlnOpticsGroup",
        "rlnOpticsGroupName",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnImagePixelSize",
        "rlnImageSize",
        "rlnImageDimensionality",
    ]
    assert len(optics) == 2  # two voltages in one source group → two optics groups
    assert table["rlnImageName"].tolist()[:2] == [
        "000001@Extract/mic0.mrcs",
        "000002@Extract/mic0.mrcs",
    ]
    assert table["rlnMicrographName"].iloc[0] == "Extract/mic0.mrc"
    back = read_particles(out)
    assert back.stack_paths == ps.stack_paths and back.box == 16
    np.testing.assert_array_equal(back.image_index, ps.image_index)
    for key, value in ps.ctf.as_dict().items():
        np.testing.assert_array_equal(getattr(back.ctf, key), value, err_msg=key)
    np.testing.assert_array_equal(back.psize, ps.psize)
    np.testing.assert_array_equal(back.read_images(np.arange(6)), ps.read_images(np.arange(6)))


def test_generated_premultiplied_and_image_root(tmp_path):
    ps = synthetic_set(tmp_path, premultiplied=True)
    out = tmp_path / "elsewhere" / "p.star"
    write_particles(out, ps, image_root=tmp_path)
    blocks = read_star(out)
    assert blocks["optics"]["rlnCtfDataAreCtfPremultiplied"].tolist() == [1, 1]
    assert blocks["particles"]["rlnImageName"].iloc[0] == "000001@proj/Extract/mic0.mrcs"
    back = read_particles(out, project_dir=tmp_path)
    assert back.ctf_premultiplied.all() and back.stack_paths == ps.stack_paths


# --- image path resolution ------------------------------------------------------------------


def test_project_dir_is_found_above_the_star(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    make_stack(proj / "Extract/job005/mic1.mrcs", 2)
    make_stack(proj / "Extract/job005/mic2.mrcs", 2)
    star = write_text(proj / "Class2D/job010/run_it025_data.star", particles_star())
    monkeypatch.chdir(tmp_path)
    ps = read_particles(star)
    assert ps.project_dir == proj and ps.problems == []
    assert ps.stack_paths[0] == proj / "Extract/job005/mic1.mrcs"
    assert ps.check_images() == []
    assert ps.read_images(np.arange(4)).shape == (4, 16, 16)
    np.testing.assert_array_equal(ps.ctf.voltage, [300, 300, 200, 200])
    np.testing.assert_allclose(ps.ctf.amp_contrast, [0.1, 0.1, 0.07, 0.07])
    # the working directory wins when it holds the stacks
    monkeypatch.chdir(proj)
    assert read_particles(Path("Class2D/job010/run_it025_data.star")).project_dir == proj
    # an explicit project directory is used as given
    other = tmp_path / "other"
    other.mkdir()
    assert (
        read_particles(star, project_dir=other).stack_paths[0] == other / "Extract/job005/mic1.mrcs"
    )
    with pytest.raises(InputError, match="project directory not found"):
        read_particles(star, project_dir=tmp_path / "missing")


# --- bad input ------------------------------------------------------------------------------


def bad(rows_or_text, tmp_path, name="bad.star", **kw) -> Path:
    text = rows_or_text if isinstance(rows_or_text, str) else particles_star(rows_or_text, **kw)
    return write_text(tmp_path / name, text)


def rows_with(i: int, row: str) -> list[str]:
    rows = list(GOOD_ROWS)
    rows[i] = row
    return rows


BAD_CASES = {
    "empty": ("", r"empty file"),
    "blank": ("\n \n\n", r"empty file"),
    "no_table": (OPTICS, r"no table with rlnImageName"),
    "no_image_name": (
        particles_star([r.split(" ", 1)[1] for r in GOOD_ROWS], PARTICLE_LABELS[1:]),
        r"data_particles has no rlnImageName",
    ),
    "malformed_name": (rows_with(2, GOOD_ROWS[2].replace("000001@", "x@")), r"row 3: rlnImageName"),
    "index_zero": (
        rows_with(1, GOOD_ROWS[1].replace("000002@", "000000@")),
        r"row 2: rlnImageName",
    ),
    "no_stack": (rows_with(3, "000002@ mic2.mrc 2 21100.0 20100.0 -44.0"), r"row 4: rlnImageName"),
    "nan_defocus": (rows_with(1, GOOD_ROWS[1].replace("15100.0", "nan")), r"row 2: rlnDefocusU"),
    "bad_defocus": (rows_with(2, GOOD_ROWS[2].replace("20000.0", "abc")), r"row 3: rlnDefocusV"),
    # finite in float64 but inf once CtfParams stores it as float32
    "huge_defocus": (
        rows_with(2, GOOD_ROWS[2].replace("20000.0", "1e39")),
        r"row 3: rlnDefocusV is 1e\+39 \(beyond float32 range\)",
    ),
    "nan_angle": (rows_with(3, GOOD_ROWS[3].replace("-44.0", "nan")), r"row 4: rlnDefocusAngle"),
    "huge_voltage": (
        particles_star(optics=OPTICS.replace(" 200.0", " 1e39")),
        r"row 3: rlnVoltage is 1e\+39.*data_optics",
    ),
    "nan_amp_contrast": (
        particles_star(optics=OPTICS.replace("0.07 1.5 16", "nan 1.5 16", 1)),
        r"row 3: rlnAmplitudeContrast is nan",
    ),
    "negative_defocus": (
        rows_with(3, GOOD_ROWS[3].replace("21100.0", "-50")),
        r"row 4: rlnDefocusU",
    ),
    "unknown_group": (rows_with(2, GOOD_ROWS[2].replace(" 2 ", " 7 ")), r"row 3: rlnOpticsGroup 7"),
    "short_row": (rows_with(1, "000002@Extract/job005/mic1.mrcs mic1.mrc 1"), r"row 2: 3 fields"),
    "long_row": (rows_with(2, GOOD_ROWS[2] + " 99"), r"row 3: 7 fields"),
    "no_defocus": (
        particles_star([" ".join(r.split()[:3]) for r in GOOD_ROWS], PARTICLE_LABELS[:3]),
        r"no rlnDefocusU column",
    ),
    "no_voltage": (
        particles_star(
            optics=OPTICS.replace("_rlnVoltage #3\n", "")
            .replace(" 300.0", "")
            .replace(" 200.0", "")
        ),
        r"no rlnVoltage",
    ),
    "two_boxes": (
        particles_star(optics=OPTICS.replace("0.07 1.5 16", "0.07 1.5 32")),
        r"rlnImageSize differs",
    ),
    "crlf": (particles_star().replace("\n", "\r\n"), r"line 1: Windows \(CRLF\).*RELION rejects"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_one_line(tmp_path, case):
    content, pattern = BAD_CASES[case]
    path = bad(content, tmp_path)
    with pytest.raises(InputError) as err:
        read_particles(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg, msg
    assert re.search(pattern, msg), msg
    # inspect never raises for bad content: it reports
    _, problems = inspect_particles(path)
    assert any(re.search(pattern, p) for p in problems), problems


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_particles(tmp_path / "nope.star")


def test_inspect_reports_every_problem(tmp_path):
    rows = list(GOOD_ROWS)
    rows[0] = rows[0].replace("15000.0", "nan")
    rows[2] = rows[2].replace(" 2 ", " 9 ")
    rows[3] = rows[3].replace("21100.0", "-3")
    path = write_text(tmp_path / "many.star", particles_star(rows).replace("\n", "\r\n"))
    ps, problems = inspect_particles(path)
    assert ps is not None and len(ps) == 4
    text = "\n".join(problems)
    for expected in ("CRLF", "row 1: rlnDefocusU", "row 3: rlnOpticsGroup 9", "row 4: rlnDefocusU"):
        assert expected in text, text
    assert any("not found" in p for p in problems)  # stacks checked too
    assert ps.problems == problems


# --- RELION reads what we write -------------------------------------------------------------


@pytest.mark.relion
@pytest.mark.parametrize("source", ["relion31.6opticsgroups.star", "relion5.star", "generated"])
def test_relion_star_handler_reads_ours(real_data, tmp_path, source):
    if source == "generated":
        ps = synthetic_set(tmp_path)
    else:
        ps = read_particles(real_data / source)
    written = tmp_path / "written.star"
    n = len(ps)
    write_particles(
        written, ps, {"rlnClassNumber": np.arange(n) % 3 + 1, "rlnAnglePsi": np.zeros(n)}
    )
    out = tmp_path / "out.star"
    res = subprocess.run(
        ["relion_star_handler", "--i", str(written), "--o", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    got = read_star(out)
    assert len(got["particles"]) == n
    assert (
        got["particles"]["rlnImageName"].tolist()
        == read_star(written)["particles"]["rlnImageName"].tolist()
    )
    np.testing.assert_array_equal(got["particles"]["rlnClassNumber"], np.arange(n) % 3 + 1)
