"""M-step: weighted sums per (class, rotation), back-rotation, Wiener filter, FRC.

Per batch the weights of the E-step turn into sums in the rotated frames,

    S[k, r] = Σ_b Σ_t w(b, k, r, t) · Xc_b e^{-2πi f·t}      (Xc = C·X/sigma²)
    D[k, r] = Σ_b Σ_t w(b, k, r, t) · C_b²/sigma²

one pair per half-set. Pose modes: ``max`` has one pose per (particle, class) and its rows
go into their (class, rotation) slots by one CSR product per block of classes; ``marginal``
uses the transposed GEMM ``Wᵀ·Y`` (exhaustive search) or the local weights times a phase
table (fast search). Rows whose weight is below ``PRUNE`` times the particle's largest class
weight are skipped (they change nothing visible). At the end of
the iteration :class:`Projector.backproject` rotates the sums back into the class frame and
adds them up; :func:`reconstruct` applies the Wiener filter

    A_k = Σ S / (Σ D + 1 / (T·tau²_k))

with tau² the power spectrum of the class's current (masked) reference, as RELION's 2D/3D
classification does (``MlModel::setFourierTransformMaps``). The half-set FRC gives the
reported resolution (0.143); it is not used for tau²: both halves are aligned against the
same reference, so their FRC is inflated by reference bias (aligned noise) within the E-step
resolution limit, and a tau² from it would stop regularising noise the alignment has fitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from companion.classify import fourier as fo
from companion.classify.backend import (
    batch_size,
    csr_from_parts,
    get_array_module,
    scatter_add_rows,
    to_device,
    to_host,
    work_budget,
)
from companion.classify.score import BatchScores, RotatedRefs, Search, f32view, tile_bytes

PRUNE = 1e-2
#: max pose mode: with at least this fraction of the (particle, class) pairs kept the sums
#: are built per block of classes over all B rows, else only for the kept pairs. Measured
#: (one OpenBLAS thread, AVX-512 Xeon): kept pairs only took 0.36 s instead of 0.24 s on
#: bench speed's K 24 box 64 pass, and saved 22-25% of a K 50 box 48 iteration
DENSE_FRACTION = 0.25
FRC_THRESHOLD = 0.143


class Accumulator:
    """Sufficient statistics of one iteration (on the compute device)."""

    def __init__(self, k: int, r: int, geom: fo.Geometry, n_groups: int, xp: Any) -> None:
        f = geom.n_coef
        self.k, self.r, self.f, self.geom, self.xp = k, r, f, geom, xp
        # per (half, class, rotation): [Σ rows as interleaved float32 (2F) | Σ weights (F)]
        self.stats = xp.zeros((2 * k * r, 3 * f), xp.float32)
        self.sums = self.stats[:, : 2 * f].reshape(2, k * r, 2 * f)  # views of ``stats``
        self.weights = self.stats[:, 2 * f :].reshape(2, k * r, f)
        self.n_shells = geom.s_max + 1
        self.n_groups = n_groups
        self.noise_num = xp.zeros(n_groups * self.n_shells, xp.float64)
        self.noise_den = xp.zeros(n_groups * self.n_shells, xp.float64)
        # per noise row: Σ Re(X·conj(model)) and Σ |model|² within the E-step limit (scale)
        self.scale_num = xp.zeros(n_groups, xp.float64)
        self.scale_den = xp.zeros(n_groups, xp.float64)
        self.occupancy = xp.zeros(k, xp.float64)
        self.hard = xp.zeros(k, xp.int64)
        self.c2s_sum = xp.zeros(f, xp.float64)
        self.count = 0
        self.shell = geom.on("shell", xp)

    def add(self, sc: BatchScores, post: Any, search: Search, refs: RotatedRefs, *,
            x: Any, xc: Any, c2s: Any, cm: Any, v: Any, half: Any, group: Any,
            pose_mode: str, is2: Any = None) -> np.ndarray | None:  # fmt: skip
        """Add one batch: ``post`` (B, K) class weights; x raw coefficients; xc = cy·x/σ²;
        c2s = C²/σ²; cm the model CTF; v the noise variance factor; half, group per particle.

        With ``is2`` (1/σ² per coefficient) returns each particle's least-squares scale
        correction of its model at its best pose in its most likely class (host (B,))."""
        xp = self.xp
        b = post.shape[0]
        self.count += b
        self.occupancy += post.sum(axis=0)
        top = post.argmax(axis=1)
        self.hard += xp.bincount(top, minlength=self.k)
        self.c2s_sum += c2s.sum(axis=0)
        if pose_mode == "max":
            self._add_max(sc, post, search, xc, c2s, half)
        elif sc.dense_w is not None:
            self._add_dense(sc, post, search, xc, c2s, half)
        else:
            self._add_local(sc, post, search, xc, c2s, half)
        return self._add_noise(sc, top, search, refs, x, cm, v, group, is2)

    def _add_rows(self, target: Any, rows: Any, wrows: Any, half_rows: Any) -> None:
        """Rows (n, F) complex and weights (n, F) into (half, class·rotation) ``target``:
        one deterministic segmented sum for both half-sets and both arrays."""
        xp = self.xp
        both = xp.concatenate([f32view(rows), wrows.astype(xp.float32)], axis=1)  # (n, 3F)
        where = half_rows.astype(target.dtype) * (self.k * self.r) + target
        scatter_add_rows(self.stats, where, both)

    def _add_max(self, sc: BatchScores, post: Any, search: Search, xc: Any, c2s: Any,
                 half: Any) -> None:  # fmt: skip
        """One pose per (particle, class), for the pairs whose weight is kept (``PRUNE``).

        Each kept pair's row, the particle at its shift for that class next to its C²/σ²
        ([xc·phase | c2s], 3F floats), goes into the (half, class, rotation) slot of its pose
        by :func:`scatter_add_rows` with the class weight: a fixed summation order (no
        atomics), in cache-sized chunks of pairs. Only kept pairs are built: at steady state
        about one class per particle, not all K (a dense (B, K) block was 25% of a K 50
        iteration). The pairs are in particle order, so the sums do not depend on the
        chunking (each slot is summed in that order). With flat posteriors (at least
        ``DENSE_FRACTION`` of the pairs kept) :meth:`_add_max_dense` does it per block of
        classes over all rows, in the same order."""
        xp = self.xp
        r, f = self.r, self.f
        w = post.astype(xp.float32)
        keep = w >= PRUNE * w.max(axis=1, keepdims=True)
        bi, ki = xp.nonzero(keep)  # particle-major order
        n = int(bi.shape[0])
        if n >= DENSE_FRACTION * keep.size:  # flat posteriors: blocks of all B rows pay
            self._add_max_dense(sc, post, keep, search, xc, c2s, half)
            return
        step = max(1, tile_bytes(xp) // (12 * f))
        for s in range(0, n, step):
            b_, k_ = bi[s : s + step], ki[s : s + step]
            y = xp.empty((int(b_.shape[0]), 3 * f), xp.float32)
            xp.multiply(xc[b_], search.phases[sc.shift[b_, k_]],
                        out=y[:, : 2 * f].view(xp.complex64))  # fmt: skip
            y[:, 2 * f :] = c2s[b_]
            slot = (half[b_].astype(xp.int64) * self.k + k_) * r + sc.rot[b_, k_]
            scatter_add_rows(self.stats, slot, y, weights=w[b_, k_])

    def _add_max_dense(self, sc: BatchScores, post: Any, keep: Any, search: Search, xc: Any,
                       c2s: Any, half: Any) -> None:  # fmt: skip
        """One pose per (particle, class), blocked over classes (a cache-sized tile).

        In a block each particle's row, at its shift for that class, next to its C²/σ²
        ([xc·phase | c2s], 3F floats), goes into the (half, class, rotation) slot of its
        pose by one CSR product whose entries are the class weights, sorted by slot: a
        fixed summation order (no atomics), no sync, each row read once while in cache."""
        xp = self.xp
        b, k = post.shape
        r, f = self.r, self.f
        w = xp.where(keep, post.astype(xp.float32), np.float32(0))
        slot = half.astype(xp.int64)[:, None] * r + sc.rot  # (B, K): half·R + rotation
        stats = self.stats.reshape(2, k, r, 3 * f)
        step = max(1, min(k, tile_bytes(xp) // (12 * b * f)))
        buf = xp.empty((step, b, 3 * f), xp.float32)
        buf[:, :, 2 * f :] = c2s[None]
        for k0 in range(0, k, step):
            k1 = min(k, k0 + step)
            m = k1 - k0
            y = buf[:m]
            xp.multiply(xc[None], search.phases[sc.shift[:, k0:k1].T],
                        out=y[..., : 2 * f].view(xp.complex64))  # fmt: skip
            key = (xp.arange(m)[:, None] * (2 * r) + slot[:, k0:k1].T).reshape(-1)  # (m·B,)
            order = xp.argsort(key, kind="stable")
            indptr = xp.searchsorted(key[order], xp.arange(m * 2 * r + 1))
            data = w[:, k0:k1].T.reshape(-1)[order]
            mat = csr_from_parts(xp, data, order, indptr, (m * 2 * r, m * b))
            out = xp.asarray(mat @ y.reshape(m * b, 3 * f)).reshape(m, 2, r, 3 * f)
            stats[:, k0:k1] += out.transpose(1, 0, 2, 3)

    def _chunks(self, n: int, f: int) -> list[slice]:
        """Chunks of ``n`` (particle, class) rows whose temporaries (~48 bytes per
        coefficient: shifted rows, weights, the concatenated and sorted copies) fit half
        the work budget: with flat posteriors a batch has up to B·K rows, which the E-step
        batch (sized per particle) does not cover."""
        step = batch_size(48 * f, self.xp, budget=work_budget(self.xp) // 2, most=max(n, 1))
        return [slice(s, s + step) for s in range(0, n, step)]

    def _add_dense(self, sc: BatchScores, post: Any, search: Search, xc: Any, c2s: Any,
                   half: Any) -> None:  # fmt: skip
        xp = self.xp
        w = sc.dense_w  # (B, T, K, R), normalised within class
        b, t, k, r = w.shape
        w *= post[:, None, :, None].astype(w.dtype)
        for h in (0, 1):
            sel = xp.nonzero(half == h)[0]
            if sel.size == 0:
                continue
            nb = int(sel.shape[0])
            y = f32view(xc[sel][:, None, :] * search.phases[None])  # (nb, T, 2F)
            self.sums[h] += w[sel].reshape(nb * t, k * r).T @ y.reshape(nb * t, -1)
            self.weights[h] += w[sel].sum(axis=1).reshape(nb, k * r).T @ c2s[sel]

    def _add_local(self, sc: BatchScores, post: Any, search: Search, xc: Any, c2s: Any,
                   half: Any) -> None:  # fmt: skip
        xp = self.xp
        pb, pk = sc.pairs
        wz = sc.local_w * post[pb, pk][:, None, None].astype(xp.float32)  # (P, J, n_d)
        wr = wz.sum(axis=2)  # (P, J)
        peak = post.max(axis=1)[pb]  # (P,)
        ppi, pji = xp.nonzero(wr >= PRUNE * peak[:, None])
        for s in self._chunks(int(ppi.shape[0]), xc.shape[1]):
            pi, ji = ppi[s], pji[s]
            bi = pb[pi]
            p = wz[pi, ji] @ search.local_adj  # (n, 2F): Σ_d w exp(-2πi f·d)
            p = p.view(xp.complex64)
            rows = xc[bi] * search.phases[sc.local_t0[pi]]
            rows *= p
            target = pk[pi] * self.r + sc.local_rot[pi, ji]
            self._add_rows(target, rows, c2s[bi] * wr[pi, ji][:, None], half[bi])

    def _add_noise(self, sc: BatchScores, top: Any, search: Search, refs: RotatedRefs,
                   x: Any, cm: Any, v: Any, group: Any, is2: Any = None
                   ) -> np.ndarray | None:  # fmt: skip
        """Residual power at each particle's best pose in its most likely class (and, with
        ``is2``, the scale correction Σ Re(m* y) w / Σ |m|² w, m = cm·ref, w = is2 / v)."""
        xp = self.xp
        b = x.shape[0]
        ar = xp.arange(b)
        rot = sc.rot[ar, top]
        sh = sc.shift[ar, top]
        a = refs.full[top, rot]  # (B, F)
        xs = x * search.phases[sh]
        model = cm * a
        resid = xs - model
        power = resid.real**2 + resid.imag**2
        per = xp.concatenate([fo.shell_sums(power, self.geom), fo.shell_sums(v, self.geom)], 1)
        acc = xp.zeros((self.n_groups, 2 * self.n_shells), xp.float64)
        scatter_add_rows(acc, group, per)  # (G, 2S): deterministic per-group sums
        self.noise_num += acc[:, : self.n_shells].reshape(-1)
        self.noise_den += acc[:, self.n_shells :].reshape(-1)
        lim = slice(1, refs.n)  # shells 1 .. E-step limit (the DC term carries no scale)
        prod = (xs[:, lim] * model[:, lim].conj()).real.sum(axis=1)
        mpow = (model.real[:, lim] ** 2 + model.imag[:, lim] ** 2).sum(axis=1)
        sc_acc = xp.zeros((self.n_groups, 2), xp.float64)
        scatter_add_rows(sc_acc, group, xp.stack([prod, mpow], axis=1))
        self.scale_num += sc_acc[:, 0]
        self.scale_den += sc_acc[:, 1]
        if is2 is None:
            return None
        w = is2 / v
        num = ((model.real * xs.real + model.imag * xs.imag) * w).sum(axis=1)
        den = ((model.real**2 + model.imag**2) * w).sum(axis=1)
        return to_host(num / xp.maximum(den, 1e-30)).astype(np.float32)

    # the arrays a shard hands back (host_sums) and merge adds up
    SUMS = ("stats", "noise_num", "noise_den", "scale_num", "scale_den", "occupancy", "hard",
            "c2s_sum")  # fmt: skip

    def host_sums(self) -> dict[str, Any]:
        """The sums as host arrays (a shard's result; see :meth:`merge`)."""
        out: dict[str, Any] = {name: to_host(getattr(self, name)) for name in self.SUMS}
        out["count"] = self.count
        return out

    def merge(self, sums: dict[str, Any]) -> None:
        """Add a shard's :meth:`host_sums` (the caller adds shards in a fixed order, so the
        totals do not depend on where or when the shards ran)."""
        xp = self.xp
        for name in self.SUMS:
            getattr(self, name)[...] += to_device(sums[name], xp)
        self.count += int(sums["count"])

    def finish(self, projector: fo.Projector) -> dict[str, Any]:
        """Back-rotated sums per half-set plus the per-iteration scalars (device arrays).

        Before the back-rotation the sums of each class are divided by the radial profile
        of its weights (noise whitening and the CTF's low-frequency rise both vary by orders
        of magnitude with |k|; rotation keeps |k|, so this is exact)."""
        xp = self.xp
        k, r, f = self.k, self.r, self.f
        counts = np.maximum(fo.shell_counts(self.geom), 1)
        s = xp.ascontiguousarray(self.sums).view(xp.complex64).reshape(2 * k, r, f)
        d = xp.ascontiguousarray(self.weights).reshape(2 * k, r, f)  # both half-sets at once
        prof = to_host(fo.shell_sums(d.sum(axis=1), self.geom)) / counts[None]
        prof[:, 0] = prof[:, 1]
        top = prof.max(axis=1, keepdims=True)
        prof = np.where(top > 0, np.maximum(prof, 1e-6 * top), 1.0)
        radial = 1.0 / fo.radial_profile(prof, self.geom, xp)
        num, den = projector.backproject(s, d, radial)
        num, den = num.reshape(2, k, f), den.reshape(2, k, f)
        return {
            "num": num,
            "den": den,
            "noise_num": self.noise_num.reshape(self.n_groups, self.n_shells),
            "noise_den": self.noise_den.reshape(self.n_groups, self.n_shells),
            "scale_num": self.scale_num,
            "scale_den": self.scale_den,
            "occupancy": self.occupancy,
            "hard": self.hard,
            "c2s_mean": self.c2s_sum / max(self.count, 1),
        }


@dataclass
class Reconstruction:
    coef: Any  # (K, F) complex Wiener-filtered class averages (working box)
    frc: np.ndarray  # (K, S) half-set FRC
    data_vs_prior: np.ndarray  # (K, S) RELION's spectral SNR: mean_shell(D) · T · tau²
    resolution: np.ndarray  # (K,) Å, FRC 0.143
    ref_power: np.ndarray  # (K, S) mean |A|² per shell
    halves: Any = None  # (2, K, F) half-set averages


def reconstruct(num: Any, den: Any, tau2: np.ndarray, t_fudge: float,
                geom: fo.Geometry) -> Reconstruction:  # fmt: skip
    """Wiener-filtered averages ``Σ S / (Σ D + 1/(T·tau²))`` from per-half sums (2, K, F),
    the half-set FRC (reported resolution) and RELION's data-vs-prior ratio."""
    xp = get_array_module(num)
    shell = geom.on("shell", xp)
    tau2_d = to_device(np.maximum(tau2, 1e-30).astype(np.float32), xp)
    reg = 1.0 / (np.float32(t_fudge) * tau2_d[:, shell])  # (K, F)
    full = (num[0] + num[1]) / (den[0] + den[1] + reg)
    halves = num / (den + reg[None])
    frc = to_host(fo.frc(halves[0], halves[1], geom))  # (K, S)
    frc[:, 0] = 1.0
    counts = np.maximum(fo.shell_counts(geom), 1)
    dmean = to_host(fo.shell_sums(den[0] + den[1], geom)) / counts[None]
    dvp = dmean * t_fudge * tau2
    dvp[:, 0] = dvp[:, 1] if dvp.shape[1] > 1 else dvp[:, 0]
    power = to_host(fo.shell_sums(full.real**2 + full.imag**2, geom)) / counts[None]
    return Reconstruction(full.astype(xp.complex64), frc, dvp,
                          resolution_from_frc(frc, geom), power, halves)  # fmt: skip


def shell_power(coef: Any, geom: fo.Geometry) -> np.ndarray:
    """tau² (K, S) of coefficient sets (K, F): half the mean |A|² per shell (RELION's
    convention, like sigma² = half the noise power: the prior on each complex coefficient is
    exp(-|A|²/(2 tau²))); shell 0 copies shell 1."""
    p = to_host(fo.shell_sums(coef.real**2 + coef.imag**2, geom))
    p = 0.5 * p / np.maximum(fo.shell_counts(geom), 1)[None]
    p[:, 0] = p[:, 1]
    return np.maximum(p, 1e-30)


def resolution_from_frc(frc: np.ndarray, geom: fo.Geometry) -> np.ndarray:
    """Resolution (Å) of the last shell before the FRC first drops below 0.143 (inf if
    already at shell 1; the working limit if never)."""
    k, s = frc.shape
    d = geom.box * geom.psize
    if s < 2:
        return np.full(k, np.inf, np.float32)
    below = np.asarray(frc)[:, 1:] < FRC_THRESHOLD
    last = np.where(below.any(axis=1), below.argmax(axis=1), s - 1)
    with np.errstate(divide="ignore"):
        return np.where(last < 1, np.inf, d / np.maximum(last, 1)).astype(np.float32)
