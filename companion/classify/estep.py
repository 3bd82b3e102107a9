"""The E-step as a pure function of a shard of particles, for one process or many.

:func:`estep_shard` scores a shard (a fixed slice of the iteration's particles) against the
iteration's references and returns a :class:`ShardResult`: the shard's sufficient
statistics as host arrays (:meth:`Accumulator.host_sums`), the per-particle outputs and a
few counters. Everything it reads is in two picklable objects:

- :class:`RunState`, fixed for the run: the parameters and geometry, the path of the
  on-disk preprocessing cache (each worker reads its own rows from the shared file system,
  :mod:`diskcache`), the CTF inputs, noise row, half set and seeding class per particle;
- :class:`IterationState`, broadcast each E-step pass: the references (each process rotates
  them once per pass), the E-step resolution limit, 1/sigma², u, the log prior, the
  balanced-mode flags and prices, the scales.

The partition :func:`shards` depends only on the particles of the pass, never on how many
processes run them, and the driver (``em.py``) adds the shards' sums in shard order on the
client, so one process and a cluster of any size compute the same numbers. Balanced mode
(and the warm-up) solves the capped assignment per batch, with the class prices carried
from batch to batch within a shard; every shard starts from the pass's prices, and the next
pass's prices are the particle-weighted mean of the shards' final prices.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from companion.classify import diskcache
from companion.classify import fourier as fo
from companion.classify.backend import logsumexp, select_device, to_device, to_host
from companion.classify.ctf import ctf_terms
from companion.classify.feed import Batches, feed_for
from companion.classify.mstep import Accumulator
from companion.classify.score import RotatedRefs, Search, broadcast_classes, score
from companion.params import ClassifyParams
from companion.particles import CtfParams

TARGET_SHARDS = 32  # shards per E-step pass (fixed: the same for any number of workers)
MIN_SHARD = 256  # fewer particles per shard would be mostly per-task overhead


def shards(idx: np.ndarray) -> list[np.ndarray]:
    """The pass's particles ``idx`` cut into contiguous shards (at most TARGET_SHARDS, of
    at least MIN_SHARD particles unless there are fewer); independent of the workers."""
    n = len(idx)
    m = max(1, min(TARGET_SHARDS, -(-n // MIN_SHARD)))
    return [np.asarray(s) for s in np.array_split(np.asarray(idx), m)]


@dataclass
class CtfInputs:
    """What :func:`ctf_terms` reads of a ParticleSet (per-particle CTF parameters, flags)."""

    ctf: CtfParams
    ctf_premultiplied: np.ndarray
    phase_flipped: np.ndarray


@dataclass
class RunState:
    """Per-run constants a worker needs (sent once per run)."""

    params: ClassifyParams
    box: int
    pixel_size: float
    n: int
    cache_path: str  # (N, F) complex64 row file of the preprocessed particles
    ctf: CtfInputs
    group_index: np.ndarray  # int32[N] noise row of each particle
    half: np.ndarray  # uint8[N]
    owner: np.ndarray  # int64[N] the class each particle is aligned to when seeding
    allowed: Any = None  # --subclassify: companion.subclassify.Allowed (class mask), or None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class IterationState:
    """What one E-step pass broadcasts (host arrays)."""

    iteration: int
    key: str  # names the pass (a process rotates the references once per key)
    refs: np.ndarray  # (K, w, w) float32
    shell: int  # E-step resolution limit
    inv_sigma2: np.ndarray  # (G, S) float32
    u: float
    log_prior: np.ndarray  # (K,) float32
    balanced: bool  # capped (Sinkhorn) class weights
    cap: float  # the class cap over all N particles (a batch gets its share)
    dual: np.ndarray | None  # (K,) starting class prices
    group_scale: np.ndarray | None  # (G,) float32
    scale: np.ndarray | None  # (N,) float32 per-particle scale (--scale-correction on)
    seeding: bool  # align each particle to its dealt class only (iteration 1)
    accumulate: bool  # sufficient statistics wanted (False: outputs only)
    final_scores: bool  # keep (B, K) log posteriors and best poses
    batch: int
    budget: int  # bytes of batch temporaries (score_fast's pair chunks)


@dataclass
class ShardResult:
    """One shard's E-step: host sums, per-particle outputs and counters."""

    idx: np.ndarray
    sums: dict[str, Any] | None
    outputs: dict[str, np.ndarray]
    stats: dict[str, Any]
    scale_fit: np.ndarray | None = None  # least-squares scale factor per particle
    logpost: np.ndarray | None = None  # (B, K) float32
    pose: np.ndarray | None = None  # (B, K) int32 rot · T + shift
    dual: np.ndarray | None = None  # (K,) the shard's final prices
    seconds: float = 0.0


