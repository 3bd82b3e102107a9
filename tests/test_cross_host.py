"""The same particles described by particles.star and particles.cs give the same ParticleSet:
identical images (the documented sign between the formats is +1: the simulator's stacks are
protein white, recorded as blob/sign -1 in the .cs) and identical CTF arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryosparc.dataset import Dataset

import companion.cryosparc as cryosparc
import companion.relion as relion
from companion.classify.ctf import ctf_2d, rfft_freqs
from companion.simulate import load_truth, simulate
from companion.sources import open_particles

N, BOX = 240, 48


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("xhost") / "s"
    simulate(out, N, box=BOX, seed=7, per_micrograph=80, n_optics_groups=2, progress=False)
    star = relion.read_particles(out / "particles.star")
    cs = cryosparc.read_particles(out / "particles.cs", out)
    return out, star, cs


def test_same_metadata(pair):
    out, a, b = pair
    assert (a.host, b.host) == ("relion", "cryosparc")
    assert len(a) == len(b) == N and a.box == b.box == BOX
    assert a.project_dir.resolve() == b.project_dir.resolve() == Path(out).resolve()
    np.testing.assert_array_equal(a.psize, b.psize)
    np.testing.assert_array_equal(a.optics_group, b.optics_group)
    np.testing.assert_array_equal(a.image_paths(), b.image_paths())
    np.testing.assert_array_equal(a.image_index, b.image_index)
    for name, va in a.ctf.as_dict().items():
        np.testing.assert_array_equal(va, b.ctf.as_dict()[name], err_msg=name)
    np.testing.assert_array_equal(a.ctf_premultiplied, b.ctf_premultiplied)
    np.testing.assert_array_equal(a.phase_flipped, b.phase_flipped)


def test_documented_sign(pair):
    out, a, b = pair
    dset = Dataset.load(str(out / "particles.cs"))
    assert np.all(dset["blob/sign"] == -1)  # CryoSPARC's mark for protein-white stacks
    assert np.all(a.contrast == 1) and np.all(b.contrast == 1)


def test_identical_images(pair):
    _, a, b = pair
    idx = np.random.default_rng(0).permutation(N)[:100]
    ia, ib = a.read_images(idx), b.read_images(idx)
    assert ia.shape == (100, BOX, BOX)
    np.testing.assert_array_equal(ia, ib)
    # batches in file order agree too
    for (ka, xa), (kb, xb) in zip(a.iter_batches(64), b.iter_batches(64), strict=True):
        np.testing.assert_array_equal(ka, kb)
        np.testing.assert_array_equal(xa, xb)


def test_identical_ctf_arrays(pair):
    _, a, b = pair
    kx, ky = rfft_freqs(BOX, a.pixel_size)
    ca = ctf_2d(kx, ky, **a.ctf.as_dict())
    cb = ctf_2d(kx, ky, **b.ctf.as_dict())
    assert ca.shape == (N, BOX, BOX // 2 + 1)
    np.testing.assert_array_equal(ca, cb)


def test_images_match_truth_order(pair):
    out, a, b = pair
    truth = load_truth(out)
    names = [
        f"{i + 1:06d}@{Path(p).relative_to(out).as_posix()}"
        for i, p in zip(a.image_index, a.image_paths(), strict=True)
    ]
    assert names == truth["image_name"].tolist()


def test_sources_dispatch_matches_host_readers(pair):
    out, a, b = pair
    a2 = open_particles(out / "particles.star")
    b2 = open_particles(out / "particles.cs", out)
    np.testing.assert_array_equal(a2.read_images(np.arange(10)), a.read_images(np.arange(10)))
    np.testing.assert_array_equal(b2.read_images(np.arange(10)), b.read_images(np.arange(10)))
