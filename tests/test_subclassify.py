"""--subclassify and --stability: lineage invariants, the allowed-class mask in the EM loop,
the merge test, stability, and the extra columns written and read back in both hosts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from fake_result import make_fake_result

from companion.classify.score import segments_mask
from companion.params import ClassifyParams
from companion.stability import class_means, match_classes, particle_stability, with_stability
from companion.subclassify import (
    MERGE_Z,
    Allowed,
    cross_frc,
    merge_groups,
    merge_test,
    plan_split,
    sub_params,
    subclassify,
)

# ------------------------------------------------------------------ plan and mask


def test_plan_splits_only_big_classes_into_about_mean_sized_parts():
    sizes = np.array([100, 100, 450, 30, 320, 0])  # mean 166.7
    plan = plan_split(sizes)
    assert set(plan) == {2}  # only 450 > 2 × mean
    assert plan[2] == 3  # ceil(450 / 166.7)
    assert plan_split(sizes, above=300) == {2: 3, 4: 2}
    assert plan_split(sizes, above=300, k=4) == {2: 4, 4: 4}
    assert plan_split(np.array([50, 50, 50])) == {}


def test_sub_run_schedule_is_shorter_and_settable():
    """The sub-run runs three quarters of the main run's online iterations by default
    (annealing over the same fraction of them), --subclassify-iters when given; full passes
    are kept."""
    sizes = np.array([100, 100, 450, 30, 320, 0])
    plan = plan_split(sizes)
    main = ClassifyParams(n_classes=6, subclassify=True, online_iters=20, anneal_iters=15,
                          full_iters=2)  # fmt: skip
    sp = sub_params(main, 450, plan, sizes, None)
    assert (sp.online_iters, sp.anneal_iters, sp.full_iters) == (15, 11, 2)
    assert sp.subclassify is False and sp.subclassify_iters is None
    same = sub_params(main.model_copy(update={"subclassify_iters": 20}), 450, plan, sizes, None)
    assert (same.online_iters, same.anneal_iters) == (20, 15)
    short = sub_params(main.model_copy(update={"subclassify_iters": 3}), 450, plan, sizes, None)
    assert (short.online_iters, short.anneal_iters) == (3, 2)
    with pytest.raises(ValueError, match="need --subclassify"):
        ClassifyParams(n_classes=6, subclassify_iters=4)


def test_seed_owner_deals_each_parent_over_its_own_subclasses():
    pp = np.repeat([0, 1, 2], [50, 31, 19])
    cp = np.array([0, 0, 1, 1, 1, 2, 2])
    owner = Allowed(pp, cp).seed_owner(seed=3)
    assert np.all(cp[owner] == pp)
    for p in range(3):  # dealt evenly
        counts = np.bincount(owner[pp == p], minlength=len(cp))[cp == p]
        assert counts.max() - counts.min() <= 1


def test_segments_allow_only_the_particles_own_parents_classes():
    al = Allowed(np.array([0, 1, 1, 0, 1, 0]), np.array([0, 0, 1, 1, 1]))
    got = segments_mask(al.segments(np.array([0, 1, 2, 5]), np), 4, 5, np)
    want = np.array([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    assert got.dtype == bool and np.array_equal(got, want)


# ------------------------------------------------------------------ merge test


def _noisy_pair(signal_a, signal_b, noise, rng):
    """Two half-set pairs: (average a, average b, half-set FRC of a, of b)."""
    halves = [[s + noise * rng.normal(size=s.shape) for _ in "ab"] for s in (signal_a, signal_b)]
    frc = [cross_frc(h[0], h[1]) for h in halves]
    avg = [0.5 * (h[0] + h[1]) for h in halves]
    return avg[0], avg[1], frc[0], frc[1]


def _blobs(box, centres):
    yy, xx = np.mgrid[:box, :box] - box // 2
    return sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0) for x, y in centres)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_test_merges_identical_signals_and_splits_different_ones(seed):
    rng = np.random.default_rng(seed)
    box = 48
    body = _blobs(box, [(-4, 0), (3, 2), (0, -6)])
    arm = _blobs(box, [(10, 8), (13, 11)])
    a, b, fa, fb = _noisy_pair(body + arm, body + arm, 0.3, rng)
    assert merge_test(a, b, fa, fb) < MERGE_Z
    a, b, fa, fb = _noisy_pair(body + arm, body, 0.3, rng)  # the domain fell off
    assert merge_test(a, b, fa, fb) > MERGE_Z
    # pure noise: nothing to tell apart, merged
    a, b, fa, fb = _noisy_pair(0 * body, 0 * body, 1.0, rng)
    assert merge_test(a, b, fa, fb) < MERGE_Z


def test_merge_groups_joins_siblings_only():
    box = 32
    img = _blobs(box, [(0, 0), (5, 3)])
    other = _blobs(box, [(-6, 4)])
    averages = np.stack([img, img, other, img]).astype(np.float32)
    frc = np.full((4, box // 2 + 1), 0.9)
    reps, tests = merge_groups(averages, frc, np.array([10, 20, 15, 5]), np.array([0, 0, 0, 1]))
    assert reps.tolist() == [1, 1, 2, 3]  # the larger of the identical pair represents it
    assert {(t["a"], t["b"]) for t in tests} == {(0, 1), (0, 2), (1, 2)}  # not across parents


# ------------------------------------------------------------------ lineage (stand-in EM)


class FakeSub:
    """A stand-in classifier for the sub-run: each particle to a random allowed sub-class;
    sub-class averages distinct (``same=False``) or identical within a parent."""

    def __init__(self, same: bool):
        self.same = same
        self.calls = []

    def __call__(self, particles, params, *, work_dir=None, callbacks=None, allowed=None):
        n, k = len(particles), params.n_classes
        self.calls.append((n, k, allowed))
        res = make_fake_result(n, k, 32, seed=5)
        owner = allowed.seed_owner(11)
        res.class_id = owner.astype(np.int32)
        res.class_sizes = np.bincount(owner, minlength=k).astype(np.int64)
        res.frc = np.full_like(res.frc, 0.9)
        if self.same:
            res.averages = res.averages[allowed.class_parent * 0]
        return res


class Subset:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


class FakeParticles:
    box, pixel_size = 32, 2.0

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def subset(self, idx):
        return Subset(len(idx))


def _main(n=600, k=6, seed=0):
    res = make_fake_result(n, k, 32, seed=seed)
    # two big classes (0 and 3), the rest small
    rng = np.random.default_rng(seed)
    lab = rng.choice(k, size=n, p=[0.4, 0.05, 0.05, 0.4, 0.05, 0.05]).astype(np.int32)
    res.class_id, res.class_sizes = lab, np.bincount(lab, minlength=k).astype(np.int64)
    return res


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lineage_invariants(seed):
    main = _main(seed=seed)
    params = ClassifyParams(n_classes=6, subclassify=True, seed=seed)
    fake = FakeSub(same=False)
    flat = subclassify(FakeParticles(len(main.class_id)), params, main, classifier=fake)
    assert len(fake.calls) == 1  # ONE run over all big classes
    split = {int(c) - 1: [int(s) - 1 for s in subs] for c, subs in flat.lineage["split"].items()}
    big = set(np.flatnonzero(main.class_sizes > 2 * main.class_sizes.mean()).tolist())
    assert set(split) == big and len(big) == 2
    parent = np.asarray(flat.parent_class)
    for c, subs in split.items():  # every sub-class's parent is a main class that was split
        assert len(subs) >= 2 and np.all(parent[subs] == c)
    unsplit = [i for i in range(flat.n_classes) if not any(i in s for s in split.values())]
    assert sorted(parent[unsplit].tolist()) == sorted(set(range(6)) - big)
    # counts conserved; a particle of parent c never lands in another parent's sub-class
    assert flat.class_sizes.sum() == len(main.class_id)
    assert np.array_equal(flat.class_sizes, np.bincount(flat.class_id, minlength=flat.n_classes))
    assert np.array_equal(parent[flat.class_id], main.class_id)
    assert flat.averages.shape[0] == flat.n_classes == len(parent)


def test_identical_subclasses_merge_back_into_the_main_class():
    main = _main(seed=4)
    params = ClassifyParams(n_classes=6, subclassify=True)
    flat = subclassify(FakeParticles(len(main.class_id)), params, main, classifier=FakeSub(True))
    assert flat.lineage["split"] == {}
    assert sorted(flat.lineage["kept_whole"]) == [1, 4]
    assert np.array_equal(flat.class_id, main.class_id)
    assert np.array_equal(flat.parent_class, np.arange(6))


# ------------------------------------------------------------------ the EM loop with a mask


def test_em_keeps_particles_inside_their_parent(tmp_path):
    from classify_data import make_particles

    from companion.classify import classify

    particles = make_particles(tmp_path, n=240, n_classes=3, box=32, snr=2.0, seed=1).particles
    n = len(particles)
    pp = np.arange(n) % 2  # two "parents"
    cp = np.array([0, 0, 1, 1, 1])
    al = Allowed(pp, cp, np.zeros((2, particles.box, particles.box), np.float32) + 0.1)
    p = ClassifyParams(n_classes=5, online_iters=3, full_iters=1, balance="cap",
                       max_per_class=60, max_resolution=12.0, device="cpu")  # fmt: skip
    res = classify(particles, p, allowed=al)
    assert np.all(cp[res.class_id] == pp)
    assert res.class_sizes.max() <= 60


# ------------------------------------------------------------------ stability


def test_stability_is_one_for_identical_runs_and_in_unit_interval():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, 300)
    perm = rng.permutation(6)
    assert np.all(particle_stability([a, a, perm[a]]) == 1.0)  # relabelled: same partners
    b = rng.integers(0, 6, 300)
    s = particle_stability([a, b, perm[a]])
    assert s.min() >= 0 and s.max() <= 1 and s.min() > 1 / 3  # one pair of three agrees
    assert s.max() < 1 and np.isclose(
        particle_stability([a, b])[0],
        np.mean(  # Jaccard
            np.sum((a == a[0]) & (b == b[0])) / np.sum((a == a[0]) | (b == b[0]))
        ),
    )
    split = np.where(a == 0, 6 + (np.arange(300) % 2), a)  # class 0 halved in one run
    st = particle_stability([a, split], [6, 8])
    assert np.allclose(st[a == 0], 0.5, atol=0.05) and np.all(st[a != 0] == 1.0)
    assert np.array_equal(match_classes(a, perm[a], 6, 6)[perm], np.arange(6))
    assert particle_stability([a]).tolist() == [1.0] * 300


def test_class_stability_is_the_mean_over_its_particles():
    labels = np.array([0, 0, 1, 1, 1, 3])
    cm = class_means(np.array([1, 0, 1, 1, 0.5, 0.2]), labels, 4)
    assert np.allclose(cm[[0, 1, 3]], [0.5, 2.5 / 3, 0.2]) and np.isnan(cm[2])


# ------------------------------------------------------------------ host columns


def _with_extras(result):
    k = result.n_classes
    stab = np.linspace(0, 1, result.n_particles).astype(np.float32)
    r = dataclasses.replace(result, parent_class=np.arange(k) // 2)
    return with_stability(r, stab, {"runs": 3, "seeds": [0, 1, 2], "seconds": [1.0, 1.0],
                                    "agreement": [0.9, 0.8]})  # fmt: skip


def test_relion_columns_written_and_read_back(tmp_path, monkeypatch):
    from test_relion_class2d import make_project

    from companion.relion import read_particles, write_class2d_outputs
    from companion.relion.star import read_star

    proj = tmp_path / "project"
    proj.mkdir()
    star = make_project(proj)
    monkeypatch.chdir(proj)
    particles = read_particles(star, project_dir=proj)
    result = _with_extras(make_fake_result(len(particles), 4, particles.box, seed=2,
                                           optics_groups=(1, 2)))  # fmt: skip
    result.params = ClassifyParams(n_classes=4).resolved()
    paths = write_class2d_outputs(proj / "External" / "job009", "run", particles, result, 2)
    table = read_star(paths["data"])["particles"]
    parent = np.asarray(result.parent_class)[result.class_id] + 1
    assert np.array_equal(table["companionParentClass"].astype(int).to_numpy(), parent)
    assert np.allclose(table["companionStability"].astype(float).to_numpy(), result.stability,
                       atol=1e-5)  # fmt: skip
    again = read_particles(paths["data"], project_dir=proj)  # companion still reads it
    assert len(again) == len(particles)


def test_cryosparc_fields_written_and_read_back(tmp_path):
    from cryosparc.dataset import Dataset
    from test_relion_class2d import make_project

    from companion.cryosparc import write_class2d_outputs
    from companion.relion import read_particles

    proj = tmp_path / "project"
    proj.mkdir()
    particles = read_particles(make_project(proj), project_dir=proj)
    result = _with_extras(make_fake_result(len(particles), 4, particles.box, seed=3))
    paths = write_class2d_outputs(tmp_path / "out", particles, result)
    ds = Dataset.load(str(paths["particles"]))
    parent = np.asarray(result.parent_class)[result.class_id]
    assert np.array_equal(np.asarray(ds["lineage/parent_class"]), parent)
    assert np.allclose(np.asarray(ds["stability/fraction"]), result.stability)


def test_summary_and_gallery_carry_lineage_and_stability(tmp_path):
    from companion.report import build_summary, write_gallery

    result = _with_extras(make_fake_result(40, 4, 24, seed=1))
    result.lineage = {"split": {"1": [1, 2]}, "kept_whole": [], "tested": []}
    s = build_summary(result, files={}, n_particles=40)
    assert s["subclassify"]["parent_class"] == [1, 1, 2, 2]
    assert s["subclassify"]["split"] == {"1": [1, 2]}
    assert s["stability"]["runs"] == 3 and len(s["stability"]["class_stability"]) == 4
    png = write_gallery(tmp_path / "g.png", result.averages, result.class_sizes,
                        result.resolution_A, parents=result.parent_class,
                        stability=result.class_stability)  # fmt: skip
    assert Path(png).stat().st_size > 1000


def test_masked_classify_runs_on_the_strict_backend(monkeypatch, tmp_path):
    import strict_xp
    from classify_data import make_particles

    from companion.classify import classify
    from companion.classify import em as em_mod

    particles = make_particles(tmp_path, n=120, n_classes=2, box=32, snr=1.0, seed=2).particles
    pp = np.arange(120) % 2
    cp = np.array([0, 0, 1, 1])
    al = Allowed(pp, cp, np.zeros((2, 32, 32), np.float32) + 0.1)
    kw = dict(n_classes=4, max_resolution=8.0, online_iters=2, batch_per_class=30, full_iters=1,
              balance="cap", max_per_class=40, seed=1)  # fmt: skip
    ref = classify(particles, ClassifyParams(device="cpu", **kw), allowed=al)
    monkeypatch.setattr(em_mod, "select_device", lambda name: strict_xp.module)
    res = classify(particles, ClassifyParams(device="gpu", **kw), allowed=al)
    np.testing.assert_array_equal(res.class_id, ref.class_id)
    assert np.all(cp[res.class_id] == pp)


def test_run_stability_with_a_seed_independent_classifier_is_one():
    main = make_fake_result(90, 5, 24, seed=0)
    perm = np.array([3, 0, 4, 1, 2])
    seeds = []

    def same_partners(particles, params, *, work_dir=None, callbacks=None, cache_dir=None):
        seeds.append(params.seed)
        return dataclasses.replace(main, class_id=perm[main.class_id].astype(np.int32))

    from companion.stability import run_stability

    params = ClassifyParams(n_classes=5, stability=4, seed=2)
    stab, rec = run_stability(FakeParticles(90), params, main, classifier=same_partners)
    assert np.all(stab == 1.0) and rec["agreement"] == [1.0, 1.0, 1.0]
    assert len(set(seeds)) == 3 and 2 not in seeds  # R-1 more runs, each its own seed
