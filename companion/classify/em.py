"""The EM loop of 2D classification.

One iteration: rotate the K references (:class:`fourier.Projector`), run the E-step over
the iteration's particles — fixed shards (:func:`estep.shards`), each a pure function
(:func:`estep.estep_shard`) run in this process or on a Dask cluster (``--cluster``,
:mod:`companion.cluster`), their sums added here in shard order — in batches through
:mod:`score`: class posteriors
``p(k | X) ∝ pi_k exp(ll / u)`` (Sinkhorn-capped weights in balanced mode and during the
warm-up) — and the sufficient statistics (:mod:`mstep`), then the M-step: back-rotate,
Wiener-filter, half-set FRC, tau², noise per shell, class priors, optional re-centring and
re-seeding of empty classes. The schedule (online mini-batches, then full passes; annealing
of u; the noise model; the warm-up) is in :mod:`schedule`, the seeding iteration in
:mod:`init`. State is checkpointed after every iteration (:mod:`checkpoint`).

Resolution: as RELION does, the E-step of each iteration only uses the Fourier shells up to
the current resolution (the last shell where the best class's data-vs-prior ratio
``mean(D)·T·tau²`` is ≥ 1) plus ``INCR_SHELLS``; the first iteration starts from the
initial low-pass plus ``INCR_SHELLS``. This keeps the alignment from fitting noise while
the classes are still blurred (and makes early iterations cheap). The M-step always uses
every shell up to --max-resolution, so the half-set FRC beyond the E-step limit is free of
reference bias.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from companion.classify import checkpoint, estep, output, schedule
from companion.classify import fourier as fo
from companion.classify.backend import (
    batch_size,
    describe_device,
    device_errors,
    memory_limit,
    select_device,
    to_device,
    to_host,
    work_budget,
)
from companion.classify.callbacks import IterationInfo, call, stop_requested
from companion.classify.groups import noise_rows
from companion.classify.hostmem import tune_allocator
from companion.classify.init import initial_references, lowpass_shell, seed_owner
from companion.classify.mstep import Accumulator, reconstruct, shell_power
from companion.classify.preprocess import Prepared, fingerprint, prepare
from companion.classify.resolution import class_resolution
from companion.classify.result import ClassResult
from companion.classify.score import RotatedRefs, Search
from companion.errors import Aborted, ParameterError
from companion.params import ClassifyParams
from companion.particles import ParticleSet
from companion.stacks import require_stacks

log = logging.getLogger(__name__)

INCR_SHELLS = 10  # E-step resolution limit = current resolution + this (RELION's incr_size)


def open_engine(params: ClassifyParams) -> Any:
    """Where the E-step shards run: this process, or the Dask cluster of ``--cluster``
    (Dask is imported only then)."""
    if not params.cluster:
        return estep.InProcess()
    from companion.cluster import open_engine as dask_engine

    return dask_engine(params)


def classify(particles: ParticleSet, params: ClassifyParams, *, work_dir: Path | str | None = None,
             resume: bool = False, callbacks: Any = None,
             checked: bool = False, allowed: Any = None,
             cache_dir: Path | str | None = None) -> ClassResult:  # fmt: skip
    """Classify ``particles`` in 2D; see :class:`ClassResult` for what comes back.

    ``work_dir``: checkpoints go to ``work_dir/checkpoint/`` (preprocessed particles to its
    ``cache/``, removed at the end); without it a temporary directory is used and nothing
    can be resumed. ``resume``: continue from the last finished iteration (the parameters
    must be the same). ``callbacks``: a :class:`Callbacks` (or any object with some of its
    methods). ``checked``: the caller already checked ``params`` against N (cap, K) with
    :func:`companion.preflight.check_run`; otherwise it is checked here. ``allowed``: a
    :class:`companion.subclassify.Allowed` (sub-classification: each particle may only go
    to its parent's sub-classes). ``cache_dir``: the preprocessed particles there instead of
    in the run's own cache (a finished one with the same key is reused as it is) and kept
    at the end (``--stability``'s runs share one, :mod:`companion.stability`); the main run
    of ``--stability R`` keeps its own (:func:`cache_path`) for them.
    """
    if not checked:
        params.check_feasible(len(particles))
    if schedule.n_iterations(params) == 0:
        raise ParameterError(
            "--online-iters 0 and --full-iters 0: no iterations to run — set at least one"
        )
    require_stacks(particles)  # a bad stack is refused before the first byte is written
    xp = select_device(params.device)
    with device_errors(), _dirs(work_dir) as (ckpt_dir, persistent), \
            memory_limit(params.memory_limit_bytes) as limit:  # fmt: skip
        log.info(
            "host memory budget %.2f GiB%s",
            limit / (1 << 30),
            "" if params.memory_limit else " (half the available memory; --memory-limit)",
        )
        run = _Run(particles, params, xp, ckpt_dir, persistent, callbacks)
        run.use_allowed(allowed)  # --subclassify: a no-op without a mask
        run.shared_cache = None if cache_dir is None else Path(cache_dir)
        return run.execute(resume)


def cache_path(work_dir: Path | str) -> Path:
    """Where a run with ``work_dir`` keeps its preprocessed particles."""
    return Path(work_dir) / "checkpoint" / "cache"


@contextlib.contextmanager
def _dirs(work_dir: Path | str | None) -> Iterator[tuple[Path, bool]]:
    if work_dir is not None:
        yield Path(work_dir) / "checkpoint", True
        return
    with tempfile.TemporaryDirectory(prefix="companion-") as tmp:
        yield Path(tmp) / "checkpoint", False


class _Run:
    def __init__(self, particles: ParticleSet, params: ClassifyParams, xp: Any, ckpt_dir: Path,
                 persistent: bool, callbacks: Any) -> None:  # fmt: skip
        tune_allocator()
        self.particles, self.params, self.xp = particles, params, xp
        self.ckpt_dir, self.persistent, self.callbacks = ckpt_dir, persistent, callbacks
        self.n = len(particles)
        self.k = params.n_classes
        self.geom = fo.Geometry.create(
            particles.box, particles.pixel_size, params.max_resolution, params.particle_diameter
        )
        self.search = Search.create(self.geom, params.psi_step, params.max_shift,
                                    params.shift_step, params.search, xp,
                                    tf32=params.tf32)  # fmt: skip
        self.r = self.search.n_rot
        self.projector = fo.Projector(self.geom, self.r, xp=xp)
        self.mask = fo.soft_mask(self.geom.work_box, self.geom.mask_radius, xp=xp)
        self.background = fo.radial_mask(self.geom.work_box, self.geom.mask_radius, xp=xp)
        self.total = schedule.n_iterations(params)
        self.cap = params.class_cap(self.n)
        self.marginal = params.pose_mode == "marginal"
        self.device = describe_device(xp)
        self.fp = fingerprint(particles, self.geom)
        self.owner = seed_owner(self.n, self.k, params.seed)
        # noise rows (sigma², scale) per particle and per ParticleSet group (groups.py)
        self.noise_row, self.group_rows = noise_rows(
            particles.group, particles.optics_group, len(particles.group_names)
        )
        self.engine: Any = None  # where the E-step shards run (execute opens it)
        self.run_state: estep.RunState | None = None  # set by setup_estep

    allowed: Any = None  # --subclassify (companion.subclassify.Allowed), else None
    shared_cache: Path | None = None  # classify(cache_dir=...): preprocessing shared, kept

    def use_allowed(self, allowed: Any) -> None:
        """Sub-classification: the seeding is dealt within each parent's sub-classes."""
        self.allowed = allowed
        if allowed is not None:
            self.owner = allowed.seed_owner(self.params.seed)

    # ------------------------------------------------------------------ driver

    def execute(self, resume: bool) -> ClassResult:
        t0 = time.perf_counter()
        st = checkpoint.load(self.ckpt_dir, self.params, self.fp) if resume else None
        if st is not None and st.finished:
            log.info("run already finished (iteration %d): returning it", st.iteration)
            return output.build_result(self, st)
        log.info(
            "classifying %d particles into %d classes on %s: work box %d (%.2f Å/px, %d "
            "coefficients), %d rotations, %d shifts, %s search",
            self.n, self.k, self.device, self.geom.work_box, self.geom.work_psize,
            self.geom.n_coef, self.r, self.search.n_shift, self.search.mode,
        )  # fmt: skip
        self.engine = open_engine(self.params)
        try:
            return self._execute(st, resume, t0)
        finally:
            self.engine.close()

    def _execute(self, st: checkpoint.EMState | None, resume: bool, t0: float) -> ClassResult:
        shared = self.shared_cache is not None
        prep = prepare(self.particles, self.geom,
                       self.shared_cache if shared else self.ckpt_dir / "cache", self.xp,
                       reuse=shared or (resume and self.persistent),
                       drop_bad=self.params.drop_bad_images, callbacks=self.callbacks)  # fmt: skip
        if st is None:
            st = self.initial_state(prep)
            st.timings["preprocess_s"] = prep.seconds
        else:  # resumed: the batch follows this device, not the one that wrote the checkpoint
            batch = self.batch_size()
            if batch != st.batch:
                log.info("batch size %d for %s (checkpoint had %d)", batch, self.device, st.batch)
            st.batch = batch
            if st.iteration:
                log.info("continuing after iteration %d of %d", st.iteration, self.total)
        self.setup_estep(prep, st)
        log.info(
            "E-step batch: %d particles (%s)",
            st.batch,
            "--batch-size" if self.params.batch_size else "from the memory budget",
        )
        for it in range(st.iteration + 1, self.total + 1):
            info = self.iteration(it, st, prep)
            st.finished = it == self.total
            self.save(st)
            call(self.callbacks, "on_iteration", info)
            if getattr(self.callbacks, "intermediate", None) is not None:
                call(self.callbacks, "intermediate", it, output.build_result(self, st))
            if it < self.total and stop_requested(self.callbacks):
                raise Aborted(self._abort_msg(it))
        st.timings["total_s"] = st.timings.get("total_s", 0.0) + time.perf_counter() - t0
        self.save(st)
        result = output.build_result(self, st)
        if self.persistent and not shared and self.params.stability < 2:  # else shared
            shutil.rmtree(self.ckpt_dir / "cache", ignore_errors=True)
        return result

    def setup_estep(self, prep: Prepared, st: checkpoint.EMState) -> None:
        """The run's E-step state (estep.RunState) and this process's context for it."""
        self.run_state = estep.RunState(
            params=self.params, box=self.particles.box, pixel_size=self.particles.pixel_size,
            n=self.n, cache_path=str(prep.coeffs.path),
            ctf=estep.CtfInputs(self.particles.ctf, self.particles.ctf_premultiplied,
                                self.particles.phase_flipped),
            group_index=np.asarray(prep.group_index, np.int32), half=st.half, owner=self.owner,
            allowed=self.allowed,
        )  # fmt: skip
        self.ctx = estep.Context(self.run_state, self.xp, geom=self.geom, search=self.search,
                                 projector=self.projector, coeffs=prep.coeffs)  # fmt: skip
        estep.register(self.ctx)
        self._pass = 0

    def save(self, st: checkpoint.EMState) -> None:
        if self.persistent:
            checkpoint.save(self.ckpt_dir, st, self.params, self.fp)

    def _abort_msg(self, done: int) -> str:
        where = f" (saved in {self.ckpt_dir})" if self.persistent and done else ""
        return f"stopped after iteration {done} of {self.total}{where}"

    # ------------------------------------------------------------------ state

    def initial_state(self, prep: Prepared) -> checkpoint.EMState:
        k, n, f = self.k, self.n, self.geom.n_coef
        if self.allowed is not None:  # --subclassify: each sub-class starts from its parent
            refs = self.allowed.initial_refs(self.geom, self.xp)
        else:
            refs = initial_references(self.particles, prep, k, self.xp)
        n_s = self.geom.s_max + 1
        tau2 = shell_power(fo.to_kept(to_device(refs, self.xp), self.geom), self.geom)
        g = prep.sigma2_init.shape[0]
        f32 = np.float32
        # the background's noise where the initial estimate IS the noise model (fixed,
        # white: --anneal off), so junk's power never enters it; with re-estimated noise the
        # seeding iteration keeps RELION's estimate (the particles' power; measured: the
        # background's made the seeding of high-SNR phase-flipped sets less reliable) and
        # the residuals take over from iteration 2
        s2 = prep.sigma2_init
        if self.params.resolved_noise_model == "estimated" and prep.sigma2_particles is not None:
            s2 = prep.sigma2_particles
        return checkpoint.EMState(
            iteration=0,
            refs=refs,
            sigma2_init=s2.copy(),
            sigma2_est=s2.copy(),
            sigma2_used=s2.copy(),
            tau2=np.maximum(tau2, 1e-30),
            prior=np.full(k, 1.0 / k),
            half=schedule.half_sets(self.params.seed, n),
            run_num=np.zeros((2, k, f), np.complex64),
            run_den=np.zeros((2, k, f), np.float32),
            run_noise_num=np.zeros((g, n_s)),
            run_noise_den=np.zeros((g, n_s)),
            run_occ=np.zeros(k),
            run_q=1.0,
            frc=np.zeros((k, n_s), f32),
            ssnr=np.zeros((k, n_s), f32),
            ref_power=tau2.astype(f32),
            resolution=np.full(k, np.inf, f32),
            acc_rot=np.full(k, self.params.psi_step, f32),
            acc_trans=np.full(k, self.geom.work_psize, f32),
            class_id=np.full(n, -1, np.int32),
            psi=np.zeros(n, f32),
            shift=np.zeros((n, 2), f32),
            max_prob=np.zeros(n, f32),
            class_prob=np.zeros(n, f32),
            loglik=np.zeros(n, f32),
            n_sig=np.zeros(n, np.int32),
            class_ess=np.zeros(n, f32),
            dual=np.zeros(k if self.params.balance != "off" else 0),
            batch=self.batch_size(),
            current_shell=self.initial_shell(),
            group_scale=np.ones(g),
            timings={"iterations_s": [], "e_step_s": 0.0, "m_step_s": 0.0, "gflop": 0.0},
            scale=np.ones(n, f32),
        )

    def initial_shell(self) -> int:
        """E-step resolution limit of the first iteration: the initial low-pass + INCR."""
        return int(min(self.geom.s_max, lowpass_shell(self.geom) + INCR_SHELLS))

    def next_shell(self, dvp: np.ndarray, occupied: np.ndarray) -> int:
        """RELION's rule (``updateCurrentResolution``): the resolution is the last shell
        before the data-vs-prior ratio of the best class drops below 1; the next E-step
        uses ``INCR_SHELLS`` shells beyond it (never more than --max-resolution)."""
        s_max = self.geom.s_max
        best = 0
        for k in np.flatnonzero(occupied):
            below = np.flatnonzero(dvp[k, 1:] < 1.0)
            best = max(best, int(below[0]) if below.size else s_max)
        return int(np.clip(best + INCR_SHELLS, min(s_max, 6), s_max))

    def batch_size(self) -> int:
        if self.params.batch_size is not None:
            return int(self.params.batch_size)
        k, r, f, t = self.k, self.r, self.geom.n_coef, self.search.n_shift
        fixed = k * r * f * 8 * 2 + 2 * k * r * f * 12  # rotated refs, accumulators
        per = f * 4 * 16 + k * r * 4 * 3
        if self.search.mode == "fast":
            tc = int(self.search.coarse_shift_idx.shape[0])
            fc = self.geom.prefix(Search.coarse_shell(self.geom.s_max))
            per += tc * fc * 8 + tc * k * (r // 2 + 1) * 4 * 3 + k * 5 * 25 * 4 * 4
        else:
            per += t * f * 8 + t * k * r * 4 * 3
        most = 4096 if self.xp is np else 1 << 15
        return batch_size(per, self.xp, fixed_bytes=fixed, most=most)

    def sigma2_for(self, st: checkpoint.EMState, source: str) -> np.ndarray:
        s0 = np.maximum(st.sigma2_init, 1e-30)
        if source == "white":
            w = fo.shell_counts(self.geom)
            w[0] = 0
            flat = (s0 * w[None]).sum(axis=1) / max(w.sum(), 1)
            return np.repeat(flat[:, None], s0.shape[1], axis=1)
        if source == "residual":
            return np.maximum(st.sigma2_est, 1e-30)
        return s0

    # ------------------------------------------------------------------ iteration

    def iteration(self, it: int, st: checkpoint.EMState, prep: Prepared) -> IterationInfo:
        t_it = time.perf_counter()
        p, xp = self.params, self.xp
        stage = schedule.stage(p, it)
        balanced_now = p.balance != "off"
        idx = schedule.iteration_indices(p, self.n, it)
        u = schedule.uncertainty(p, it)
        noise = schedule.noise_source(p, it)
        sigma2 = self.sigma2_for(st, noise)
        last = it == self.total
        limit_a = self.geom.box * self.geom.psize / (st.current_shell or self.initial_shell())
        rrefs = self.rotated(st)
        acc = Accumulator(self.k, self.r, self.geom, sigma2.shape[0], xp)
        final_scores = last and p.balance != "off" and stage == "full"
        stats = self.estep_pass(it, st, prep, idx, rrefs, u, sigma2, acc, final_scores)
        t_m = time.perf_counter()
        self.mstep(it, st, acc, rrefs, len(idx), stage, last, sigma2)
        st.sigma2_used = sigma2
        st.timings["m_step_s"] += time.perf_counter() - t_m
        if last and stage == "online":  # no full pass: assign every particle once
            rrefs = self.rotated(st)
            final_scores = p.balance != "off"
            stats = self.estep_pass(it, st, prep, np.arange(self.n), rrefs, u, sigma2, None,
                                    final_scores)  # fmt: skip
        if final_scores:
            output.assign_balanced(self, st, stats)
            stats["hard"] = np.bincount(st.class_id[st.class_id >= 0], minlength=self.k)
        # balanced mode logs the capped sizes: the posteriors' column sums, which the cap
        # bounds (the argmax of a capped soft assignment can exceed it), and after the final
        # capped assignment the labels themselves
        sizes = (
            stats["hard"] if final_scores or not balanced_now else np.rint(to_host(stats["soft"]))
        )
        secs = time.perf_counter() - t_it
        st.iteration = it
        st.timings["iterations_s"].append(secs)
        res = st.resolution[np.isfinite(st.resolution)]
        info = IterationInfo(
            iteration=it,
            n_iterations=self.total,
            stage=stage,
            n_particles=len(idx),
            uncertainty=u,
            noise=noise,
            resolution_A=float(np.median(res)) if res.size else math.inf,
            class_sizes=sizes.astype(np.int64),
            class_distribution=output.occupancy(st),
            avg_pmax=stats["pmax"] / max(stats["n"], 1),
            loglik=stats["loglik"] / max(stats["n"], 1),
            seconds=secs,
            extra={
                "empty_classes": int((stats["hard"] == 0).sum()),
                "gflop": stats["gflop"],
                "refined_fraction": stats["fine_pairs"] / max(stats["n"] * self.k, 1),
                "resolution_limit_A": limit_a,
            },
        )
        st.history.append(info.as_dict())
        return info

    def early_balance(self, it: int) -> bool:
        """Warm-up: class sizes held equal (soft) in the first iterations (see schedule)."""
        return it <= schedule.warmup_iters(self.params) and it < self.total

    def rotated(self, st: checkpoint.EMState) -> RotatedRefs:
        geom = self.geom
        shell = st.current_shell or self.initial_shell()
        n = geom.prefix(shell)
        fc = geom.prefix(Search.coarse_shell(shell))
        full = self.projector.project(to_device(st.refs, self.xp))
        return RotatedRefs.create(full, self.search, n, fc)

    def estep_pass(self, it: int, st: checkpoint.EMState, prep: Prepared, idx: np.ndarray,
                   rrefs: RotatedRefs, u: float, sigma2: np.ndarray, acc: Accumulator | None,
                   final_scores: bool) -> dict[str, Any]:  # fmt: skip
        """E-step over ``idx``: the fixed shards of :func:`estep.shards`, run by the engine
        (this process or a Dask cluster) and added up here in shard order; adds to ``acc``
        (when given) and records every particle's outputs in ``st``. With ``final_scores``
        keeps (N, K) log posteriors and best poses for the capped assignment."""
        t0 = time.perf_counter()
        p = self.params
        if self.run_state is None:  # driven without execute() (bench speed)
            self.setup_estep(prep, st)
        if self.engine is None:
            self.engine = estep.InProcess()
        if st.scale is None:  # a checkpoint written before per-particle scales
            st.scale = np.ones(self.n, np.float32)
        its = self.iteration_state(it, st, rrefs, u, sigma2, acc is not None, final_scores)
        self.ctx.set_rotated(its.key, rrefs)
        stats: dict[str, Any] = {"n": 0, "pmax": 0.0, "loglik": 0.0, "gflop": 0.0,
                                 "fine_pairs": 0, "hard": np.zeros(self.k, np.int64),
                                 "soft": np.zeros(self.k, np.float64)}  # fmt: skip
        if final_scores:
            stats["logpost"] = output.host_array(self, "logpost", (self.n, self.k), np.float32)
            stats["pose"] = output.host_array(self, "pose", (self.n, self.k), np.int32)
        new_scale = st.scale.copy()
        duals: list[tuple[int, np.ndarray]] = []
        shard_s = 0.0
        hooks = _Hooks(self, it, len(idx))
        for res in self.engine.map(self.run_state, its, estep.shards(idx), hooks):
            chunk = res.idx
            if acc is not None and res.sums is not None:
                acc.merge(res.sums)
            if res.scale_fit is not None:
                new_scale[chunk] = st.scale[chunk] * res.scale_fit
            if final_scores:
                stats["logpost"][chunk] = res.logpost
                stats["pose"][chunk] = res.pose
            for name, arr in res.outputs.items():
                st.put(name, chunk, arr)
            for name in ("n", "pmax", "loglik", "gflop", "fine_pairs", "hard", "soft"):
                stats[name] += res.stats[name]
            if res.dual is not None:
                duals.append((len(chunk), res.dual))
            shard_s += res.seconds
            hooks.shard_done(len(chunk))
            del res  # its sums: not alive while the next shard accumulates
        if p.scale_correction == "on" and acc is not None:
            st.scale = normalised_scale(new_scale)
        if duals and p.balance != "off":
            st.dual = estep.mean_dual(duals)
        wall = time.perf_counter() - t0
        st.timings["e_step_s"] += wall
        st.timings["shard_s"] = st.timings.get("shard_s", 0.0) + shard_s
        st.timings["workers"] = int(self.engine.workers)
        st.timings["gflop"] += stats["gflop"]
        return stats

    def iteration_state(self, it: int, st: checkpoint.EMState, rrefs: RotatedRefs, u: float,
                        sigma2: np.ndarray, accumulate: bool,
                        final_scores: bool) -> estep.IterationState:  # fmt: skip
        """What the E-step of this pass broadcasts (see :class:`estep.IterationState`)."""
        p = self.params
        log_prior = np.log(np.maximum(st.prior, 1e-12)).astype(np.float32)
        balanced = p.balance != "off" or self.early_balance(it)
        cap = self.cap if p.balance != "off" else math.ceil(self.n / self.k)
        if balanced:
            log_prior[:] = -math.log(self.k)
        dual = None
        if balanced:
            dual = st.dual.astype(np.float64) if st.dual.size else np.zeros(self.k)
        self._pass += 1
        return estep.IterationState(
            iteration=it,
            key=f"{self.run_state.token}:{self._pass}",
            refs=np.asarray(st.refs, np.float32),
            shell=int(st.current_shell or self.initial_shell()),
            inv_sigma2=(1.0 / sigma2).astype(np.float32),
            u=float(u),
            log_prior=log_prior,
            balanced=balanced,
            cap=float(cap),
            dual=dual,
            group_scale=st.group_scale.astype(np.float32) if st.group_scale.size else None,
            scale=st.scale if p.scale_correction == "on" else None,
            seeding=it == 1 and accumulate,
            accumulate=accumulate,
            final_scores=final_scores,
            batch=int(st.batch),
            budget=work_budget(self.xp) // 2,
        )

    def mstep(self, it: int, st: checkpoint.EMState, acc: Accumulator, rrefs: RotatedRefs,
              n_batch: int, stage: str, last: bool, sigma2: np.ndarray) -> None:  # fmt: skip
        p, xp, geom = self.params, self.xp, self.geom
        res = acc.finish(self.projector)
        g = schedule.online_step(it) if stage == "online" else 1.0
        st.run_q = (1 - g) ** 2 * st.run_q + g * g
        scale = min(1.0 / st.run_q, self.n / max(n_batch, 1))

        def run(old: np.ndarray, new: Any) -> np.ndarray:
            return ((1 - g) * old + g * to_host(new)).astype(old.dtype)

        st.run_num = run(st.run_num, res["num"])
        st.run_den = run(st.run_den, res["den"])
        st.run_noise_num = to_host(res["noise_num"]).astype(st.run_noise_num.dtype)
        st.run_noise_den = to_host(res["noise_den"]).astype(st.run_noise_den.dtype)
        st.run_occ = run(st.run_occ, res["occupancy"])
        num = to_device(st.run_num * np.float32(scale), xp)
        den = to_device(st.run_den * np.float32(scale), xp)
        rec = reconstruct(num, den, st.tau2, p.tau2_fudge, geom)
        imgs = self.masked(rec.coef)
        if p.recenter and not last:
            imgs = self.recenter(imgs)
        occupied = st.run_occ * scale > 1e-3
        new = to_host(imgs)
        st.refs = np.where(occupied[:, None, None], new, st.refs).astype(np.float32)
        # tau² of the next M-step: power spectrum of the new (masked) reference
        st.tau2 = shell_power(fo.to_kept(to_device(st.refs, xp), geom), geom)
        st.ssnr = rec.data_vs_prior.astype(np.float32)
        st.ref_power = rec.ref_power.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            est = st.run_noise_num / (2.0 * st.run_noise_den)
        ok = np.isfinite(est) & (est > 0)
        st.sigma2_est = np.where(ok, est, st.sigma2_est)
        st.sigma2_est[:, 0] = st.sigma2_est[:, 1]
        if it > 1:  # not against the seeding iteration's single blurred reference
            self.update_scale(st, to_host(res["scale_num"]), to_host(res["scale_den"]))
        occ = np.maximum(st.run_occ, 0)
        if p.resolved_class_priors == "uniform" or occ.sum() <= 0:
            st.prior = np.full(self.k, 1.0 / self.k)
        else:
            prior = np.maximum(occ / occ.sum(), 1e-12)
            st.prior = prior / prior.sum()
        self.accuracy(st, rrefs, res["c2s_mean"])
        res_a, st.frc = class_resolution(num, den, self.masked, geom, st.class_id, st.half,
                                         st.class_prob, st.acc_rot)  # fmt: skip
        st.resolution = np.where(occupied, res_a, np.inf).astype(np.float32)
        st.current_shell = self.next_shell(rec.data_vs_prior, occupied)
        if p.reseed_empty > 0 and not last:
            halves = [to_host(self.masked(rec.halves[h])) for h in (0, 1)]
            output.reseed(self, st, to_host(res["hard"]), halves=halves)
            st.tau2 = shell_power(fo.to_kept(to_device(st.refs, xp), geom), geom)

    def update_scale(self, st: checkpoint.EMState, num: np.ndarray, den: np.ndarray) -> None:
        """Per-group intensity scale (RELION --scale): the least-squares factor between each
        row's data and its scaled model, renormalised to a particle-weighted mean of 1."""
        if st.group_scale.size < 2:
            return
        seen = den > 0
        ratio = np.where(seen, num / np.where(seen, den, 1.0), 1.0)
        scale = np.clip(st.group_scale * ratio, 0.2, 5.0)
        count = np.bincount(self.noise_row, minlength=scale.size).astype(np.float64)
        st.group_scale = scale / max(float((scale * count).sum() / count.sum()), 1e-12)

    def masked(self, coef: Any) -> Any:
        """Working-box images of coefficient sets, background set to 0, soft-masked."""
        return fo.apply_mask(fo.from_kept(coef, self.geom), self.mask, self.background)

    def recenter(self, imgs: Any) -> Any:
        """Shift each image so the centre of mass of its positive density is the centre."""
        xp = self.xp
        w = self.geom.work_box
        pos = xp.maximum(imgs, 0)
        tot = pos.sum(axis=(1, 2))
        c = xp.arange(w, dtype=xp.float32) - w // 2
        cx = (pos.sum(axis=1) * c[None]).sum(axis=1) / xp.maximum(tot, 1e-20)
        cy = (pos.sum(axis=2) * c[None]).sum(axis=1) / xp.maximum(tot, 1e-20)
        lim = self.search.radius
        shift = -xp.stack([cx, cy], axis=1)
        shift = xp.clip(shift, -lim, lim)
        return self.masked(fo.shift_images(fo.to_kept(imgs, self.geom), shift, self.geom))

    def accuracy(self, st: checkpoint.EMState, rrefs: RotatedRefs, c2s_mean: Any) -> None:
        """RELION-style accuracies: the rotation / translation that changes the expected
        log-likelihood of a typical particle by 1 (quadratic approximation)."""
        xp, geom = self.xp, self.geom
        a = rrefs.full
        wgt = c2s_mean.astype(xp.float32)[None]
        if self.r > 1:
            d = a[:, 1] - a[:, 0]
            drot = 0.5 * (wgt * (d.real**2 + d.imag**2)).sum(axis=1)
            step = 360.0 / self.r
            st.acc_rot = np.clip(step / np.sqrt(np.maximum(to_host(drot), 1e-12)), 0, 360)
        kx, ky = to_device(geom.kx, xp), to_device(geom.ky, xp)
        p0 = (a[:, 0].real ** 2 + a[:, 0].imag ** 2) * wgt
        fx = xp.abs(1 - xp.exp(-2j * np.pi * kx / geom.work_box)) ** 2
        fy = xp.abs(1 - xp.exp(-2j * np.pi * ky / geom.work_box)) ** 2
        dt = 0.25 * (p0 * (fx + fy)[None]).sum(axis=1)
        acc = geom.work_psize / np.sqrt(np.maximum(to_host(dt), 1e-12))
        st.acc_trans = np.clip(acc, 0, geom.box * geom.psize).astype(np.float32)
        st.acc_rot = np.asarray(st.acc_rot, np.float32)


SCALE_RANGE = (0.2, 5.0)  # a fitted particle scale outside this is clipped (junk, noise)


class _Hooks:
    """The driver's side of an E-step pass: stop requests before every batch (in this
    process) or while waiting for a shard (cluster), progress after every batch or shard."""

    def __init__(self, run: _Run, it: int, total: int) -> None:
        self.run, self.it, self.total = run, it, total
        self.reported = 0  # particles reported done
        self.finished = 0  # particles of the finished shards

    def before_batch(self) -> None:
        if stop_requested(self.run.callbacks):
            raise Aborted(self.run._abort_msg(self.it - 1))

    def after_batch(self, n: int) -> None:
        self.reported += n
        self._report()

    def shard_done(self, n: int) -> None:
        self.finished += n
        if self.finished > self.reported:  # a shard that ran elsewhere
            self.reported = self.finished
            self._report()

    def _report(self) -> None:
        call(self.run.callbacks, "progress", self.reported, self.total,
             f"iteration {self.it}/{self.run.total}")  # fmt: skip


def normalised_scale(scale: np.ndarray) -> np.ndarray:
    """Per-particle scales clipped to SCALE_RANGE and divided by their median (so the
    references keep the typical particle's amplitude; a robust mean 1)."""
    s = np.clip(np.nan_to_num(scale, nan=1.0), *SCALE_RANGE)
    return (s / max(float(np.median(s)), 1e-6)).astype(np.float32)
