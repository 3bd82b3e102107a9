"""``companion classify`` and ``companion demo`` in-process on tiny simulated sets."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from companion.cli import main
from companion.simulate import load_truth, simulate

TINY = [
    "--n-classes",
    "3",
    "--online-iters",
    "2",
    "--batch-per-class",
    "20",
    "--full-iters",
    "1",
    "--max-resolution",
    "16",
    "--psi-step",
    "15",
    "--device",
    "cpu",
    "--seed",
    "1",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    simulate(d, 120, box=32, psize=6.0, seed=3, progress=False)
    return d


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--balance", "cap", "--max-per-class", "10"], "--max-per-class 10"),  # 10×3 < 120
        (["--balance", "equal", "--balance-slack", "0.5"], "--balance-slack"),
        (["--reseed-empty", "-0.1"], "--reseed-empty"),
        (["--n-classes", "500"], "500 classes for 120 particles"),
        (["--balance", "cap"], "--max-per-class"),
        (["--balance", "equal", "--class-priors", "estimated"], "--class-priors estimated"),
    ],
)
def test_bad_parameters_exit_2_before_work(tiny, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    rc = main(["classify", str(tiny / "particles.star"), "--out", str(out), *TINY, *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert fragment in err
    lines = [x for x in err.splitlines() if "error" in x]
    assert len(lines) == 1 and "Traceback" not in err
    assert not out.exists()


def test_missing_input_is_one_line(tmp_path, capsys):
    rc = main(["classify", str(tmp_path / "nope.star"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.star" in err and "Traceback" not in err


def test_gpu_without_gpu_is_a_clear_error(tiny, tmp_path, capsys, monkeypatch):
    import companion.classify.backend as backend

    monkeypatch.setattr(backend, "cupy_or_none", lambda: None)
    args = ["classify", str(tiny / "particles.star"), "--out", str(tmp_path / "o")]
    rc = main([*args, *TINY, "--device", "gpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "--device gpu" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def _classifier_ready() -> bool:
    try:
        from companion.classify import classify  # noqa: F401
        from companion.relion import write_class2d_outputs  # noqa: F401
    except ImportError:
        return False
    return True


needs_classifier = pytest.mark.skipif(
    not _classifier_ready(), reason="classifier or RELION writer not importable"
)


@needs_classifier
def test_classify_star_end_to_end(tiny, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="companion.run")
    out = tmp_path / "c2d"
    rc = main(["classify", str(tiny / "particles.star"), "--out", str(out), *TINY, "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["n_particles"] == 120 and summary["n_classes"] == 3
    assert sum(summary["class_sizes"]) == 120
    assert summary["iterations"] == 3
    assert summary["params"]["n_classes"] == 3 and summary["params"]["psi_step"] == 15
    data = starfile.read(out / "run_it003_data.star", always_dict=True)["particles"]
    assert len(data) == 120
    counts = np.bincount(data["rlnClassNumber"].to_numpy() - 1, minlength=3)
    assert counts.tolist() == summary["class_sizes"]
    with mrcfile.open(out / "run_it003_classes.mrcs", permissive=True) as m:
        assert m.data.shape == (3, 32, 32)
    for name in ("gallery", "occupancy", "data", "model", "optimiser", "classes"):
        assert (out / summary["files"][name]).is_file(), name  # relative to --out
    progress = [r.getMessage() for r in caplog.records if r.name == "companion.run"]
    assert any(m.startswith("iteration 3/3") and "ETA" in m for m in progress)


@needs_classifier
def test_classify_cs_balanced_end_to_end(tiny, tmp_path, capsys):
    from cryosparc.dataset import Dataset

    out = tmp_path / "cs"
    args = ["classify", str(tiny / "particles.cs"), "--project-dir", str(tiny), "--out", str(out)]
    rc = main([*args, *TINY, "--balance", "equal", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["cap"] == 40 and summary["largest_class"] <= 40
    ds = Dataset.load(out / "particles.cs")
    assert len(ds) == 120
    truth = load_truth(tiny)
    assert len(truth) == 120


@needs_classifier
def test_ctrl_c_then_continue(tiny, tmp_path, capsys, monkeypatch):
    """Ctrl-C after iteration 1: exit 130, a --continue hint, no summary; --continue then
    finishes from the checkpoint with the same result as an uninterrupted run."""
    import companion.run as runmod

    real = runmod.ProgressLog.on_iteration

    def interrupt_after_first(self, info):
        real(self, info)
        if info.iteration == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    monkeypatch.setattr(runmod.ProgressLog, "on_iteration", interrupt_after_first)
    out = tmp_path / "c2d"
    args = ["classify", str(tiny / "particles.star"), "--out", str(out), *TINY]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 130, err
    assert "--continue" in err and "Traceback" not in err
    assert not (out / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    monkeypatch.undo()
    assert main([*args, "--continue"]) == 0
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["iterations"] == 3
    full = tmp_path / "full"
    assert main(["classify", str(tiny / "particles.star"), "--out", str(full), *TINY]) == 0
    straight = json.loads((full / "summary.json").read_text())
    assert resumed["class_sizes"] == straight["class_sizes"]


@needs_classifier
def test_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(
        [
            "demo",
            "--out",
            str(out),
            "--n-particles",
            "100",
            "--n-classes",
            "3",
            "--box",
            "32",
            "--device",
            "cpu",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    comparison = json.loads(captured.out)
    assert comparison == json.loads((out / "truth_comparison.json").read_text())
    f = comparison["figures"]
    assert f["n_particles"] == 100 and f["n_classes"] == 3
    assert 0.0 <= f["nmi"] <= 1.0 and -1.0 <= f["ari"] <= 1.0
    assert sum(f["class_sizes"]) == 100
    assert len(f["class_correlation"]) == 3
    assert (out / "classes" / "class_averages.png").is_file()
    assert (out / "data" / "truth.csv").is_file()
    assert comparison["summary"]["n_particles"] == 100


@needs_classifier
def test_bench_quality_and_speed_tiny(tmp_path, capsys):
    rc = main(
        [
            "bench",
            "quality",
            "--n-particles",
            "120",
            "--n-classes",
            "3",
            "--box",
            "32",
            "--online-iters",
            "2",
            "--full-iters",
            "1",
            "--device",
            "cpu",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rep = json.loads(captured.out)
    assert rep["machine"]["cores"] >= 1 and "cpu" in rep["machine"]
    assert rep["figures"]["n_particles"] == 120 and rep["params"]["online_iters"] == 2
    for key in (
        "nmi",
        "ari",
        "junk_recall",
        "classes_below_10pct",
        "largest_class_fraction",
        "state_purity",
        "class_correlation",
    ):
        assert key in rep["figures"]
    rc = main(
        [
            "bench",
            "speed",
            "--n-particles",
            "60",
            "--box",
            "32",
            "--n-classes",
            "3",
            "--iters",
            "2",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rep = json.loads(captured.out)
    cpu = rep["companion"]["cpu"]
    assert len(cpu["iterations"]) == 2 and cpu["particles_per_s"] > 0
    assert cpu["evaluations_per_s"] == pytest.approx(cpu["particles_per_s"] * 3)
    assert cpu["matmul_peak_flops"] > 1e8 and cpu["gemm_flops"] > 0
    assert "relion" not in rep


def test_relion_command_matches_companion_sampling():
    from companion.bench.speed import relion_command, sampling_counts
    from companion.params import ClassifyParams

    p = ClassifyParams(n_classes=7, psi_step=6.0, max_shift=0.1, seed=4)
    cmd = relion_command(Path("particles.star"), Path("relion/run"), p, 128, 1.5, 3, 2)
    opts = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert cmd[0] == "relion_refine"
    assert opts["--K"] == "7" and opts["--iter"] == "3" and opts["--j"] == "2"
    # RELION's GUI convention: psi_step 2X with oversampling 1 samples X at the fine level
    assert opts["--psi_step"] == "12" and opts["--oversampling"] == "1"
    assert float(opts["--offset_range"]) == pytest.approx(12.8)  # 10% of 128 px
    c = sampling_counts(p, 128, 1.5)
    assert c["work_box"] == 64 and c["R"] == 60
    # one working pixel = 2 original pixels here; coarse step twice that
    assert float(opts["--offset_step"]) == pytest.approx(4.0)
    assert opts["--strict_highres_exp"] == "6" and opts["--tau2_fudge"] == "2"
    assert {"--ctf", "--zero_mask", "--norm", "--scale"} <= set(cmd)


@needs_classifier
@pytest.mark.relion
def test_bench_speed_runs_relion(tmp_path, capsys):
    rc = main(
        [
            "bench",
            "speed",
            "--n-particles",
            "40",
            "--box",
            "32",
            "--n-classes",
            "2",
            "--iters",
            "1",
            "--relion",
            "--threads",
            "1",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rel = json.loads(captured.out)["relion"]
    assert "error" not in rel, rel
    assert rel["seconds_per_iteration"] > 0 and rel["ratio_vs_companion_cpu"] > 0


def test_bench_assign(capsys):
    """The balanced-mode solvers on a matrix whose argmax piles into a few classes."""
    assert main(["bench", "assign", "--n-particles", "3000", "--n-classes", "30", "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)["runs"]
    assert r["n"] == 3000 and r["k"] == 30 and r["cap"] == 100
    assert r["uncapped_largest"] > r["cap"]  # the attractor is there: the cap binds
    assert r["largest_class"] <= r["cap"] and r["cap_respected"]
    assert r["sinkhorn_largest_column"] <= r["cap"] * (1 + 1e-4)
    assert 0 < r["moved_fraction"] < 1 and r["score_given_up_per_particle"] > 0
    assert r["sinkhorn_s"] > 0 and r["assign_s"] > 0 and r["assign_extra_GB"] >= 0


@pytest.mark.gpu
def test_bench_assign_on_gpu(capsys):
    """Both devices solve the same matrix; the GPU's cap holds and its score is as good."""
    assert main(["bench", "assign", "--n-particles", "4000", "--n-classes", "40",
                 "--device", "both", "--json"]) == 0  # fmt: skip
    cpu, gpu = json.loads(capsys.readouterr().out)["runs"]
    assert cpu["bench_device"] == "cpu" and gpu["bench_device"] == "gpu"
    assert gpu["cap_respected"] and gpu["largest_class"] <= gpu["cap"] == cpu["cap"]
    assert gpu["score_given_up_per_particle"] <= cpu["score_given_up_per_particle"] * 1.01 + 1e-3


