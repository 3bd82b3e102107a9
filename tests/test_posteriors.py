"""Per-particle terms in the hosts' sense, ``--posteriors`` (STAR columns, ``.cs`` slot) and
``companion select`` on real (tiny) classify outputs of both flavours."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryosparc.dataset import Dataset

from companion.classify import particle_terms as pt
from companion.cli import main
from companion.relion.star import parse_star, read_star
from companion.simulate import simulate

try:
    from fake_result import make_fake_result
except ImportError:  # pragma: no cover
    from tests.fake_result import make_fake_result

K = 3
TINY = ["--n-classes", str(K), "--online-iters", "2", "--batch-per-class", "20",
        "--full-iters", "1", "--max-resolution", "16", "--psi-step", "15", "--device", "cpu",
        "--seed", "1"]  # fmt: skip
ADDED = [
    "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
    "rlnClassNumber", "rlnGroupNumber", "rlnNormCorrection", "rlnLogLikeliContribution",
    "rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples",
]  # fmt: skip
POSTERIOR_COLUMNS = [
    f"companion{what}{r}" for r in (1, 2, 3) for what in ("Class", "Posterior", "LogLikelihood")
] + ["companionAssignedPosterior"]
FEATURE_COLUMNS = ["companionLowresPower", "companionLoglikGain"]  # written by every run


# ----------------------------------------------------------------------------- unit terms


def _relion_count(w: np.ndarray, fraction: float = 0.999) -> int:
    """RELION's loop (ml_optimiser.cpp): largest weights first until their sum exceeds the
    fraction of the total."""
    total, acc, n = w.sum(), 0.0, 0
    for x in np.sort(w[w > 0])[::-1]:
        n += 1
        acc += x
        if acc > fraction * total:
            break
    return n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_significant_samples_match_relions_loop(seed):
    rng = np.random.default_rng(seed)
    b, k, t, r = 6, 4, 5, 7
    # peaked and flat posteriors alike
    post = rng.dirichlet(np.full(k, 0.3), size=b).astype(np.float32)
    dense = rng.gamma(0.2, size=(b, t, k, r)).astype(np.float32) ** 3
    dense /= dense.sum(axis=(1, 3), keepdims=True)
    joint = (dense * post[:, None, :, None]).reshape(b, -1)
    want = [_relion_count(row) for row in joint.astype(np.float64)]
    assert pt.significant_dense(dense, post, 0.999).tolist() == want
    assert pt.significant_rows(post, 0.999).tolist() == [_relion_count(p) for p in post]
    # fine windows of the fast search: pairs (particle, class), some particles with one pair
    pb = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])
    pk = np.array([0, 1, 2, 0, 1, 3, 1, 0, 2, 3])
    w = rng.gamma(0.3, size=(len(pb), 3, 9)).astype(np.float32) ** 2
    w /= w.sum(axis=(1, 2), keepdims=True)
    got = pt.significant_pairs(w, post[pb, pk], pb, b, 0.999)
    want = []
    for i in range(b):
        m = pb == i
        want.append(_relion_count((w[m] * post[pb[m], pk[m]][:, None, None]).ravel()))
    assert got.tolist() == want


def test_top_classes_sorted():
    rng = np.random.default_rng(3)
    post = rng.dirichlet(np.ones(6), size=20)
    ll = rng.normal(size=(20, 6))
    cls, prob, cll = pt.top_classes(post, ll, 3)
    assert np.all(np.diff(prob, axis=1) <= 0)
    assert np.array_equal(cls[:, 0], post.argmax(axis=1))
    assert np.allclose(cll, np.take_along_axis(ll, cls, axis=1))


def test_cryosparc_class_ess_is_inverse_sum_of_squares(real_data):
    """Real export: class_ess within [1/(p²+(1-p)²), 1/p²] for the best class's posterior p
    on every row (1 / Σ p_k²), and below exp(entropy) on some rows (not exp(entropy))."""
    d = Dataset.load(real_data / "cryosparc_J2_particles_exported.cs")
    p = np.asarray(d["alignments2D/class_posterior"], np.float64)
    ess = np.asarray(d["alignments2D/class_ess"], np.float64)
    q = 1 - p
    assert np.all(ess >= 1 / (p**2 + q**2) - 1e-3) and np.all(ess <= 1 / p**2 + 1e-3)
    h_min = -(p * np.log(p) + np.where(q > 0, q * np.log(np.maximum(q, 1e-30)), 0))
    assert np.any(ess < np.exp(h_min) - 1e-2)


def test_take_subsets_every_per_particle_field():
    r = make_fake_result(10, K, 16, seed=2)
    rng = np.random.default_rng(0)
    r = replace(
        r,
        post_class=rng.integers(0, K, (10, 2)).astype(np.int32),
        post_prob=rng.uniform(size=(10, 2)).astype(np.float32),
        post_loglik=rng.normal(size=(10, 2)).astype(np.float32),
        image_pow=np.arange(10, dtype=np.float32),
    )
    sub = r.take(np.array([1, 4, 7]))
    assert sub.n_particles == 3 and sub.n_posteriors == 2
    assert np.array_equal(sub.post_class, r.post_class[[1, 4, 7]])
    assert np.array_equal(sub.image_pow, [1, 4, 7])
    assert sub.cross_cor is None
    assert sub.class_sizes.tolist() == np.bincount(r.class_id[[1, 4, 7]], minlength=K).tolist()
    mask = np.zeros(10, bool)
    mask[[1, 4, 7]] = True
    assert np.array_equal(r.take(mask).psi_deg, sub.psi_deg)


# ----------------------------------------------------------------------------- classify runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run per flavour (posteriors default 3, --scale-correction on for .cs), one
    STAR run with --posteriors 0."""
    d = tmp_path_factory.mktemp("post")
    sim = d / "sim"
    simulate(sim, 120, box=32, psize=6.0, seed=3, progress=False)
    out = {"sim": sim}
    for name, inp, extra in (
        ("star", sim / "particles.star", []),
        ("cs", sim / "particles.cs", ["--project-dir", str(sim), "--scale-correction", "on"]),
        ("star0", sim / "particles.star", ["--posteriors", "0"]),
    ):
        out[name] = sim / name  # inside the project: RELION paths relative to it
        assert main(["classify", str(inp), "--out", str(out[name]), *TINY, *extra]) == 0
    return out


