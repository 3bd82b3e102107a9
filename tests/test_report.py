"""Gallery, occupancy plot and summary.json from a stand-in result."""

from __future__ import annotations

import json
import math

import matplotlib.image as mpimg
import numpy as np
import pytest
from runner_fakes import fake_result

from companion import report


def test_gallery_is_a_readable_png(tmp_path):
    res = fake_result(n=40, k=7, box=24)
    path = report.write_gallery(
        tmp_path / "g.png", res.averages, res.class_sizes, res.resolution_A, title="t"
    )
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 0.01  # not blank
    assert list(tmp_path.iterdir()) == [path]  # no temporary left


def test_gallery_handles_many_classes(tmp_path):
    res = fake_result(n=400, k=60, box=16)
    path = report.write_gallery(tmp_path / "g.png", res.averages, res.class_sizes, res.resolution_A)
    assert mpimg.imread(path).shape[0] > 300


def test_occupancy_plot(tmp_path):
    res = fake_result(n=50, k=5)
    p = report.write_occupancy(tmp_path / "o.png", res.class_sizes, cap=20, history=res.history)
    assert mpimg.imread(p).ndim == 3
    p2 = report.write_occupancy(tmp_path / "o2.png", res.class_sizes)  # no history, no cap
    assert mpimg.imread(p2).ndim == 3


def test_summary_json_valid(tmp_path):
    res = fake_result(n=60, k=5, cap=12)
    summary = report.build_summary(
        res,
        files={"data": tmp_path / "d.star"},
        n_particles=60,
        source="in.star",
        host="relion",
        timings={"total_s": 1.5},
    )
    path = report.write_json(tmp_path / "summary.json", summary)
    loaded = json.loads(path.read_text())
    assert loaded["class_sizes"] == [12, 12, 12, 12, 12]
    assert loaded["n_particles"] == 60 and loaded["n_classes"] == 5
    assert loaded["cap"] == 12 and loaded["largest_class"] == 12 and loaded["cap_respected"]
    assert loaded["resolution_A"][-1] is None  # inf becomes null, never Infinity
    assert loaded["resolution_A"][0] == pytest.approx(8.0)
    assert loaded["best_resolution_A"] == pytest.approx(8.0)
    assert loaded["files"]["data"] == str(tmp_path / "d.star")
    assert loaded["timings"]["total_s"] == 1.5
    assert loaded["timings"]["iterations_s"] == [0.1, 0.1, 0.1]
    assert loaded["device"] == "cpu (numpy)" and loaded["iterations"] == 3
    assert "Infinity" not in path.read_text() and "NaN" not in path.read_text()


def test_summary_counts_small_classes():
    res = fake_result(n=60, k=5)  # class 0 holds the first third plus its share
    s = report.build_summary(res, files={}, n_particles=60)
    sizes = np.asarray(s["class_sizes"])
    assert s["largest_class"] == sizes.max() and s["largest_class_number"] == 1
    assert s["largest_class_fraction"] == pytest.approx(sizes.max() / 60)
    assert s["classes_below_10pct_of_mean"] == int((sizes < 1.2).sum())
    assert s["cap"] is None and s["cap_respected"] is True


def test_jsonable():
    out = report.jsonable(
        {"a": np.float32(1.5), "b": np.array([1, 2]), "c": math.inf, 1: (np.int64(3), math.nan)}
    )
    assert out == {"a": 1.5, "b": [1, 2], "c": None, "1": [3, None]}