class Hooks(Protocol):
    """In-process hooks of :func:`estep_shard` (a worker gets none)."""

    def before_batch(self) -> None: ...  # may raise (a stop request)

    def after_batch(self, n: int) -> None: ...  # ``n`` particles just finished


class Context:
    """What a process builds once per run from a RunState: device, geometry, pose grid,
    projector, the cache file, and the rotated references of the current pass."""

    def __init__(self, run: RunState, xp: Any = None, *, geom: fo.Geometry | None = None,
                 search: Search | None = None, projector: fo.Projector | None = None,
                 coeffs: Any = None) -> None:  # fmt: skip
        p = run.params
        self.run, self.params = run, p
        self.xp = select_device(p.device) if xp is None else xp
        self.geom = geom or fo.Geometry.create(run.box, run.pixel_size, p.max_resolution,
                                               p.particle_diameter)  # fmt: skip
        self.search = search or Search.create(self.geom, p.psi_step, p.max_shift,
                                              p.shift_step, p.search, self.xp,
                                              tf32=p.tf32)  # fmt: skip
        self.r = self.search.n_rot
        self.k = p.n_classes
        self.n = run.n
        self.marginal = p.pose_mode == "marginal"
        self._projector = projector
        self.coeffs = coeffs
        self._key: str | None = None
        self._refs: tuple[RotatedRefs, RotatedRefs | None] | None = None

    @property
    def projector(self) -> fo.Projector:
        if self._projector is None:
            self._projector = fo.Projector(self.geom, self.r, xp=self.xp)
        return self._projector

    def rows(self, idx: np.ndarray) -> np.ndarray:
        with _LOCK:
            if self.coeffs is None:
                shape = (self.run.n, self.geom.n_coef)
                self.coeffs = diskcache.open_rows(Path(self.run.cache_path), shape, np.complex64)
        return np.asarray(self.coeffs[idx])

    def batches(self, idx: np.ndarray, batch: int) -> Batches:
        """The device coefficients of ``idx`` in batches (feed.py: read ahead on the CPU,
        resident or pinned double buffers on a GPU)."""
        with _LOCK:
            if self.coeffs is None:
                shape = (self.run.n, self.geom.n_coef)
                self.coeffs = diskcache.open_rows(Path(self.run.cache_path), shape, np.complex64)
            return feed_for(self, self.coeffs, self.xp).batches(idx, batch)

    def set_rotated(self, key: str, rrefs: RotatedRefs) -> None:
        """Use ``rrefs`` (already rotated by the caller) for pass ``key``."""
        self._key, self._refs = key, (rrefs, None)

    def rotated(self, it: IterationState) -> tuple[RotatedRefs, RotatedRefs | None]:
        """(references of the pass, the single seeding reference or None)."""
        with _LOCK:
            return self._rotated(it)

    def _rotated(self, it: IterationState) -> tuple[RotatedRefs, RotatedRefs | None]:
        if self._key != it.key or self._refs is None:
            geom = self.geom
            full = self.projector.project(to_device(it.refs, self.xp))
            n, fc = geom.prefix(it.shell), geom.prefix(Search.coarse_shell(it.shell))
            self._key, self._refs = it.key, (RotatedRefs.create(full, self.search, n, fc), None)
        rrefs, seed = self._refs
        if it.seeding and seed is None:
            seed = RotatedRefs.create(rrefs.full[:1], self.search, rrefs.n, rrefs.fc or None)
            self._refs = (rrefs, seed)
        return rrefs, (seed if it.seeding else None)


