"""Checks before any work: the parameters against the particles, the device, clamped values.

Called once per run, by :func:`companion.outdir.exclusive` before it claims the output
directory (so every command and host job gets them). A caller that must refuse before it
creates anything (the CryoSPARC job before its job exists, the demo before it simulates)
runs :func:`check_run` itself and passes ``checked=True`` to
:func:`companion.run.run_classification`. The parameters were validated by the params model
when the command line was parsed; here they meet the particles: a cap or a class count that
cannot work for N particles, ``--device gpu`` without a GPU, and a value the classifier
silently clamps (``--max-resolution`` beyond Nyquist or so coarse that a handful of Fourier
coefficients remain, a mask wider than the box), logged with the value actually used.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("companion.preflight")

MIN_COEFFICIENTS = 50  # below this, alignment has almost nothing to work with


def clamp_warnings(particles: Any, params: Any) -> list[str]:
    """One line per parameter the classifier will clamp, naming the value it uses."""
    from companion.classify.fourier import Geometry

    if len(particles) == 0 or getattr(params, "max_resolution", None) is None:
        return []
    box, psize = int(particles.box), float(particles.pixel_size)
    geom = Geometry.create(box, psize, params.max_resolution, params.particle_diameter)
    used = box * psize / geom.s_max
    out: list[str] = []
    nyquist = 2 * psize
    if params.max_resolution < nyquist - 1e-6:
        out.append(
            f"--max-resolution {params.max_resolution:g} Å is beyond Nyquist of the images "
            f"({psize:g} Å/px): using {used:.2f} Å"
        )
    elif geom.n_coef < MIN_COEFFICIENTS:
        out.append(
            f"--max-resolution {params.max_resolution:g} Å keeps only {geom.n_coef} Fourier "
            f"coefficients (using {used:.1f} Å in a {box * psize:.0f} Å box): alignment will be "
            "poor — use 4-12 Å"
        )
    d = params.particle_diameter
    if d is not None:
        used_d = 2 * geom.mask_radius * geom.work_psize
        if d > used_d + 1e-3:
            out.append(
                f"--particle-diameter {d:g} Å is larger than the box ({box * psize:.1f} Å): "
                f"using a {used_d:.1f} Å mask"
            )
    return out


def check_run(params: Any, n_particles: int) -> None:
    """ParameterError when ``params`` cannot work for ``n_particles``, DeviceError when the
    device asked for is absent."""
    from companion.run import check_device

    params.check_feasible(n_particles)
    check_device(params.device)


def preflight(particles: Any, params: Any, *, checked: bool = False) -> None:
    """:func:`check_run` (unless the caller ran it: ``checked``), then warnings for clamped
    parameters (stacks are checked by :func:`companion.stacks.require_stacks` right before
    the classifier starts)."""
    if not checked:
        check_run(params, len(particles))
    for line in clamp_warnings(particles, params):
        log.warning("%s", line)
