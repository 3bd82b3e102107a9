"""The iteration schedule: online-EM mini-batches, annealing of u and of the noise model.

Iterations are numbered from 1. Iterations ``1..online_iters`` are online EM over
mini-batches of ``batch_per_class × K`` particles; the last ``full_iters`` are full passes.

Annealing (``progress a(i) = clip((i - anneal_start) / anneal_iters, 0, 1)``):

- uncertainty ``u(i) = u0 + (1 - u0) · a(i)`` with ``--uncertainty-schedule anneal`` (so u is
  ``u0`` up to ``anneal_start`` and reaches 1 at ``anneal_start + anneal_iters``), ``u0``
  throughout with ``constant``. Dividing the log-likelihood by u is the same as multiplying
  the noise power by u, so this is CryoSPARC's "sigma annealing": the effective noise power
  in iteration i is ``u(i) · sigma2``, large early (uncertain, soft assignments), the
  estimated noise at the end (sharp).
- noise power ``sigma2`` itself (``--noise-model``): ``estimated`` — the initial estimate
  (power spectrum of the unaligned particles minus their mean, which also holds the
  particles' own variance, so it is large at low resolution) in the first iteration, then
  re-estimated from the residuals at each particle's best pose (running average in online
  EM), as RELION does; ``fixed`` — the initial estimate throughout (with ``--anneal off``:
  the model never sharpens); ``white`` — the initial estimate's mean over all kept
  frequencies, throughout.

Class priors (``--class-priors``): ``estimated`` — the class occupancies of the last M-step,
as RELION and CryoSPARC do; ``uniform`` — held at 1/K (the default with ``--anneal off``, and
always in balanced mode). The posterior is ``pi_k exp(ll / u)``: u divides the likelihood
but not the prior, so while u > 1 an estimated prior weighs u times more against the data and
a large class grows for being large. With ``--anneal off`` u never comes down to 1, and on the
simulated flexible-domain set (``companion bench modes``) estimated priors made the largest
class bigger and let more junk into good classes than the default did; uniform priors
reversed both.

Warm-up: the first ``warmup_iters`` iterations (the first is the seeding iteration of
init.py) hold the class sizes equal — the class posteriors of each batch are Sinkhorn-scaled
to equal column sums, as balanced mode does with its cap — so that while the references are
still nearly alike no class can take the particles of the others (an "attractor" formed in
the first iterations never gives them back). From then on the classes compete freely.

Online EM keeps running sufficient statistics ``s_t = (1 - g_t) s_(t-1) + g_t · batch_t`` with
a decaying step ``g_t = t^-0.6`` (Cappé & Moulines): early mini-batches, aligned against
poor references, are forgotten; later ones accumulate. The statistics enter the M-step
scaled to their effective number of particles (``1 / Σ weight²`` mini-batches, at most N).
Each full pass starts from fresh statistics (``g = 1``).
"""

from __future__ import annotations

import numpy as np

from companion.params import ClassifyParams

ONLINE_STEP_POWER = 0.6


def n_iterations(params: ClassifyParams) -> int:
    return params.online_iters + params.full_iters


def stage(params: ClassifyParams, it: int) -> str:
    return "online" if it <= params.online_iters else "full"


def progress(params: ClassifyParams, it: int) -> float:
    return float(np.clip((it - params.anneal_start) / params.anneal_iters, 0.0, 1.0))


def uncertainty(params: ClassifyParams, it: int) -> float:
    u0 = params.initial_uncertainty
    if params.resolved_uncertainty_schedule == "constant":
        return float(u0)
    return float(u0 + (1.0 - u0) * progress(params, it))


def warmup_iters(params: ClassifyParams) -> int:
    """Iterations whose class posteriors are held to equal class sizes (``--warmup-iters``;
    default ``max(3, online_iters // 4)``; none in balanced mode, which caps throughout)."""
    if params.balance != "off":
        return 0
    if params.warmup_iters is not None:
        return int(params.warmup_iters)
    return max(3, params.online_iters // 4)


def noise_source(params: ClassifyParams, it: int) -> str:
    """Which noise power iteration ``it`` uses: "initial", "residual" or "white"."""
    model = params.resolved_noise_model
    if model == "white":
        return "white"
    if model == "estimated" and it > 1:
        return "residual"
    return "initial"


def online_step(t: int) -> float:
    """Step size of the t-th online iteration (t from 1)."""
    return float(t ** (-ONLINE_STEP_POWER))


def minibatch_size(params: ClassifyParams, n: int) -> int:
    return int(min(n, params.batch_per_class * params.n_classes))


def minibatch(params: ClassifyParams, n: int, it: int) -> np.ndarray:
    """Sorted particle indices of online iteration ``it``: consecutive slices of seeded
    random permutations (one per epoch), so every particle is seen once per epoch."""
    size = minibatch_size(params, n)
    start = (it - 1) * size
    out = []
    while size > 0:
        epoch, offset = divmod(start, n)
        perm = np.random.default_rng([params.seed, 0x5EED, epoch]).permutation(n)
        take = perm[offset : offset + size]
        out.append(take)
        size -= take.size
        start += take.size
    return np.sort(np.concatenate(out)).astype(np.int64)


def iteration_indices(params: ClassifyParams, n: int, it: int) -> np.ndarray:
    if stage(params, it) == "online":
        return minibatch(params, n, it)
    return np.arange(n, dtype=np.int64)


def half_sets(seed: int, n: int) -> np.ndarray:
    """Random half-set (0/1) of every particle, reproducible from the seed."""
    return np.random.default_rng([seed, 0x4A1F]).integers(0, 2, n).astype(np.uint8)
