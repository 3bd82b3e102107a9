"""Stack images read by pread past the MRC header: the values mrcfile reads, in every image
mode and byte order, and nothing mapped into the process (RSS stays flat)."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from companion.particles import CTF_FIELDS, CtfParams, ParticleSet
from companion.stacks import StackCache, read_images


def particles_over(paths: list[Path], n_per: int, box: int) -> ParticleSet:
    n = len(paths) * n_per
    ctf = CtfParams(**{f: np.ones(n) for f in CTF_FIELDS})
    return ParticleSet(
        source_path=paths[0].with_suffix(".star"), project_dir=paths[0].parent,
        stack_paths=paths, stack_index=np.repeat(np.arange(len(paths)), n_per),
        image_index=np.tile(np.arange(n_per), len(paths)), box=box, psize=1.0,
        optics_group=1, ctf=ctf, contrast=1.0, ctf_premultiplied=False,
        phase_flipped=False, host="relion",
    )  # fmt: skip


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<i2", ">i2", "<u2", "i1", "<f2"])
def test_every_image_mode_reads_as_mrcfile_does(tmp_path, dtype):
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(7, 12, 12)) * 20).astype(dtype)
    path = tmp_path / "s.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.set_extended_header(np.zeros(10, dtype=[("x", "i4")]))  # data after 40 bytes
    with mrcfile.open(path, permissive=True) as mrc:
        want = np.asarray(mrc.data, np.float32)
    ps = particles_over([path], 7, 12)
    idx = np.array([6, 0, 3, 3, 1])  # unsorted, repeated
    np.testing.assert_array_equal(read_images(ps, idx), want[idx])


def _rss_file() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status RssFile on this system")


def test_reading_a_stack_does_not_map_it_into_rss(tmp_path):
    box, n = 64, 2048  # a 32 MiB stack
    path = tmp_path / "big.mrcs"
    with mrcfile.new_mmap(path, shape=(n, box, box), mrc_mode=2) as mrc:
        mrc.data[:] = 1.0
    ps = particles_over([path], n, box)
    before = _rss_file()
    total = 0.0
    for s in range(0, n, 256):
        total += float(read_images(ps, np.arange(s, s + 256)).sum())
    assert total == n * box * box
    assert _rss_file() - before < 8 << 20  # a memory map would add the 32 MiB read


def test_the_cache_keeps_a_bounded_number_of_files_open(tmp_path):
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"s{i}.mrcs")
        with mrcfile.new(paths[-1]) as mrc:
            mrc.set_data(np.full((2, 8, 8), i, np.float32))
    cache = StackCache(max_open=2)
    for p in paths:
        assert cache.data(p)[np.array([1])][0, 0, 0] == paths.index(p)
    assert len(cache._open) == 2
    cache.close()
    assert not cache._open
