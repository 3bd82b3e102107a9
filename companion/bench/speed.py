"""``companion bench speed``: throughput of the classifier against the machine and RELION.

Measures, on simulated particles, per iteration: particles/s and particle×class evaluations/s
(N·K per full pass / wall seconds), the GEMM FLOP/s the scoring achieves (8·N·K·R·T·F per
pass for R rotations, T shifts and F Fourier coefficients, unless the classifier records its
own count), and the same machine's float32 matmul peak (a timed GEMM of the same inner size
2F). With ``relion_refine`` on PATH, RELION 3.1 2D classification runs on the same particles,
K, psi step, offset range and iterations, and the time per iteration is compared.

To compare like with like both programs do full passes: companion runs ``online_iters 0,
full_iters I``; RELION runs ``--iter I`` (every RELION iteration is a full pass). RELION's
sampling is given the way its GUI does (``--psi_step 2X --oversampling 1`` samples X degrees
at the fine level, offsets likewise), so RELION gets its usual adaptive oversampling.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from companion.params import ClassifyParams

log = logging.getLogger("companion.bench")


# ------------------------------------------------------------------ the machine


def machine_info() -> dict[str, Any]:
    """CPU model, cores available to this process, BLAS, GPU (when CuPy sees one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": cores,
        "numpy": np.__version__,
        "blas": _blas_name(),
        "gpu": None,
    }
    from companion.classify.backend import cupy_or_none

    cp = cupy_or_none()
    if cp is not None:
        dev = cp.cuda.Device()
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"]
        info["gpu"] = {
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "memory_GiB": round(props["totalGlobalMem"] / 2**30, 1),
            "cupy": cp.__version__,
        }
    return info