_CONTEXT: dict[str, Context] = {}  # per process: the context of the current run
_LOCK = threading.RLock()  # a worker may run several shards at once in threads


def context(run: RunState) -> Context:
    """This process's Context for ``run`` (built on first use; one run at a time)."""
    with _LOCK:
        ctx = _CONTEXT.get(run.token)
        if ctx is None:
            _CONTEXT.clear()
            ctx = _CONTEXT[run.token] = Context(run)
        return ctx


def register(ctx: Context) -> None:
    """Make ``ctx`` the context of its run in this process (the single-process driver)."""
    _CONTEXT.clear()
    _CONTEXT[ctx.run.token] = ctx


def estep_shard(run: RunState, it: IterationState, idx: np.ndarray, *,
                hooks: Hooks | None = None) -> ShardResult:  # fmt: skip
    """The E-step of particles ``idx`` (sorted indices into the run's particles), in batches
    of ``it.batch``: class weights, per-particle outputs and (``it.accumulate``) the
    shard's sufficient statistics."""
    from companion.classify import balance, output
    from companion.classify.hostmem import tune_allocator

    tune_allocator()  # once per process: a Dask worker's too
    t0 = time.perf_counter()
    ctx = context(run)
    p, xp, geom, search, k = run.params, ctx.xp, ctx.geom, ctx.search, ctx.k
    rrefs, seeding = ctx.rotated(it)
    inv_s2 = to_device(it.inv_sigma2, xp)  # (G, S); a batch gathers its rows
    shell_d = to_device(geom.shell, xp)
    scale_d = None if it.group_scale is None else to_device(it.group_scale, xp)
    log_prior_d = to_device(it.log_prior, xp)
    dual = None
    if it.balanced:
        dual = to_device(it.dual, xp) if it.dual is not None else xp.zeros(k)
    acc = Accumulator(k, ctx.r, geom, inv_s2.shape[0], xp) if it.accumulate else None
    outs: list[dict[str, np.ndarray]] = []
    fits: list[np.ndarray] = []
    lps: list[np.ndarray] = []
    poses: list[np.ndarray] = []
    stats: dict[str, Any] = {"n": 0, "pmax": 0.0, "loglik": 0.0, "gflop": 0.0,
                             "fine_pairs": 0, "hard": np.zeros(k, np.int64),
                             "soft": xp.zeros(k, xp.float64)}  # fmt: skip
    with ctx.batches(idx, it.batch) as xs:
        for s in range(0, len(idx), it.batch):
            if hooks is not None:
                hooks.before_batch()
            chunk = idx[s : s + it.batch]
            x = next(xs)  # the coefficients of chunk on the device
            cy, c2, v, cm = ctf_terms(run.ctf, chunk, geom, xp)
            if it.scale is not None:  # the model of particle i is scale_i · C · ref
                a = to_device(it.scale[chunk], xp)[:, None]
                cy, c2, cm = cy * a, c2 * (a * a), cm * a
            g = to_device(run.group_index[chunk], xp)
            is2 = inv_s2[g][:, shell_d]
            if scale_d is not None:  # RELION --scale: the model is scale · CTF · reference
                sg = scale_d[g][:, None]
                cy, c2, cm = cy * sg, c2 * (sg * sg), cm * sg
            xc = (x * (cy * is2)).astype(xp.complex64)
            c2s = c2 * is2
            if seeding is not None:  # first iteration: align against the dealt class only
                own = to_device(run.owner[chunk], xp)
                sc1 = score(xc, c2s, seeding, search, it.u, ctx.marginal, it.budget)
                sc = broadcast_classes(sc1, own, k)
                post = xp.zeros((len(chunk), k), xp.float32)
                post[xp.arange(len(chunk)), own] = 1.0
            else:
                # --subclassify: each particle against its parent's sub-classes only
                segs = None if run.allowed is None else run.allowed.segments(chunk, xp)
                sc = score(xc, c2s, rrefs, search, it.u, ctx.marginal, it.budget, segs)
                if it.balanced:
                    caps = float(it.cap) * len(chunk) / run.n
                    if segs is None:
                        post, dual = balance.sinkhorn_capped(sc.ev_u, caps, dual=dual,
                                                             return_dual=True)  # fmt: skip
                    else:  # --subclassify: caps each parent can meet in this batch
                        post, dual = balance.sinkhorn_capped_blocks(
                            sc.ev_u, caps, segs, dual=dual, return_dual=True
                        )
                    post = post.astype(xp.float32)
                else:
                    post = softmax(sc.ev_u + log_prior_d[None])
            out = output.particle_outputs(ctx, sc, post, x, v, is2, log_prior_d,
                                          c2s=c2s, refs=rrefs)  # fmt: skip
            if it.final_scores:
                lp = sc.ev_u - logsumexp(sc.ev_u)[:, None]
                lps.append(to_host(lp).astype(np.float32))
                poses.append(to_host(sc.rot * search.n_shift + sc.shift).astype(np.int32))
            if acc is not None:
                fit = acc.add(sc, post, search, rrefs, x=x, xc=xc, c2s=c2s, cm=cm, v=v,
                              half=to_device(run.half[chunk], xp), group=g, is2=is2,
                              pose_mode="max" if seeding is not None else p.pose_mode)  # fmt: skip
                if it.scale is not None and seeding is None:
                    fits.append(np.asarray(fit, np.float32))
            outs.append(out)
            stats["n"] += len(chunk)
            stats["pmax"] += float(out["max_prob"].sum())
            stats["loglik"] += float(out["loglik"].astype(np.float64).sum())
            stats["hard"] += np.bincount(out["class_id"], minlength=k)
            stats["soft"] += post.sum(axis=0)  # stays on the device
            stats["gflop"] += sc.flops / 1e9
            stats["fine_pairs"] += sc.n_fine
            if hooks is not None:
                hooks.after_batch(len(chunk))
    stats["soft"] = to_host(stats["soft"]).astype(np.float64)
    return ShardResult(
        idx=np.asarray(idx),
        sums=None if acc is None else acc.host_sums(),
        outputs={name: np.concatenate([o[name] for o in outs]) for name in (outs or [{}])[0]},
        stats=stats,
        scale_fit=np.concatenate(fits) if fits else None,
        logpost=np.concatenate(lps) if lps else None,
        pose=np.concatenate(poses) if poses else None,
        dual=None if dual is None else to_host(dual).astype(np.float64),
        seconds=time.perf_counter() - t0,
    )