def _data(run: Path) -> tuple[Path, object]:
    path = run / "run_it003_data.star"
    return path, read_star(path)["particles"]


def test_star_columns_exact_and_invariants(runs):
    path, df = _data(runs["star"])
    cols = list(df.columns)
    assert cols[-len(FEATURE_COLUMNS) :] == FEATURE_COLUMNS
    cols = cols[: -len(FEATURE_COLUMNS)]
    assert cols[-len(POSTERIOR_COLUMNS) :] == POSTERIOR_COLUMNS
    assert cols[-len(POSTERIOR_COLUMNS) - len(ADDED) : -len(POSTERIOR_COLUMNS)] == ADDED
    assert np.all(np.isfinite(df[FEATURE_COLUMNS].to_numpy(float)))
    prob = df[[f"companionPosterior{r}" for r in (1, 2, 3)]].to_numpy()
    cls = df[[f"companionClass{r}" for r in (1, 2, 3)]].to_numpy()
    assert np.all(prob.sum(axis=1) <= 1 + 1e-5)
    np.testing.assert_allclose(prob.sum(axis=1), 1, atol=1e-5)  # all K of K classes
    assert np.all(np.diff(prob, axis=1) <= 0)
    assert np.all((cls >= 1) & (cls <= K))
    assert all(len(set(row)) == K for row in cls.tolist())  # distinct classes
    assert np.array_equal(cls[:, 0], df["rlnClassNumber"].to_numpy())
    np.testing.assert_allclose(prob[:, 0], df["companionAssignedPosterior"], atol=1e-6)
    nsig = df["rlnNrOfSignificantSamples"].to_numpy()
    assert np.all((nsig >= 1) & (nsig <= K))  # max mode: the samples are classes
    # RELION's dLL: log Σ_k π_k p(X|k) lies below the best class's log-likelihood
    ll = df[[f"companionLogLikelihood{r}" for r in (1, 2, 3)]].to_numpy()
    assert np.all(df["rlnLogLikeliContribution"].to_numpy() <= ll.max(axis=1) + 1e-3)
    _, df0 = _data(runs["star0"])
    assert [c for c in df0.columns if c.startswith("companion")] == FEATURE_COLUMNS
    assert list(df0.columns)[-len(ADDED) - len(FEATURE_COLUMNS) : -len(FEATURE_COLUMNS)] == ADDED


