"""bench scale: one row per (N, K) with measured wall and CPU times per stage, resumable
(finished points skipped, an interrupted point continued with its times so far),
exponents fitted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from companion.bench import scale as bench_scale

OVER = {"online_iters": 1, "full_iters": 1, "batch_per_class": 20, "max_resolution": 12.0}


def test_slope_recovers_a_power_law():
    n = [1e3, 1e4, 1e5]
    assert bench_scale.slope(n, [2.0 * v**1.07 for v in n]) == pytest.approx(1.07)
    assert bench_scale.slope([5.0, 5.0], [1.0, 2.0]) is None
    assert bench_scale.slope([1.0, 2.0], [0.0, 2.0]) is None  # a stage that took no time


def test_exponents_per_stage():
    def row(n, pre, onl, full):
        st = {"preprocess": pre, "online": onl, "full": full, "other": 0.0}
        return {"n": n, "wall_s": 2 * (pre + onl + full), "cpu_s": pre + onl + full,
                "stages": {s: {"cpu_s": v, "wall_s": 2 * v} for s, v in st.items()}}  # fmt: skip

    rows = [row(n, 1e-3 * n, 50.0, 2e-2 * n) for n in (1e4, 1e5, 1e6)]
    ex = bench_scale.exponents(rows, "n")
    assert ex["preprocess"] == pytest.approx(1.0) and ex["full"] == pytest.approx(1.0)
    assert ex["online"] == pytest.approx(0.0, abs=1e-9)
    assert 0.5 < ex["cpu"] < 1.0 and ex["wall"] == pytest.approx(ex["cpu"])


def test_clock_charges_stages_and_carries_over_segments(tmp_path):
    path = tmp_path / bench_scale.TIMES_FILE
    first = bench_scale._Clock(path)
    sum(i * i for i in range(200_000))  # some CPU time
    first.mark("preprocess")
    assert first.acc["cpu"]["preprocess"] > 0 and first.acc["peak_rss"] > 10 << 20
    second = bench_scale._Clock(path)  # a resumed segment starts from the record
    assert second.acc["segments"] == 2
    assert second.acc["cpu"]["preprocess"] == first.acc["cpu"]["preprocess"]
    second.mark("online")
    rec = json.loads(path.read_text())
    assert rec["cpu"]["preprocess"] == first.acc["cpu"]["preprocess"]
    assert rec["wall"]["online"] > 0 and rec["cpu"]["full"] == 0


def test_points_are_measured_tiled_and_resumed(tmp_path, monkeypatch):
    rep = bench_scale.run_scale_benchmark(tmp_path, [40, 80], [2, 4], 32, 0, OVER, base_max=40)
    assert [(r["n"], r["k"]) for r in rep["points"]] == [(40, 2), (80, 2), (40, 4)]
    for r in rep["points"]:
        stages = r["stages"]
        assert set(stages) == set(bench_scale.STAGES)
        assert r["cpu_s"] == pytest.approx(sum(s["cpu_s"] for s in stages.values()))
        assert r["wall_s"] == pytest.approx(sum(s["wall_s"] for s in stages.values()))
        for name in ("preprocess", "online", "full"):
            assert stages[name]["cpu_s"] > 0 and stages[name]["wall_s"] > 0
        assert r["peak_rss"] > 10 << 20 and r["segments"] == 1
        # the cache holds one complex64 row per particle (tiled images included)
        assert r["cache_bytes"] >= r["n"] * 8
        assert r["iterations"] == 2
        assert r["throughput_cpu"] == pytest.approx(r["n"] / r["cpu_s"])
    assert rep["exponent_time_vs_n"] is not None and np.isfinite(rep["exponent_time_vs_n"])
    assert rep["exponent_time_vs_n"] == rep["exponents_vs_n"]["cpu"]
    text = bench_scale.format_scale(rep)
    assert "CPU time ∝ N^" in text and "CPU time ∝ K^" in text and text.count("\n") == 6

    def boom(*a, **k):
        raise AssertionError("a finished point was run again")

    monkeypatch.setattr(bench_scale, "run_point", boom)
    again = bench_scale.run_scale_benchmark(tmp_path, [40, 80], [2, 4], 32, 0, OVER, 40)
    assert again["points"] == rep["points"]


def test_an_interrupted_point_continues_with_its_times(tmp_path):
    star = bench_scale.base_set(tmp_path, 40, 32, 0)
    work = tmp_path / "point"
    part = bench_scale.run_point(star, 60, 2, work, OVER, max_iterations=1, threads=1)
    assert part["iterations"] == 1 and part["stages"]["full"]["cpu_s"] == 0
    whole = bench_scale.run_point(star, 60, 2, work, OVER, threads=1)
    assert whole["segments"] == 2 and whole["iterations"] == 2
    # the first segment's preprocessing and online iteration are kept, not redone
    for name in ("preprocess", "online"):
        assert whole["stages"][name]["cpu_s"] == part["stages"][name]["cpu_s"]
    assert whole["stages"]["full"]["cpu_s"] > 0
    assert whole["cpu_s"] > part["cpu_s"]


def test_max_iterations_stops_each_point_early(tmp_path):
    over = {"online_iters": 3, "full_iters": 1, "batch_per_class": 20, "max_resolution": 12.0}
    rep = bench_scale.run_scale_benchmark(tmp_path, [40], [2], 32, 0, over, 40, max_iterations=1)
    (row,) = rep["points"]
    assert row["iterations"] == 1 and row["peak_rss"] > 10 << 20
    assert row["stages"]["full"]["cpu_s"] == 0
    assert "first 1 iteration(s) only" in bench_scale.format_scale(rep)