@pytest.mark.parametrize(
    "extra, fragment",
    [(["--n-particles", "10", "--n-classes", "20"], "N ≥ K"), (["--slack", "0.5"], "--slack 0.5")],
)
def test_bench_assign_bad_input_is_one_line(capsys, extra, fragment):
    assert main(["bench", "assign", "--n-particles", "1000", "--n-classes", "20", *extra]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_parameters_are_validated_once_per_run(tiny, tmp_path, monkeypatch, capsys):
    """companion classify and companion demo: the params model validates once (the command
    line) and check_feasible runs once (before any work), counted through pydantic's
    validator and ClassifyParams.check_feasible."""
    from param_counts import install

    counts = install(monkeypatch.setattr)
    out = tmp_path / "out"
    assert main(["classify", str(tiny / "particles.star"), "--out", str(out), *TINY]) == 0
    assert counts.as_tuple() == (1, 1)
    # --continue of the finished run: validated and checked once again, not more
    counts.validated = counts.feasible = 0
    assert main(["classify", str(tiny / "particles.star"), "--out", str(out), *TINY,
                 "--continue"]) == 0  # fmt: skip
    assert counts.as_tuple() == (1, 1)
    # a refused run: one validation, one check, no work
    counts.validated = counts.feasible = 0
    bad = ["--balance", "cap", "--max-per-class", "10"]
    assert main(["classify", str(tiny / "particles.star"), "--out", str(tmp_path / "o2"),
                 *TINY, *bad]) == 2  # fmt: skip
    assert counts.as_tuple() == (1, 1) and not (tmp_path / "o2").exists()
    counts.validated = counts.feasible = 0
    demo = ["demo", "--out", str(tmp_path / "demo"), "--n-particles", "40", "--box", "32",
            "--n-classes", "2", "--device", "cpu"]  # fmt: skip
    monkeypatch.setattr("companion.commands.demo.DEMO_SCHEDULE",
                        {"online_iters": 1, "batch_per_class": 10, "full_iters": 1})  # fmt: skip
    assert main(demo) == 0
    assert counts.as_tuple() == (1, 1)
    capsys.readouterr()
