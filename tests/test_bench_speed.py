"""``companion bench speed``'s steady-state pass: at the stated resolution, with the time
split into its parts and the scoring GEMM rate against a peak measured on its shape."""

from __future__ import annotations

import pytest

from companion.bench.speed import format_speed, run_speed_benchmark


def test_steady_state_pass_at_the_stated_resolution(tmp_path):
    rep = run_speed_benchmark(n=40, box=64, classes=2, iters=1, relion=False,
                              out_dir=tmp_path, resolution=6.0)  # fmt: skip
    st = rep["companion"]["cpu"]["steady"]
    assert st["resolution_A"] == pytest.approx(6.0, rel=0.02)  # 192 Å box / shell 32
    assert st["coefficients"] > 4 * st["coarse_coefficients"] / 2  # full F, not the coarse F
    parts = ["e_step_coarse_s", "e_step_fine_s", "m_step_s", "io_s"]
    assert all(st[p] > 0 for p in parts)
    assert sum(st[p] for p in parts) <= 1.05 * st["seconds"] + st["io_s"]
    assert st["evaluations_per_s"] == pytest.approx(40 * 2 / st["seconds"])
    assert st["cpu_seconds"] > 0  # CPU time of all threads (wall time is noise when loaded)
    assert 0 < st["coarse_gemm_flops"] and st["sgemm_peak_flops"] > 0
    # every particle scored against every class (not the seeding pass's one reference):
    # the coarse GEMM (40·Tc, 2Fc) × (2Fc, K·Rc) once, its shape the peak's
    m, inner, cols = st["peak_shape"]
    assert m % 40 == 0 and cols % 2 == 0
    assert st["coarse_flop"] == pytest.approx(2.0 * m * inner * cols * (1 + 1 / (2 * (m // 40))))
    text = format_speed(rep)
    assert "steady state at 6.0 Å" in text and "SGEMM peak measured on its shape" in text
