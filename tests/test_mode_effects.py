"""The documented effects of the two modes, on a small simulated flexible-domain set with junk
where the default collapses (the attractor effect), as MEDIANS over three simulation seeds,
so that no floor rests on one seed or on one machine's BLAS.

Why medians: a single seed's figures move with the BLAS (threads, build): seed 2 gave junk in
good classes 3.8% (anneal off) vs 4.7% (default) on one machine and 7.96% vs 5.52% on a fresh
clone elsewhere, so the single-seed comparison failed deterministically there.

Measured per seed (2000 particles, box 64, SNR 0.05, K 16; seeds 0 / 1 / 2; previous session's
code, OpenBLAS default threads): classes below 10% of the mean 7 / 5 / 10 (default),
5 / 2 / 4 (anneal off), 0 / 0 / 0 (balanced); largest class 39 / 37 / 41% (default),
25 / 21 / 22% (anneal off); state purity 0.33 / 0.48 / 0.35 (default), 0.44 / 0.52 / 0.48
(anneal off), 0.55 / 0.57 / 0.47 (balanced); classes some state is the majority of
6 / 9 / 6 (default), 16 / 16 / 16 (balanced); junk in good classes 4.8 / 5.7 / 4.7%
(default), 5.5 / 4.7 / 3.8% (anneal off). The margins below are at least the seed-to-seed
spread of each figure (junk in good classes: ~1 point; recall: ~3 points). NOT re-measured
with this session's anneal-off noise model (background estimate) nor at
OPENBLAS_NUM_THREADS=1 vs 2: the shared machine was too loaded to finish those runs.
With this session's code (anneal-off's noise model from the background), one run of this
file on the 2-core dev VM: median largest class 28.7% (anneal off) vs 35.5% (default), a
ratio of 0.81 (the previous code's 0.56-0.59 came from the particle-power noise estimate),
while the junk and state-purity comparisons held. The largest-class floor is therefore 0.9x
the default's, a margin of 0.09 over that one measurement; the per-seed spread of the new
code is not measured yet. About 3x the single-seed time (~270 s on 2 idle cores; 486 s
under load).
"""

from __future__ import annotations

import numpy as np
import pytest

from companion.bench.modes import run_modes_benchmark

N, K, SEEDS = 2000, 16, (0, 1, 2)
MODES = ["default", "anneal-off", "balanced"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{mode: [row per seed]}."""
    out: dict[str, list] = {m: [] for m in MODES}
    for seed in SEEDS:
        rows = run_modes_benchmark(tmp_path_factory.mktemp(f"effects{seed}"), n=N,
                                   k_values=(K,), seed=seed, box=64, device="cpu",
                                   modes=MODES)  # fmt: skip
        for r in rows:
            out[r["mode"]].append(r)
    return out


def states_spread(row) -> int:
    """Classes that some flexible-domain state is the majority of."""
    return sum(v for s, v in row["classes_per_state"].items() if int(s) >= 0)


def med(rows, key) -> float:
    vals = [states_spread(r) if key == "states_spread" else r[key] for r in rows]
    return float(np.median(vals))


def test_default_collapses_here(runs):
    d = runs["default"]  # the premise of the other tests: an attractor forms
    assert med(d, "classes_below_10pct") >= 4 and med(d, "largest_class_fraction") > 0.3


def test_balanced_spreads_particles_and_states(runs):
    d, b = runs["default"], runs["balanced"]
    for r in b:  # promises, per seed
        assert r["cap"] == -(-N // K) and r["largest_class"] <= r["cap"]
        assert r["classes_below_10pct"] == 0
    assert med(b, "states_spread") >= med(d, "states_spread") + 4
    assert med(b, "state_purity") >= med(d, "state_purity") + 0.05


def test_anneal_off_weakens_the_attractor(runs):
    d, a = runs["default"], runs["anneal-off"]
    for r in a:
        assert r["params"]["class_priors"] == "uniform" and r["params"]["noise_model"] == "fixed"
    assert med(a, "largest_class_fraction") <= 0.9 * med(d, "largest_class_fraction")
    assert med(a, "classes_below_10pct") < med(d, "classes_below_10pct")
    assert med(a, "state_purity") >= med(d, "state_purity")


def test_anneal_off_keeps_junk_out_at_least_as_well(runs):
    d, a = runs["default"], runs["anneal-off"]
    assert med(a, "junk_in_good_classes") <= med(d, "junk_in_good_classes") + 0.01
    assert med(a, "junk_recall") >= med(d, "junk_recall") - 0.03
