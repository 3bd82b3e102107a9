"""`companion info`: same report from STAR and .cs of one simulation (the issue's acceptance
check), JSON for scripts, and every bad input of issue 2 → exit 2 with a one-line message
naming the file and the row or field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cryosparc.dataset import Dataset

from companion.cli import main as cli_main
from companion.simulate import simulate
from companion.sources import inspect, open_particles

N = 300


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("info") / "s"
    simulate(out, N, box=48, seed=1, per_micrograph=100, n_optics_groups=2, progress=False)
    return out


def _info(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli_main(["info", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_star_and_cs_report_the_same(sim, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # neither file is found relative to the working directory
    rc, out_star, _ = _info(capsys, str(sim / "particles.star"), "--json")
    assert rc == 0
    rc, out_cs, _ = _info(capsys, str(sim / "particles.cs"), "--project-dir", str(sim), "--json")
    assert rc == 0
    a, b = json.loads(out_star), json.loads(out_cs)
    assert a["host"] == "relion" and b["host"] == "cryosparc"
    for key in (
        "n_particles",
        "box",
        "pixel_size_A",
        "defocus_range_A",
        "defocus_mean_A",
        "n_optics_groups",
        "optics_groups",
        "voltage_kV",
        "cs_mm",
        "amp_contrast",
        "contrast",
        "n_stacks",
        "n_stacks_missing",
    ):
        assert a[key] == b[key], key
    assert a["n_particles"] == N and a["box"] == 48 and a["pixel_size_A"] == 1.5
    assert a["n_optics_groups"] == 2 and a["n_stacks"] == 3 and a["n_stacks_missing"] == 0
    assert a["contrast"] == "protein white"
    assert a["ok"] and a["problems"] == []
    lo, hi = a["defocus_range_A"]
    assert 8000 <= lo < hi <= 25000 + 500


def test_human_readable(sim, capsys):
    rc, out, err = _info(capsys, str(sim / "particles.star"))
    assert rc == 0 and err == ""
    assert f"particles       {N}" in out
    assert "box             48 px" in out
    assert "pixel size      1.5 Å/px" in out
    assert "stacks          3 (0 missing)" in out
    assert "no problems found" in out


# ----------------------------------------------------------------------------- bad input


def _star_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _edit_particle_row(lines: list[str], row: int, col: int, value: str) -> list[str]:
    """Set column ``col`` (0-based) of data row ``row`` (1-based) of data_particles."""
    out, in_particles, seen = [], False, 0
    for line in lines:
        if line.startswith("data_particles"):
            in_particles = True
        if in_particles and "@" in line:
            seen += 1
            if seen == row:
                fields = line.split()
                fields[col] = value
                line = " ".join(fields)
        out.append(line)
    return out


def _case(sim: Path, tmp: Path, kind: str) -> tuple[Path, list[str]]:
    """Make a broken copy of the simulation; return (file, strings the error must contain)."""
    proj = tmp / "proj"
    shutil.copytree(sim, proj)
    star = proj / "particles.star"
    lines = _star_lines(star)
    labels = [ln.split()[0] for ln in lines if ln.startswith("_rln")]
    particle_labels = labels[labels.index("_rlnImageName") :]
    col = {lab.lstrip("_"): i for i, lab in enumerate(particle_labels)}
    if kind in ("missing_stack", "missing_stack_cs"):
        (proj / "stacks" / "mic_00002.mrcs").unlink()
        path = proj / ("particles.cs" if kind.endswith("cs") else "particles.star")
        return path, [str(path), "row 101", "mic_00002.mrcs", "not found"]
    if kind == "index_past_end":
        name = [ln for ln in lines if "@stacks/mic_00001.mrcs" in ln][4].split()[0]
        new = "000999@" + name.split("@")[1]
        star.write_text("\n".join(ln.replace(name, new, 1) for ln in lines) + "\n")
        return star, [str(star), "row 5", "999", "100 images"]
    if kind == "no_image_name":
        out, in_particles = [], False
        for ln in lines:
            if ln.startswith("data_particles"):
                in_particles = True
            if in_particles and ln.startswith("_rlnImageName"):
                continue
            if in_particles and "@" in ln:
                ln = " ".join(ln.split()[1:])
            out.append(ln)
        star.write_text("\n".join(out) + "\n")
        return star, [str(star), "rlnImageName"]
    if kind == "box_mismatch":
        text = star.read_text()
        assert " 48 2" in text
        star.write_text(text.replace(" 48 2", " 64 2"))
        return star, [str(star), "row 1", "48x48", "64"]
    if kind == "nan_defocus":
        lines = _edit_particle_row(lines, 7, col["rlnDefocusU"], "nan")
        star.write_text("\n".join(lines) + "\n")
        return star, [str(star), "row 7", "rlnDefocusU"]
    if kind == "negative_defocus":
        lines = _edit_particle_row(lines, 12, col["rlnDefocusV"], "-1500.0")
        star.write_text("\n".join(lines) + "\n")
        return star, [str(star), "row 12", "rlnDefocusV"]
    if kind == "empty_star":
        star.write_text("")
        return star, [str(star), "empty"]
    if kind == "empty_cs":
        cs = proj / "particles.cs"
        cs.write_bytes(b"")
        return cs, [str(cs), "empty"]
    if kind == "cs_without_blob":
        cs = proj / "particles.cs"
        d = Dataset.load(str(cs))
        Dataset([(f, d[f]) for f in d.fields() if not f.startswith("blob/")]).save(str(cs))
        return cs, [str(cs), "blob/"]
    if kind == "not_found":
        return proj / "nope.star", [str(proj / "nope.star"), "not found"]
    if kind == "unknown_suffix":
        return proj / "truth.csv", [str(proj / "truth.csv"), ".star", ".cs"]
    raise AssertionError(kind)


BAD = [
    "missing_stack",
    "missing_stack_cs",
    "index_past_end",
    "no_image_name",
    "box_mismatch",
    "nan_defocus",
    "negative_defocus",
    "empty_star",
    "empty_cs",
    "cs_without_blob",
    "not_found",
    "unknown_suffix",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_exit_2_one_line(sim, tmp_path, capsys, kind):
    path, must = _case(sim, tmp_path, kind)
    rc, out, err = _info(capsys, str(path))
    assert rc == 2
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.startswith("companion info: error:")]
    assert lines, err
    # the first error line alone names the file and the row/field
    for text in must:
        assert text in lines[0], (text, lines[0])
    # --json: same verdict, machine-readable
    rc, out, _ = _info(capsys, str(path), "--json")
    assert rc == 2
    doc = json.loads(out)
    assert doc["ok"] is False and doc["problems"]
    assert any(must[1] in p for p in doc["problems"])


def test_all_problems_reported_not_only_the_first(sim, tmp_path, capsys):
    proj = tmp_path / "proj"
    shutil.copytree(sim, proj)
    (proj / "stacks" / "mic_00003.mrcs").unlink()
    star = proj / "particles.star"
    lines = _star_lines(star)
    labels = [ln.split()[0] for ln in lines if ln.startswith("_rln")]
    col = labels[labels.index("_rlnImageName") :].index("_rlnDefocusU")
    lines = _edit_particle_row(lines, 3, col, "nan")
    lines = _edit_particle_row(lines, 9, col, "-5")
    star.write_text("\n".join(lines) + "\n")
    particles, problems = inspect(star)
    text = "\n".join(problems)
    assert "row 3" in text and "row 9" in text
    rc, out, _ = _info(capsys, str(star))
    assert rc == 2
    assert "row 3" in out and "row 9" in out


def test_open_particles_dispatch(sim):
    a = open_particles(sim / "particles.star")
    b = open_particles(sim / "particles.cs", sim)
    assert (a.host, b.host) == ("relion", "cryosparc")
    assert len(a) == len(b) == N
    assert np.array_equal(a.optics_group, b.optics_group)
