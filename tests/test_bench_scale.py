"""bench scale: one row per (N, K) with measured figures, resumable, exponents fitted."""

from __future__ import annotations

import numpy as np
import pytest

from companion.bench import scale as bench_scale


def test_slope_recovers_a_power_law():
    n = [1e3, 1e4, 1e5]
    assert bench_scale.slope(n, [2.0 * v**1.07 for v in n]) == pytest.approx(1.07)
    assert bench_scale.slope([5.0, 5.0], [1.0, 2.0]) is None


def test_points_are_measured_tiled_and_resumed(tmp_path, monkeypatch):
    over = {"online_iters": 1, "full_iters": 1, "batch_per_class": 20, "max_resolution": 12.0}
    rep = bench_scale.run_scale_benchmark(tmp_path, [40, 80], [2, 4], 32, 0, over, base_max=40)
    assert [(r["n"], r["k"]) for r in rep["points"]] == [(40, 2), (80, 2), (40, 4)]
    for r in rep["points"]:
        assert r["seconds"] > 0 and r["wall_s"] >= r["seconds"]
        assert r["peak_rss"] > 10 << 20
        # the cache holds one complex64 row per particle (tiled images included)
        assert r["cache_bytes"] >= r["n"] * 8
        assert r["iterations"] == 2
    assert rep["exponent_time_vs_n"] is not None and np.isfinite(rep["exponent_time_vs_n"])
    text = bench_scale.format_scale(rep)
    assert "time ∝ N^" in text and text.count("\n") == 5

    def boom(*a, **k):
        raise AssertionError("a finished point was run again")

    monkeypatch.setattr(bench_scale, "run_point", boom)
    again = bench_scale.run_scale_benchmark(tmp_path, [40, 80], [2, 4], 32, 0, over, 40)
    assert again["points"] == rep["points"]


def test_max_iterations_stops_each_point_early(tmp_path):
    over = {"online_iters": 3, "full_iters": 1, "batch_per_class": 20, "max_resolution": 12.0}
    rep = bench_scale.run_scale_benchmark(tmp_path, [40], [2], 32, 0, over, 40, max_iterations=1)
    (row,) = rep["points"]
    assert row["iterations"] == 1 and row["peak_rss"] > 10 << 20
    assert "first 1 iteration(s) only" in bench_scale.format_scale(rep)
