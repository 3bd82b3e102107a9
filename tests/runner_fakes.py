"""Stand-ins for the runner tests: a ClassResult and a ParticleSet without image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from companion.classify.result import ClassResult
from companion.particles import CtfParams, ParticleSet


def fake_particles(n: int = 60, box: int = 32, host: str = "relion") -> ParticleSet:
    ctf = CtfParams(
        defocus_u=np.full(n, 15000.0),
        defocus_v=np.full(n, 14500.0),
        defocus_angle=np.zeros(n),
        voltage=np.full(n, 300.0),
        cs=np.full(n, 2.7),
        amp_contrast=np.full(n, 0.1),
        phase_shift=np.zeros(n),
        bfactor=np.zeros(n),
        scale=np.ones(n),
    )
    return ParticleSet(
        source_path=Path("/nonexistent/particles.star"),
        project_dir=Path("/nonexistent"),
        stack_paths=[Path("/nonexistent/stack.mrcs")],
        stack_index=np.zeros(n),
        image_index=np.arange(n),
        box=box,
        psize=1.5,
        optics_group=1,
        ctf=ctf,
        contrast=1.0,
        ctf_premultiplied=False,
        phase_flipped=False,
        host=host,
    )


def fake_result(
    n: int = 60, k: int = 5, box: int = 32, cap: int | None = None, seed: int = 0
) -> ClassResult:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    labels[: n // 3] = 0  # one big class
    if cap is not None:
        labels = np.arange(n) % k
    sizes = np.bincount(labels, minlength=k).astype(np.int64)
    s = box // 2 + 1
    res = np.linspace(8.0, 20.0, k).astype(np.float32)
    res[-1] = np.inf
    yy, xx = np.mgrid[0:box, 0:box] - box // 2
    avgs = np.stack([np.exp(-((xx - c) ** 2 + yy**2) / 20.0) for c in range(k)]).astype(np.float32)
    f32 = np.float32
    return ClassResult(
        class_id=labels.astype(np.int32),
        psi_deg=rng.uniform(0, 360, n).astype(f32),
        shift_px=rng.normal(size=(n, 2)).astype(f32),
        max_prob=np.ones(n, f32),
        class_prob=np.ones(n, f32),
        loglik=np.zeros(n, f32),
        n_significant=np.ones(n, np.int32),
        norm_correction=np.ones(n, f32),
        half_set=(np.arange(n) % 2).astype(np.uint8),
        class_ess=np.ones(n, f32),
        averages=avgs,
        class_sizes=sizes,
        class_distribution=(sizes / n).astype(f32),
        resolution_A=res,
        accuracy_rot_deg=np.full(k, 3.0, f32),
        accuracy_trans_A=np.full(k, 1.0, f32),
        prior_offset_px=np.zeros((k, 2), f32),
        shell_resolution_A=np.r_[np.inf, box * 1.5 / np.arange(1, s)].astype(f32),
        frc=np.zeros((k, s), f32),
        ssnr=np.zeros((k, s), f32),
        sigma2_ref=np.zeros((k, s), f32),
        tau2=np.zeros((k, s), f32),
        sigma2_noise=np.ones((1, s), f32),
        optics_groups=np.ones(1, np.int32),
        iteration=3,
        n_iterations=3,
        work_box=box,
        work_psize=1.5,
        current_resolution_A=8.0,
        loglik_total=-1.0,
        avg_pmax=0.9,
        sigma_offsets_A=1.0,
        cap=cap,
        params={"n_classes": k},
        device="cpu (numpy)",
        timings={"iterations_s": [0.1, 0.1, 0.1]},
        history=[{"iteration": i + 1, "class_sizes": sizes.tolist()} for i in range(3)],
        # the fake particles have no images: the feature the run would compute from them
        lowres_power=rng.normal(size=n).astype(f32),
    )
