"""The documented effects of the two modes, on a small simulated flexible-domain set with junk
where the default collapses (the attractor effect), at modest thresholds.

Measured (2000 particles, box 64, SNR 0.05, K 16; simulation seeds 0 / 1 / 2, this data set is
seed 2): classes below 10% of the mean 7 / 5 / 10 (default), 5 / 2 / 4 (anneal off),
0 / 0 / 0 (balanced); largest class 39 / 37 / 41% (default), 25 / 21 / 22% (anneal off);
state purity 0.33 / 0.48 / 0.35 (default), 0.44 / 0.52 / 0.48 (anneal off), 0.55 / 0.57 / 0.47
(balanced); classes some state is the majority of 6 / 9 / 6 (default), 16 / 16 / 16
(balanced); junk in good classes 4.8 / 5.7 / 4.7% (default), 5.5 / 4.7 / 3.8% (anneal off).
About 95 s on 2 cores.
"""

from __future__ import annotations

import pytest

from companion.bench.modes import run_modes_benchmark

N, K, SEED = 2000, 16, 2


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = run_modes_benchmark(tmp_path_factory.mktemp("effects"), n=N, k_values=(K,), seed=SEED,
                              box=64, device="cpu",
                              modes=["default", "anneal-off", "balanced"])  # fmt: skip
    return {r["mode"]: r for r in out}


def states_spread(row) -> int:
    """Classes that some flexible-domain state is the majority of."""
    return sum(v for s, v in row["classes_per_state"].items() if int(s) >= 0)


def test_default_collapses_here(rows):
    d = rows["default"]  # the premise of the other tests: an attractor forms
    assert d["classes_below_10pct"] >= 4 and d["largest_class_fraction"] > 0.3


def test_balanced_spreads_particles_and_states(rows):
    d, b = rows["default"], rows["balanced"]
    assert b["cap"] == -(-N // K) and b["largest_class"] <= b["cap"]
    assert b["classes_below_10pct"] == 0
    assert states_spread(b) >= states_spread(d) + 4
    assert b["state_purity"] >= d["state_purity"] + 0.05


def test_anneal_off_weakens_the_attractor(rows):
    d, a = rows["default"], rows["anneal-off"]
    assert a["params"]["class_priors"] == "uniform" and a["params"]["noise_model"] == "fixed"
    assert a["largest_class_fraction"] <= 0.8 * d["largest_class_fraction"]
    assert a["classes_below_10pct"] < d["classes_below_10pct"]
    assert a["state_purity"] >= d["state_purity"]


def test_anneal_off_keeps_junk_out_at_least_as_well(rows):
    d, a = rows["default"], rows["anneal-off"]
    assert a["junk_in_good_classes"] <= d["junk_in_good_classes"] + 0.005
    assert a["junk_recall"] >= d["junk_recall"] - 0.02
