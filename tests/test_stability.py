"""--stability R: the runs share the main run's preprocessing (the same stability as when each
run preprocesses its own), go side by side on a Dask cluster (the same stability again)."""

from __future__ import annotations

import numpy as np
import pytest
from classify_data import make_particles

from companion.classify import classify
from companion.classify.em import cache_path
from companion.params import ClassifyParams
from companion.stability import run_stability


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return make_particles(tmp_path_factory.mktemp("stab"), n=160, n_classes=3, box=32,
                          psize=4.0, snr=0.5, seed=4)  # fmt: skip


def params(**kw) -> ClassifyParams:
    base = dict(n_classes=3, max_resolution=10.0, online_iters=2, batch_per_class=30,
                full_iters=1, anneal_start=1, anneal_iters=2, seed=3, device="cpu",
                stability=3)  # fmt: skip
    return ClassifyParams(**(base | kw))


def test_shared_preprocessing_gives_the_per_run_stability(sim, tmp_path):
    p = params()
    main = classify(sim.particles, p, work_dir=tmp_path / "main")
    cache = cache_path(tmp_path / "main")
    assert (cache / "coeffs.c64").is_file()  # kept for the stability runs
    shared, rec = run_stability(sim.particles, p, main, tmp_path / "main")
    assert not cache.exists()  # removed after them
    assert rec["shared_preprocessing"] and rec["preprocess_s"] == [0.0, 0.0]  # none redone
    old, rec_old = run_stability(sim.particles, p, main, tmp_path / "old", shared=False)
    assert all(s > 0 for s in rec_old["preprocess_s"])  # each run preprocessed its own
    np.testing.assert_array_equal(shared, old)
    assert rec["agreement"] == rec_old["agreement"]
    assert rec["seeds"] == rec_old["seeds"] and len(set(rec["seeds"])) == 3


def test_the_cache_of_a_run_without_stability_is_removed(sim, tmp_path):
    classify(sim.particles, params(stability=0), work_dir=tmp_path / "r")
    assert not cache_path(tmp_path / "r").exists()


def test_runs_side_by_side_on_a_dask_cluster_give_the_same_stability(sim, tmp_path):
    pytest.importorskip("distributed")
    p = params()
    main = classify(sim.particles, p, work_dir=tmp_path / "main")
    here, _ = run_stability(sim.particles, p, main, tmp_path / "here", shared=True)
    there, rec = run_stability(sim.particles, p.model_copy(update={"cluster": "local:2"}),
                               main, tmp_path / "there")  # fmt: skip
    assert rec["side_by_side"]
    np.testing.assert_array_equal(here, there)


# Quality floor, set from seeds 0-2 of this configuration (600 particles, box 32, SNR 0.2,
# K 8, short schedule, R 3; measured on the 2-core VM): AUC good vs junk 0.745 / 0.616 /
# 0.711 (mean 0.69); the matched-class fraction it replaced ranked at near chance on the
# bench sets (0.54-0.60). Disordered particles are NOT separated (0.51 / 0.55 / 0.53): no
# floor for them (see README, "Sub-classification and stability").
FLOOR_EACH, FLOOR_MEAN = 0.58, 0.62


def test_junk_is_less_stable_than_good_particles_over_three_seeds(tmp_path):
    from companion.bench.stability import stability_scores
    from companion.simulate import load_truth, simulate
    from companion.sources import open_particles

    aucs = []
    for seed in (0, 1, 2):
        data = tmp_path / f"s{seed}"
        simulate(data, 600, box=32, psize=6.0, snr=0.2, seed=seed, disordered_fraction=0.1,
                 progress=False)  # fmt: skip
        ps = open_particles(data / "particles.star", None)
        p = ClassifyParams(n_classes=8, seed=seed, device="cpu", stability=3, online_iters=6,
                           full_iters=1, anneal_iters=4)  # fmt: skip
        main = classify(ps, p, work_dir=tmp_path / f"run{seed}")
        stab, _ = run_stability(ps, p, main, tmp_path / f"run{seed}")
        assert stab.min() >= 0 and stab.max() <= 1
        aucs.append(stability_scores(stab, load_truth(data))["auc_good_vs_junk"])
    assert min(aucs) >= FLOOR_EACH and np.mean(aucs) >= FLOOR_MEAN, aucs
