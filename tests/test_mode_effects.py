"""The documented effects of the two modes, on a small simulated flexible-domain set with junk
where the default collapses (the attractor effect), as MEDIANS over five simulation seeds,
so that no floor rests on one seed or on one machine's BLAS.

Why medians: a single seed's figures move with the BLAS (threads, build): seed 2 gave junk in
good classes 3.8% (anneal off) vs 4.7% (default) on one machine and 7.96% vs 5.52% on a fresh
clone elsewhere, so a single-seed comparison fails deterministically somewhere.

Data: 1000 particles, box 64, SNR 0.05, K 12, seeds 0-4; the 15 (seed, mode) runs go two
processes at a time, one BLAS thread each (``run_modes_cells``), about 2 minutes on 2 cores.
Measured on the 2-core dev VM (OpenBLAS 0.3.31, AVX-512), seeds 0-5 at one BLAS thread
(two threads gave the same figures for seeds 0-4):

- default: classes below 10% of the mean 4-6 (median 5), largest class 38-70% (median 49%),
  state purity 0.29-0.40, classes some state is the majority of 5-6, junk in good classes
  2.7-6.9%, junk recall 59-85%;
- anneal off: below 10% 2-5 (median 3), largest 24-52% (median 30%), state purity
  0.29-0.45 (median of the 5-seed subsets 0.035-0.066 above the default's), junk in good
  2.7-6.0%, recall 64-85%;
- balanced: no class below 10%, the cap exact, 11-12 classes some state is the majority of,
  state purity 0.42-0.55 (medians 0.10-0.11 above the default's).

Over every 5-seed subset of seeds 0-5 the medians keep: default below-10% 5 and largest >=
0.45; balanced +7 classes per state and +0.10 purity; anneal-off largest <= 0.76 x the
default's, 2 fewer classes below 10%, purity +0.035 or more. The floors below sit inside
those by at least the seed-to-seed spread of each figure.

Junk: at this size anneal-off and the default are TIED on junk (medians of 5 seeds differ by
-0.4 to +0.5 points in junk in good classes and -3.3 to +2.7 points in recall; per seed the
paired differences spread by SD 2.7 and 16 points). The junk test therefore only guards
against anneal-off being clearly worse (as it was with estimated class priors, +3.7 points
of junk in good classes in README 'Annealing off'): margins of 2 points (junk in good) and
10 points (recall), about 1.3 and 1.1 standard errors of a 5-seed median beyond the worst
subset. Whether anneal-off keeps junk out BETTER is a benchmark question (``companion bench
modes``, README), not a test's.
"""

from __future__ import annotations

import numpy as np
import pytest

from companion.bench.modes import run_modes_cells
from companion.threads import available_cores

N, K, SEEDS = 1000, 12, (0, 1, 2, 3, 4)
MODES = ["default", "anneal-off", "balanced"]


@pytest.fixture(scope="module")
def runs():
    """{mode: [row per seed]}."""
    rows = run_modes_cells(SEEDS, modes=MODES, jobs=min(2, available_cores()), threads=1,
                           n=N, k_values=(K,), box=64, device="cpu")  # fmt: skip
    out: dict[str, list] = {m: [] for m in MODES}
    for r in rows:
        out[r["mode"]].append(r)
    assert [r["data"]["seed"] for r in out["default"]] == list(SEEDS)
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


def test_anneal_off_is_not_worse_on_junk(runs):
    d, a = runs["default"], runs["anneal-off"]
    assert med(a, "junk_in_good_classes") <= med(d, "junk_in_good_classes") + 0.02
    assert med(a, "junk_recall") >= med(d, "junk_recall") - 0.10
