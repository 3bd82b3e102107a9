"""The data-based contrast check catches an inverted convention."""

from __future__ import annotations

import numpy as np
import pytest

from companion.cli import main
from companion.contrast import measure_contrast
from companion.simulate import simulate
from companion.sources import open_particles


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("contrast")
    simulate(out, 600, box=64, psize=3.0, seed=3)
    return out


def test_simulated_particles_read_white(sim):
    check = measure_contrast(open_particles(sim / "particles.star"))
    assert check.verdict == "white"
    assert check.n_sampled == 500


def test_inverted_convention_reads_dark(sim):
    particles = open_particles(sim / "particles.cs")
    particles.contrast = -particles.contrast
    assert measure_contrast(particles).verdict == "dark"


def test_info_warns_when_sign_looks_inverted(sim, capsys):
    from cryosparc.dataset import Dataset

    dset = Dataset.load(sim / "particles.cs")
    dset["blob/sign"] = -np.asarray(dset["blob/sign"])
    bad = sim / "flipped.cs"
    dset.save(bad)
    rc = main(["info", str(bad), "--project-dir", str(sim)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "measured on 500 particles: dark" in out
    assert "convention looks inverted" in out
