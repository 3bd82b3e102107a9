"""Clamped parameters are warned with the value used (issue 16)."""

from __future__ import annotations

import pytest

from companion.params import ClassifyParams
from companion.preflight import clamp_warnings


class _Particles:
    box, pixel_size = 32, 1.5

    def __len__(self) -> int:
        return 10


@pytest.mark.parametrize(
    "kw,expect",
    [
        (dict(max_resolution=1.0), ["--max-resolution 1 Å is beyond Nyquist", "using 3.00 Å"]),
        (dict(max_resolution=1000.0), ["--max-resolution 1000 Å keeps only 6 Fourier", "24.0 Å"]),
        (dict(particle_diameter=500.0), ["--particle-diameter 500 Å is larger", "42.0 Å mask"]),
    ],
)
def test_clamped_value_is_named(kw, expect):
    lines = clamp_warnings(_Particles(), ClassifyParams(**kw))
    assert len(lines) == 1
    for text in expect:
        assert text in lines[0], lines[0]


def test_usual_values_are_silent():
    assert clamp_warnings(_Particles(), ClassifyParams(max_resolution=6.0)) == []
    assert clamp_warnings(_Particles(), ClassifyParams(particle_diameter=30.0)) == []
    assert clamp_warnings(_Particles(), ClassifyParams(max_resolution=3.0)) == []  # = Nyquist