@pytest.mark.relion
def test_relion_313_reads_and_keeps_the_posterior_columns(runs, tmp_path):
    path, df = _data(runs["star"])
    dst = tmp_path / "copy.star"
    r = subprocess.run(["relion_star_handler", "--i", str(path), "--o", str(dst)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and "ERROR" not in r.stderr, r.stderr[-2000:]
    for col in POSTERIOR_COLUMNS:  # read, ignored, kept (one warning per label)
        assert f"unknown label: {col}" in r.stdout + r.stderr
    copy = read_star(dst)["particles"]
    assert list(copy.columns) == list(df.columns)
    for col in POSTERIOR_COLUMNS:
        np.testing.assert_allclose(copy[col].to_numpy(float), df[col].to_numpy(float), rtol=1e-6)


@pytest.mark.relion
def test_relion_refine_continues_from_a_run_with_posteriors(runs, monkeypatch):
    """relion_refine 3.1.3 --continue reads the files and carries the columns through
    (unchanged: RELION does not update them)."""
    if shutil.which("relion_refine") is None:
        pytest.skip("relion_refine not on PATH")
    monkeypatch.chdir(runs["sim"])
    cmd = ["relion_refine", "--continue", "star/run_it003_optimiser.star", "--o", "star/ct",
           "--iter", "4", "--j", "1"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ERROR" not in r.stderr, r.stdout[-1500:] + r.stderr[-2000:]
    _, ours = _data(runs["star"])
    theirs = read_star(runs["sim"] / "star" / "ct_it004_data.star")["particles"]
    assert list(theirs.columns)[: len(ours.columns)] == list(ours.columns)
    for col in POSTERIOR_COLUMNS:
        np.testing.assert_allclose(theirs[col].to_numpy(float), ours[col].to_numpy(float))


def test_cs_slot_round_trip_and_powers(runs):
    ds = Dataset.load(runs["cs"] / "particles.cs")
    fields = ds.fields()
    slot = [f for f in fields if f.startswith("posteriors/")]
    assert slot == [f"posteriors/{w}_{r}" for r in (1, 2, 3) for w in ("class", "prob", "loglik")]
    features = ["select/lowres_power", "select/loglik_gain"]  # written by every run
    assert fields[-len(slot) - len(features) :] == slot + features
    assert fields[: -len(slot) - len(features)][-1] == "alignments2D/class_ess"
    assert all(np.asarray(ds[f]).dtype == np.float32 for f in features)
    assert np.asarray(ds["posteriors/class_1"]).dtype == np.uint32
    assert np.asarray(ds["posteriors/prob_1"]).dtype == np.float32
    assert np.array_equal(ds["posteriors/class_1"], ds["alignments2D/class"])
    np.testing.assert_allclose(ds["posteriors/prob_1"], ds["alignments2D/class_posterior"])
    prob = np.stack([ds[f"posteriors/prob_{r}"] for r in (1, 2, 3)], axis=1).astype(float)
    assert np.all(prob.sum(axis=1) <= 1 + 1e-5) and np.all(np.diff(prob, axis=1) <= 0)
    # K posteriors of K classes: CryoSPARC's class_ess = 1 / Σ p² exactly
    np.testing.assert_allclose(ds["alignments2D/class_ess"], 1 / (prob**2).sum(axis=1), rtol=1e-4)
    a = {k: np.asarray(ds[f"alignments2D/{k}"], np.float64) for k in
         ("image_pow", "cross_cor", "slice_pow", "error", "alpha", "alpha_min")}  # fmt: skip
    assert np.all(a["slice_pow"] > 0) and np.all(a["image_pow"] > 0)
    err = a["image_pow"] - a["alpha"] * a["cross_cor"] + a["alpha"] ** 2 * a["slice_pow"]
    np.testing.assert_allclose(a["error"], err, rtol=1e-4)
    assert np.all(a["error"] >= 0)  # a squared residual
    np.testing.assert_allclose(a["alpha_min"], a["cross_cor"] / (2 * a["slice_pow"]), rtol=1e-4)
    assert not np.allclose(a["alpha"], 1.0)  # --scale-correction on: the fitted scales
    # written through cryosparc-tools and read back: the same values
    copy = Dataset.load(runs["cs"] / "particles.cs")
    copy.save(str(runs["cs"] / "copy.cs"))
    again = Dataset.load(runs["cs"] / "copy.cs")
    for f in slot:
        assert np.array_equal(again[f], ds[f])


# ----------------------------------------------------------------------------- select


def _select(capsys, *args: str) -> tuple[int, dict | str]:
    rc = main(["select", *args, "--json"])
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc == 0 else cap.err)


def test_select_star_by_class_and_margin(runs, tmp_path, capsys):
    _, df = _data(runs["star"])
    margin = df["companionPosterior1"].to_numpy() - df["companionPosterior2"].to_numpy()
    m = float(np.median(margin))
    cls = df["rlnClassNumber"].to_numpy()
    big = int(np.bincount(cls).argmax())
    rc, summary = _select(capsys, str(runs["star"]), "--classes", str(big), "--margin",
                          str(m), "--out", str(tmp_path / "sel"))  # fmt: skip
    assert rc == 0, summary
    want = (cls == big) & (margin >= m)
    assert summary["n_selected"] == int(want.sum()) > 0
    assert summary["classes_selected"] == [big]
    out = tmp_path / "sel" / "particles.star"
    star = parse_star(out)
    assert list(star.blocks) == ["optics", "particles"]
    sel = star.blocks["particles"]
    assert list(sel.columns) == list(df.columns)
    assert sel["rlnImageName"].tolist() == df["rlnImageName"][want].tolist()
    assert sel["rlnGroupNumber"].min() == 1
    if shutil.which("relion_star_handler"):
        r = subprocess.run(["relion_star_handler", "--i", str(out), "--o",
                            str(tmp_path / "c.star")], capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0 and "ERROR" not in r.stderr


def test_select_auto_is_the_select_rule(runs, tmp_path, capsys):
    from companion.select import SELECT_THRESHOLD

    summary = json.loads((runs["star"] / "summary.json").read_text())
    scores = np.asarray(summary["class_score"])
    sizes = np.asarray(summary["class_sizes"])
    want = np.flatnonzero((scores >= SELECT_THRESHOLD) & (sizes > 0)) + 1
    rc, got = _select(capsys, str(runs["star"]), "--classes", "auto", "--out", str(tmp_path))
    assert rc == 0 and got["classes_selected"] == want.tolist()
    # whole classes less the per-particle stage's outliers (companion.select), as counted
    removed = got["outliers_removed"]
    assert sorted(int(c) for c in removed) == want.tolist()
    assert got["n_selected"] == int(sizes[want - 1].sum()) - sum(removed.values())
    # --min-score 0 keeps every assigned particle
    rc, got = _select(capsys, str(runs["star"]), "--min-score", "0", "--out", str(tmp_path))
    assert rc == 0 and got["n_selected"] == 120


def test_select_auto_without_posteriors(runs, tmp_path, capsys):
    """A --posteriors 0 run has no assigned-class posteriors: --classes auto judges the
    classes by the written member features, as the run scored them; without those columns
    too it falls back to the written class scores (and says so)."""
    from companion.relion import class2d
    from companion.relion.star import parse_star, write_star
    from companion.select import SELECT_THRESHOLD

    run = runs["star0"]
    summary = json.loads((run / "summary.json").read_text())
    scores = np.asarray(summary["class_score"])
    sizes = np.asarray(summary["class_sizes"])
    want = (np.flatnonzero((scores >= SELECT_THRESHOLD) & (sizes > 0)) + 1).tolist()
    rc, got = _select(capsys, str(run), "--classes", "auto", "--out", str(tmp_path / "a"))
    assert rc == 0 and got["classes_selected"] == want and not got["notes"]
    copy = tmp_path / "old"
    shutil.copytree(run, copy)
    path = copy / "run_it003_data.star"
    star = parse_star(path)
    cols = star.blocks["particles"]
    star.blocks["particles"] = cols.drop(columns=[class2d.LOWRES_POWER, class2d.LOGLIK_GAIN])
    write_star(path, star.blocks, star.version or "30001")
    rc, got = _select(capsys, str(copy), "--classes", "auto", "--out", str(tmp_path / "b"))
    assert rc == 0 and got["classes_selected"] == want
    assert "class scores as written" in got["notes"][0]


def test_select_cs(runs, tmp_path, capsys):
    ds = Dataset.load(runs["cs"] / "particles.cs")
    cls = np.asarray(ds["alignments2D/class"])
    summary = json.loads((runs["cs"] / "summary.json").read_text())
    scores = np.asarray(summary["class_score"])
    s = float(np.sort(scores)[-1])  # the best class only
    rc, got = _select(capsys, str(runs["cs"]), "--classes", "0-2", "--min-score", str(s),
                      "--margin", "0", "--out", str(tmp_path))  # fmt: skip
    assert rc == 0, got
    want = scores[cls] >= s
    sel = Dataset.load(tmp_path / "particles_selected.cs")
    assert len(sel) == got["n_selected"] == int(want.sum())
    assert np.array_equal(sel["uid"], np.asarray(ds["uid"])[want])
    assert sel.fields() == ds.fields()


@pytest.mark.parametrize(
    "which, args, fragment",
    [
        ("cs", ["--min-stability", "0.5"], "no stability/fraction field"),
        ("star", ["--min-stability", "0.5"], "no companionStability column"),
        ("star0", ["--margin", "0.2"], "companionPosterior1"),
        ("star", [], "nothing to select by"),
        ("star", ["--classes", "0"], "classes 1 to 3"),
        ("cs", ["--classes", "3"], "classes 0 to 2"),
        ("star", ["--margin", "1.5"], "between 0 and 1"),
    ],
)
def test_select_errors_name_the_file(runs, tmp_path, capsys, which, args, fragment):
    rc, out = _select(capsys, str(runs[which]), *args, "--out", str(tmp_path / "s"))
    assert rc == 2
    assert fragment in out and len(out.strip().splitlines()) == 1
    if "field" in fragment or "column" in fragment or "Posterior1" in fragment:
        assert str(runs[which]) in out  # names the file


def test_select_refuses_a_directory_without_outputs(tmp_path, capsys):
    rc, out = _select(capsys, str(tmp_path), "--classes", "1", "--out", str(tmp_path / "s"))
    assert rc == 2 and "no *_itNNN_data.star" in out
    rc, out = _select(capsys, str(tmp_path / "missing"), "--classes", "1", "--out", "x")
    assert rc == 2 and "not found" in out


def test_scale_goes_into_rlnctfscalefactor_and_alpha(real_data):
    """--scale-correction on: rlnCtfScalefactor = the input's factor × the scale (RELION
    multiplies the CTF by it), alignments2D/alpha = the scale; off: neither is touched."""
    from companion.cryosparc.conventions import alignments2d_fields
    from companion.cryosparc.dataset_io import read_particles as read_cs
    from companion.relion.class2d import data_columns, posterior_columns

    ps = read_cs(real_data / "cryosparc_J2_particles_exported.cs")
    n = len(ps)
    base = make_fake_result(n, K, ps.box, seed=4)
    scale = np.linspace(0.5, 1.5, n).astype(np.float32)
    on = replace(base, scale=scale, params={**base.params, "scale_correction": "on"})
    ctf_scale = np.asarray(ps.ctf.scale, np.float64)
    np.testing.assert_allclose(data_columns(ps, on)["rlnCtfScalefactor"], ctf_scale * scale)
    np.testing.assert_allclose(alignments2d_fields(ps, on)["alignments2D/alpha"], scale)
    off = replace(base, scale=scale, params={**base.params, "scale_correction": "off"})
    assert "rlnCtfScalefactor" not in data_columns(ps, off)
    assert np.all(alignments2d_fields(ps, off)["alignments2D/alpha"] == 1)
    # unassigned particles of an online iteration: class 0 as rlnClassNumber writes them
    post = replace(base, post_class=np.full((n, 1), -1, np.int32),
                   post_prob=np.zeros((n, 1), np.float32),
                   post_loglik=np.zeros((n, 1), np.float32))  # fmt: skip
    cols = posterior_columns(post)
    assert list(cols) == ["companionClass1", "companionPosterior1", "companionLogLikelihood1",
                          "companionAssignedPosterior"]  # fmt: skip
    assert np.all(cols["companionClass1"] == 0)


def test_balanced_posteriors_are_the_unconstrained_ones(runs):
    """--balance: the capped assignment may give a particle a lower-ranked class; its
    assigned posterior is then that class's entry in the (unconstrained) top list."""
    from companion.classify import classify
    from companion.params import ClassifyParams
    from companion.sources import open_particles

    ps = open_particles(runs["sim"] / "particles.star")
    p = ClassifyParams(n_classes=K, online_iters=2, batch_per_class=20, full_iters=1,
                       max_resolution=16, psi_step=15, device="cpu", seed=1,
                       balance="equal")  # fmt: skip
    r = classify(ps, p)
    assert r.n_posteriors == K and r.class_sizes.max() <= r.cap
    hit = r.post_class == r.class_id[:, None]
    assert np.all(hit.sum(axis=1) == 1)  # the assigned class is in the list once
    np.testing.assert_allclose(r.post_prob[hit], r.class_prob, atol=1e-6)
    assert np.all(np.diff(r.post_prob, axis=1) <= 0)
    np.testing.assert_allclose(r.post_prob.sum(axis=1), 1, atol=1e-5)