def softmax(a: Any) -> Any:
    """Row-wise softmax in float32."""
    from companion.classify.backend import get_array_module

    xp = get_array_module(a)
    e = xp.exp(a - a.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(xp.float32)


class InProcess:
    """Runs the shards one after the other in this process (no Dask)."""

    workers = 1

    def map(self, run: RunState, it: IterationState, parts: Sequence[np.ndarray],
            hooks: Any) -> Iterator[ShardResult]:  # fmt: skip
        """Each shard's result, in shard order."""
        for part in parts:
            yield estep_shard(run, it, part, hooks=hooks)

    def close(self) -> None:
        pass


def mean_dual(results: Sequence[tuple[int, np.ndarray]]) -> np.ndarray:
    """The particle-weighted mean of the shards' prices ((n, dual) pairs, in shard order);
    a price that is infinite in any shard (a closed class) stays infinite."""
    if len(results) == 1:
        return np.asarray(results[0][1], np.float64)
    w = np.asarray([n for n, _ in results], np.float64)
    d = np.stack([np.asarray(x, np.float64) for _, x in results])
    fin = np.isfinite(d).all(axis=0)
    out = np.full(d.shape[1], np.inf)
    out[fin] = (w[:, None] * d[:, fin]).sum(axis=0) / max(w.sum(), 1e-300)
    return out
