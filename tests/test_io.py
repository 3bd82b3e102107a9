"""companion.io: atomic writes (complete or absent, umask mode), the MRC stack writer."""

from __future__ import annotations

import os
import stat

import mrcfile
import numpy as np
import pytest

from companion import report
from companion.io.atomic import atomic_path, atomic_paths, atomic_write_text
from companion.io.mrc import write_mrc_stack


def test_atomic_path_cleans_up_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_paths_all_or_nothing(tmp_path):
    paths = {"a": tmp_path / "a", "b": tmp_path / "b"}
    with pytest.raises(RuntimeError):
        with atomic_paths(paths) as tmp:
            tmp["a"].write_text("a")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_paths(paths) as tmp:
        tmp["a"].write_text("a")
        tmp["b"].write_text("b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_replacing_keeps_the_file_mode(tmp_path):
    path = tmp_path / "t.txt"
    atomic_write_text(path, "x")
    assert _mode(path) == 0o666 & ~_current_umask()
    os.chmod(path, 0o640)
    atomic_write_text(path, "y")
    assert _mode(path) == 0o640 and path.read_text() == "y"


def test_png_and_summary_readable_by_group_and_others(tmp_path):
    expect = 0o666 & ~_current_umask()
    res_png = report.write_occupancy(tmp_path / "o.png", np.array([3, 5]))
    res_json = report.write_json(tmp_path / "summary.json", {"a": 1})
    assert _mode(res_png) == expect and _mode(res_json) == expect


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_mrc_stack(tmp_path):
    imgs = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    write_mrc_stack(tmp_path / "s.mrc", imgs, 1.5)
    with mrcfile.open(tmp_path / "s.mrc", permissive=False) as m:
        assert m.header.ispg == 0 and m.data.shape == (2, 4, 4)
        assert float(m.voxel_size.x) == pytest.approx(1.5)
        assert float(m.header.dmax) == 31.0 and float(m.header.dmin) == 0.0
        np.testing.assert_array_equal(m.data, imgs)
    assert [p.name for p in tmp_path.iterdir()] == ["s.mrc"]