def _blas_name() -> str:
    try:
        cfg = np.show_config(mode="dicts")  # numpy >= 1.25
        blas = cfg["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:
        return "unknown"


def describe_machine(info: dict[str, Any]) -> str:
    s = f"CPU: {info['cpu']}, {info['cores']} cores available (BLAS {info['blas']})"
    gpu = info.get("gpu")
    s += f"; GPU: {gpu['name']} ({gpu['memory_GiB']} GiB)" if gpu else "; GPU: none"
    return s


def matmul_peak(xp: Any, inner: int, size: int = 4096, repeats: int = 5) -> float:
    """Measured float32 GEMM rate (FLOP/s) of a ``(size, inner) @ (inner, size)`` product."""
    inner = max(int(inner), 16)
    if xp is np:
        size = min(size, 2048)
    return gemm_peak(xp, size, inner, size, repeats)


def device_sync(xp: Any) -> Any:
    """A function that waits for the device's queued work (a no-op for NumPy), for timing."""
    if xp is np:
        return lambda: None
    return lambda: xp.cuda.Device().synchronize()


# ------------------------------------------------------------------ work counts


def sampling_counts(params: ClassifyParams, box: int, psize: float) -> dict[str, Any]:
    """Rotations R, shifts T, working box and kept Fourier coefficients F at the maximum
    resolution, as the design defines them (an exhaustive search)."""
    # Nyquist of the working box at the maximum resolution, rounded up to an even size
    work_box = min(box, max(8, 2 * int(math.ceil(box * psize / params.max_resolution))))
    work_psize = psize * box / work_box
    r = int(round(360.0 / params.psi_step))
    max_shift_work = params.max_shift * work_box
    n_side = int(math.floor(max_shift_work / params.shift_step))
    grid = np.arange(-n_side, n_side + 1) * params.shift_step
    t = int(((grid[:, None] ** 2 + grid[None, :] ** 2) <= max_shift_work**2 + 1e-9).sum())
    ky = np.fft.fftfreq(work_box, d=work_psize)[:, None]
    kx = np.fft.rfftfreq(work_box, d=work_psize)[None, :]
    f = int(((kx**2 + ky**2) <= (1.0 / params.max_resolution) ** 2).sum())
    return {"R": r, "T": t, "F": f, "work_box": work_box, "work_psize": work_psize}


def pass_flops(n: int, k: int, counts: dict[str, Any]) -> float:
    """8·N·K·R·T·F: scoring and update GEMMs of one exhaustive pass."""
    return 8.0 * n * k * counts["R"] * counts["T"] * counts["F"]


# ------------------------------------------------------------------ companion


class _Timer:
    """Callbacks recording every iteration: wall seconds, particles, the classifier's GFLOP."""

    def __init__(self) -> None:
        self.t_last = time.perf_counter()
        self.rows: list[dict[str, Any]] = []

    def on_iteration(self, info: Any) -> None:
        now = time.perf_counter()
        extra = getattr(info, "extra", {}) or {}
        self.rows.append(
            {
                "iteration": getattr(info, "iteration", len(self.rows) + 1),
                "stage": getattr(info, "stage", "?"),
                "n_particles": getattr(info, "n_particles", None),
                "wall_s": now - self.t_last,
                "seconds": float(getattr(info, "seconds", now - self.t_last)),
                "gflop": extra.get("gflop"),
            }
        )
        self.t_last = now


def time_companion(particles: Any, params: ClassifyParams, out_dir: Path) -> dict[str, Any]:
    """Run companion and time each iteration (the classifier's own seconds per iteration)."""
    from companion.run import run_classification

    timer = _Timer()
    t0 = time.perf_counter()
    timer.t_last = t0
    out = run_classification(particles, params, out_dir, callbacks=timer)
    total = time.perf_counter() - t0
    k = params.n_classes
    iters = []
    for row in timer.rows:
        s, n = row["seconds"], row["n_particles"] or len(particles)
        r = dict(row, particles_per_s=n / s, evaluations_per_s=n * k / s)
        if row["gflop"] is not None:
            r["gemm_flops"] = row["gflop"] * 1e9 / s
        iters.append(r)
    return {
        "iterations": iters,
        "total_s": total,
        "device": out.result.device,
        "timings": out.summary.get("timings", {}),
        "work_box": out.result.work_box,
        "result_dir": str(out_dir),
        "_averages": out.result.averages,
    }


# ------------------------------------------------------------------ steady state


def gemm_peak(xp: Any, m: int, inner: int, n: int, repeats: int = 3) -> float:
    """Measured float32 GEMM rate (FLOP/s) of an ``(m, inner) @ (inner, n)`` product: the
    scoring GEMM's own shape (capped at 4096 rows and columns)."""
    m, n, inner = min(max(m, 16), 4096), min(max(n, 16), 4096), max(int(inner), 16)
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((m, inner), dtype=np.float32))
    b = xp.asarray(rng.standard_normal((inner, n), dtype=np.float32))
    out = a @ b
    sync = device_sync(xp)
    sync()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        out = xp.matmul(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * n * inner / best


def time_steady_state(particles: Any, params: ClassifyParams, refs: np.ndarray,
                      resolution: float, work: Path) -> dict[str, Any]:  # fmt: skip
    """One full pass of the classifier at the E-step limit ``resolution`` (Å), started from
    converged references ``refs`` (K, box, box) at the original box — the regime a run spends
    most of its time in. Seconds split into E-step coarse / fine / rest, M-step and I/O
    (reading the preprocessed coefficients and CTF terms, timed separately on the same
    batches), with the scoring GEMM rate against an SGEMM peak of the same shape."""
    from companion.classify import em, score
    from companion.classify import fourier as fo
    from companion.classify.backend import select_device, to_device
    from companion.classify.mstep import shell_power
    from companion.classify.preprocess import ctf_terms, prepare

    xp = select_device(params.device)
    # a pass after the first: iteration 1 is the seeding pass, which aligns each particle to
    # one reference (its dealt class) instead of scoring all K classes
    params = params.model_copy(update={"online_iters": 0, "full_iters": 2})
    run = em._Run(particles, params, xp, work / "checkpoint", True, None)
    geom = run.geom
    prep = prepare(particles, geom, work / "cache", xp)
    st = run.initial_state(prep)
    st.refs = fo.fourier_crop(np.asarray(refs, np.float32), geom.work_box)
    st.tau2 = shell_power(fo.to_kept(to_device(st.refs, xp), geom), geom)
    st.current_shell = min(geom.s_max, int(math.floor(geom.box * geom.psize / resolution)))
    shell = st.current_shell  # the M-step moves it on: keep the one the pass runs at
    it = run.total  # 2: every particle against every class
    score.TIMINGS = {}
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        run.iteration(it, st, prep)
        total = time.perf_counter() - t0
        cpu_total = time.process_time() - c0
        parts = dict(score.TIMINGS)
    finally:
        score.TIMINGS = None
    sync = device_sync(xp)
    t_io = time.perf_counter()
    for s in range(0, run.n, st.batch):
        chunk = np.arange(s, min(run.n, s + st.batch))
        to_device(np.asarray(prep.coeffs[chunk]), xp)
        ctf_terms(particles, chunk, geom, xp)
    sync()
    io_s = time.perf_counter() - t_io
    n, k, r = run.n, run.k, run.r
    e_step = st.timings["e_step_s"]
    coarse, fine = parts.get("coarse_s", 0.0), parts.get("fine_s", 0.0)
    nf = geom.prefix(shell)
    fc = geom.prefix(score.Search.coarse_shell(shell))
    tc = int(run.search.coarse_shift_idx.shape[0]) if run.search.mode == "fast" else 0
    peak = gemm_peak(xp, min(st.batch, n) * max(tc, 1), 2 * fc, k * ((r + 1) // 2))
    return {
        "resolution_A": geom.box * geom.psize / shell,
        "coefficients": nf,
        "coarse_coefficients": fc,
        "batch": st.batch,
        "seconds": total,
        "cpu_seconds": cpu_total,  # all threads: comparable on a loaded machine, unlike wall
        "evaluations_per_s": n * k / total,
        "e_step_coarse_s": coarse,
        "e_step_fine_s": fine,
        "e_step_other_s": max(e_step - coarse - fine - io_s, 0.0),
        "m_step_s": st.timings["m_step_s"],
        "io_s": io_s,
        "coarse_flop": parts.get("coarse_flop", 0.0),
        "coarse_gemm_flops": parts.get("coarse_flop", 0.0) / max(coarse, 1e-12),
        "fine_gemm_flops": parts.get("fine_flop", 0.0) / max(fine, 1e-12),
        "sgemm_peak_flops": peak,
        "peak_shape": [min(st.batch, n) * max(tc, 1), 2 * fc, k * ((r + 1) // 2)],
    }


# ------------------------------------------------------------------ RELION


def relion_command(
    star: Path,
    out_root: Path,
    params: ClassifyParams,
    box: int,
    psize: float,
    iters: int,
    threads: int,
) -> list[str]:
    """relion_refine 2D with companion's K, sampling, offsets, T and resolution limit."""
    diameter = params.particle_diameter or 0.9 * box * psize
    work = sampling_counts(params, box, psize)
    step_px = params.shift_step * work["work_psize"] / psize  # companion's step, original px
    return [
        "relion_refine",
        "--o",
        str(out_root),
        "--i",
        str(star),
        "--K",
        str(params.n_classes),
        "--iter",
        str(iters),
        "--psi_step",
        f"{2 * params.psi_step:g}",
        "--oversampling",
        "1",
        "--offset_range",
        f"{params.max_shift * box:g}",
        "--offset_step",
        f"{2 * step_px:g}",
        "--tau2_fudge",
        f"{params.tau2_fudge:g}",
        "--strict_highres_exp",
        f"{params.max_resolution:g}",
        "--particle_diameter",
        f"{diameter:g}",
        "--ctf",
        "--zero_mask",
        "--norm",
        "--scale",
        "--flatten_solvent",
        "--dont_combine_weights_via_disc",
        "--pool",
        "30",
        "--random_seed",
        str(params.seed),
        "--j",
        str(threads),
    ]


def time_relion(star: Path, cmd_root: Path, cmd: list[str], iters: int) -> dict[str, Any]:
    """Run relion_refine in the STAR file's directory; seconds per iteration from the
    timestamps of ``run_it000`` (after initialisation) and ``run_itNNN`` outputs."""
    cwd = star.parent
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"relion_refine exited {proc.returncode}: {' | '.join(tail)}"}
    stamps = []
    for it in range(iters + 1):
        p = cwd / f"{cmd_root}_it{it:03d}_model.star"
        stamps.append(p.stat().st_mtime if p.exists() else math.nan)
    per_iter = [float(x) for x in np.diff(stamps)]
    return {
        "command": " ".join(cmd),
        "total_s": total,
        "iterations_s": per_iter,
        "seconds_per_iteration": float(np.nanmean(per_iter)) if per_iter else math.nan,
        "last_iteration_s": per_iter[-1] if per_iter else math.nan,
    }


# ------------------------------------------------------------------ the benchmark


def run_speed_benchmark(
    *,
    n: int = 1000,
    box: int = 128,
    classes: int = 20,
    iters: int = 2,
    devices: tuple[str, ...] = ("cpu",),
    relion: bool = True,
    out_dir: Path | None = None,
    seed: int = 0,
    threads: int | None = None,
    search: str = "fast",
    resolution: float = 6.0,
    tf32: bool = False,
) -> dict[str, Any]:
    """Simulate, time companion on each device (and RELION), return the figures; for each
    device also one steady-state pass at ``resolution`` Å (see :func:`time_steady_state`)."""
    from companion.simulate import simulate
    from companion.sources import open_particles

    keep = out_dir is not None
    base = Path(out_dir) if keep else Path(tempfile.mkdtemp(prefix="companion-bench-"))
    try:
        base.mkdir(parents=True, exist_ok=True)
        data = base / "data"
        log.info("simulating %d particles at box %d in %s", n, box, data)
        simulate(data, n, box=box, psize=192.0 / box, seed=seed, progress=False)
        star = data / "particles.star"
        particles = open_particles(star, None)
        psize = particles.pixel_size
        info = machine_info()
        threads = threads or info["cores"]
        report: dict[str, Any] = {
            "machine": info,
            "n": n,
            "box": box,
            "psize": psize,
            "classes": classes,
            "iters": iters,
            "search": search,
            "resolution_A": resolution,
            "tf32": tf32,
        }
        runs = {}
        for device in devices:
            params = ClassifyParams(
                n_classes=classes,
                online_iters=0,
                full_iters=iters,
                device=device,
                seed=seed,
                search=search,
                max_resolution=resolution,
                tf32=tf32,
            )
            counts = sampling_counts(params, box, psize)
            res = time_companion(particles, params, base / f"companion_{device}")
            refs = res.pop("_averages")
            res["steady"] = time_steady_state(particles, params, refs, resolution,
                                              base / f"steady_{device}")  # fmt: skip
            steady = _steady(res["iterations"])
            res["sampling"] = counts
            res["search"] = search
            res["seconds_per_pass"] = steady["seconds"]
            res["particles_per_s"] = n / steady["seconds"]
            res["evaluations_per_s"] = n * classes / steady["seconds"]
            res["gemm_flops"] = steady.get("gemm_flops", math.nan)
            res["exhaustive_equivalent_flops"] = pass_flops(n, classes, counts) / steady["seconds"]
            xp = np
            if device == "gpu":
                import cupy as xp  # noqa: F811
            res["matmul_peak_flops"] = matmul_peak(xp, 2 * counts["F"])
            res["fraction_of_peak"] = res["gemm_flops"] / res["matmul_peak_flops"]
            runs[device] = res
        report["companion"] = runs
        if relion and shutil.which("relion_refine"):
            params = ClassifyParams(n_classes=classes, seed=seed, max_resolution=resolution)
            root = Path("relion") / "run"
            (data / "relion").mkdir(exist_ok=True)
            cmd = relion_command(star.relative_to(data), root, params, box, psize, iters, threads)
            log.info("running RELION: %s", " ".join(cmd))
            rel = time_relion(star, root, cmd, iters)
            if "seconds_per_iteration" in rel:
                rel["evaluations_per_s"] = n * classes / rel["last_iteration_s"]
                for device, res in runs.items():  # steady state: the last iteration of each
                    rel[f"ratio_vs_companion_{device}"] = (
                        rel["last_iteration_s"] / res["seconds_per_pass"]
                    )
                    rel[f"total_ratio_vs_companion_{device}"] = rel["total_s"] / res["total_s"]
                    rel[f"steady_ratio_vs_companion_{device}"] = (
                        rel["last_iteration_s"] / res["steady"]["seconds"]
                    )
            report["relion"] = rel
        elif relion:
            report["relion"] = {"error": "relion_refine not on PATH"}
        return report
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def _steady(iters: list[dict[str, Any]]) -> dict[str, Any]:
    """The steady-state full pass: the last iteration (the first carries start-up costs)."""
    return iters[-1] if iters else {"seconds": math.nan}


def format_speed(rep: dict[str, Any]) -> str:
    """Human-readable table of the figures."""
    lines = [
        describe_machine(rep["machine"]),
        f"data: {rep['n']} particles, box {rep['box']} ({rep['psize']:.3f} Å/px), "
        f"K {rep['classes']}, {rep['iters']} full passes"
        + (
            ", --tf32 (coarse GEMMs on TF32 tensor cores; no effect on a CPU)"
            if rep.get("tf32")
            else ""
        ),
    ]
    for device, r in rep["companion"].items():
        c = r["sampling"]
        lines.append(
            f"companion {device} ({r['device']}), search {r['search']}: working box "
            f"{c['work_box']}, R {c['R']} rotations × T {c['T']} shifts × F {c['F']} coefficients"
        )
        for it in r["iterations"]:
            gemm = it.get("gemm_flops")
            lines.append(
                f"  iteration {it['iteration']} ({it['stage']}, {it['n_particles']} particles): "
                f"{it['seconds']:.2f} s, {it['particles_per_s']:.1f} particles/s, "
                f"{it['evaluations_per_s']:.3g} particle×class/s"
                + (f", GEMM {gemm / 1e9:.1f} GFLOP/s" if gemm else "")
            )
        lines.append(
            f"  steady full pass: {r['seconds_per_pass']:.2f} s = {r['particles_per_s']:.1f} "
            f"particles/s = {r['evaluations_per_s']:.3g} particle×class/s"
        )
        lines.append(
            f"  GEMM {r['gemm_flops'] / 1e9:.1f} GFLOP/s (classifier's flop count / pass time) "
            f"of {r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s measured float32 matmul peak "
            f"(inner size {2 * c['F']}): {100 * r['fraction_of_peak']:.0f}%"
        )
        lines.append(
            f"  an exhaustive search at the maximum resolution (8·N·K·R·T·F per pass) would "
            f"need {r['exhaustive_equivalent_flops'] / 1e9:.1f} GFLOP/s to match this pass time"
        )
        st = r.get("steady")
        if st:
            lines.append(
                f"  steady state at {st['resolution_A']:.1f} Å (converged references, "
                f"F {st['coefficients']}, coarse F {st['coarse_coefficients']}, batch "
                f"{st['batch']}): {st['seconds']:.2f} s per pass (CPU {st['cpu_seconds']:.2f} s, "
                "all threads) = "
                f"{st['evaluations_per_s']:.3g} particle×class/s"
            )
            lines.append(
                f"    E-step coarse {st['e_step_coarse_s']:.2f} s, fine "
                f"{st['e_step_fine_s']:.2f} s, rest {st['e_step_other_s']:.2f} s; M-step "
                f"{st['m_step_s']:.2f} s; I/O {st['io_s']:.2f} s"
            )
            pk = st["sgemm_peak_flops"]
            lines.append(
                f"    coarse GEMM {st['coarse_gemm_flops'] / 1e9:.1f} GFLOP/s = "
                f"{100 * st['coarse_gemm_flops'] / pk:.0f}% of the SGEMM peak measured on its "
                f"shape {'×'.join(map(str, st['peak_shape']))} ({pk / 1e9:.1f} GFLOP/s); fine "
                f"pass {st['fine_gemm_flops'] / 1e9:.1f} GFLOP/s"
            )
    rel = rep.get("relion")
    if rel:
        if "error" in rel:
            lines.append(f"RELION: {rel['error']}")
        else:
            its = ", ".join(f"{x:.1f}" for x in rel["iterations_s"])
            lines.append(
                f"RELION (same particles, K, sampling, iterations): iterations {its} s; last "
                f"{rel['last_iteration_s']:.2f} s = {rel['evaluations_per_s']:.3g} "
                f"particle×class/s; whole run {rel['total_s']:.1f} s"
            )
            for dev in rep["companion"]:
                r = rel.get(f"ratio_vs_companion_{dev}")
                t = rel.get(f"total_ratio_vs_companion_{dev}")
                if r is not None:
                    lines.append(
                        f"  companion {dev} is {r:.1f}× faster per iteration (last iteration "
                        f"of each), {t:.1f}× faster for the whole run; RELION's last "
                        f"iteration vs companion's steady-state pass at "
                        f"{rep['resolution_A']:g} Å: "
                        f"{rel[f'steady_ratio_vs_companion_{dev}']:.1f}×"
                    )
            lines.append(f"  command: {rel['command']}")
    return "\n".join(lines)
