"""The command line says what it does: one name per option, one-line errors, nothing silently
ignored or overwritten (in-process calls of the entry point; no classification runs)."""

from __future__ import annotations

import json

import pytest

from companion.cli import build_parser, main
from companion.threads import available_cores, cgroup_cpu_limit, limit_threads


def _run(argv, capsys):
    """(exit status, stderr lines) of ``companion ARGV``, parse errors included."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.strip()]


@pytest.mark.parametrize(
    "argv, want",
    [
        (["classify", "p.star", "--out", "o", "--n-clases", "3"], "did you mean --n-classes?"),
        (["demo", "--n-clases", "3"], "did you mean --n-classes?"),
        (["bench", "speed", "--n-particle", "3"], "did you mean --n-particles?"),
        (["bench", "quality", "--online-iter", "1"], "did you mean --online-iters?"),
        (["simulate", "d", "--n-view", "3"], "did you mean --n-views?"),
        (["clasify"], "did you mean classify?"),
    ],
)
def test_unknown_option_is_one_line_with_a_suggestion(argv, want, capsys):
    rc, lines = _run(argv, capsys)
    assert rc == 2
    assert len(lines) == 1 and want in lines[0], lines
    assert "usage:" not in lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["classify", "p.star", "--out", "o", "--n-class", "3"],  # abbreviation of --n-classes
        ["classify", "p.star", "--out", "o", "--online", "1"],
        ["classify", "p.star", "--out", "o", "--full", "1"],
        ["bench", "quality", "--n-part", "100"],
    ],
)
def test_abbreviations_are_refused(argv, capsys):
    rc, lines = _run(argv, capsys)
    assert rc == 2 and len(lines) == 1 and "unknown option" in lines[0], lines


@pytest.mark.parametrize(
    "argv, want",
    [
        (["classify", "p.star", "--out", "o", "--anneal", "of"], "choose one of on, off"),
        (["demo", "--balance", "equl"], "choose one of off, equal, cap"),
        (["bench", "speed", "--device", "tpu"], "choose one of cpu, gpu, both"),
    ],
)
def test_wrong_choice_is_one_line_with_the_choices(argv, want, capsys):
    rc, lines = _run(argv, capsys)
    assert rc == 2 and len(lines) == 1 and want in lines[0], lines


@pytest.mark.parametrize(
    "argv, dest, value",
    [
        (["demo", "--classes", "5"], "n_classes", 5),
        (["demo", "--n", "300"], "n_particles", 300),
        (["bench", "speed", "--classes", "5"], "n_classes", 5),
        (["bench", "quality", "--classes", "5", "--n", "200"], "n_classes", 5),
        (["bench", "modes", "--classes", "4", "8"], "n_classes", [4, 8]),
        (["bench", "assign", "--classes", "7", "--n", "900"], "n_particles", 900),
        (["simulate", "d", "-n", "50"], "n_particles", 50),
    ],
)
def test_old_spellings_still_work_with_a_warning(argv, dest, value, capsys):
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    err = capsys.readouterr().err
    assert "deprecated, use --n-" in err


@pytest.mark.parametrize(
    "argv, dest, value",
    [
        (["demo", "--n-classes", "5", "--n-particles", "300"], "n_classes", 5),
        (["bench", "quality", "--n-classes", "5"], "n_classes", 5),
        (["bench", "speed", "--n-particles", "70"], "n_particles", 70),
        (["simulate", "d", "--n-particles", "50"], "n_particles", 50),
        (["classify", "p.star", "--out", "o", "--n-classes", "9"], "n_classes", 9),
    ],
)
def test_one_name_everywhere(argv, dest, value, capsys):
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "quality", "--n-classes", "8", "--classes", "4"],  # was: --n-classes won
        ["demo", "--classes", "4", "--n-classes", "8"],
        ["simulate", "d", "-n", "10", "--n-particles", "20"],
    ],
)
def test_old_and_new_spelling_together_is_an_error(argv, capsys):
    rc, lines = _run(argv, capsys)
    assert rc == 2
    errors = [ln for ln in lines if "error" in ln]
    assert len(errors) == 1 and "are the same option: give it once" in errors[0], lines


def test_max_per_class_without_balance_cap_is_an_error(tmp_path, capsys):
    out = tmp_path / "out"
    rc, lines = _run(["classify", "p.star", "--out", str(out), "--max-per-class", "100"], capsys)
    assert rc == 2 and len(lines) == 1
    assert "--max-per-class 100 is only used with --balance cap" in lines[0]
    assert not out.exists()
    rc, lines = _run(["demo", "--out", str(out), "--max-per-class", "100"], capsys)
    assert rc == 2 and "--balance cap" in lines[0] and not out.exists()


def test_finished_out_is_refused_unless_overwrite_or_continue(tmp_path, capsys):
    out = tmp_path / "c2d"
    out.mkdir()
    (out / "summary.json").write_text('{"old": true}')
    (out / "run_it003_data.star").write_text("old")
    rc, lines = _run(["classify", "missing.star", "--out", str(out)], capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert "holds a finished run" in lines[0] and "--overwrite" in lines[0]
    assert (out / "summary.json").read_text() == '{"old": true}'
    assert (out / "run_it003_data.star").read_text() == "old"
    # with --overwrite the check passes: the run goes on to read its input
    rc, lines = _run(["classify", "missing.star", "--out", str(out), "--overwrite"], capsys)
    assert rc == 2 and "missing.star" in lines[-1] and "finished run" not in lines[-1]
    rc, lines = _run(["classify", "p.star", "--out", str(out), "--overwrite", "--continue"], capsys)
    assert rc == 2 and "contradict" in lines[0]


def test_demo_refuses_a_finished_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "classes").mkdir(parents=True)
    (out / "classes" / "summary.json").write_text("{}")
    rc, lines = _run(["demo", "--out", str(out), "--device", "cpu"], capsys)
    assert rc == 2 and len(lines) == 1 and "--overwrite" in lines[0]
    assert not (out / "data").exists()


def test_stopped_run_needs_continue_or_overwrite(tmp_path, capsys):
    out = tmp_path / "c2d"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.npz").write_bytes(b"x")
    rc, lines = _run(["classify", "p.star", "--out", str(out)], capsys)
    assert rc == 2 and "--continue" in lines[0] and "stopped run" in lines[0]
    assert (out / "checkpoint" / "state.npz").read_bytes() == b"x"


@pytest.mark.parametrize("make", [False, True])
def test_continue_without_a_checkpoint_is_refused(tmp_path, capsys, make):
    out = tmp_path / "empty"
    if make:
        out.mkdir()
    rc, lines = _run(["classify", "p.star", "--out", str(out), "--continue"], capsys)
    assert rc == 2 and len(lines) == 1
    assert "found no checkpoint to continue from" in lines[0]
    assert out.exists() == make


def test_threads_option(capsys):
    args = build_parser().parse_args(["classify", "p.star", "--out", "o", "--threads", "1"])
    assert args.threads == 1
    rc, lines = _run(["classify", "p.star", "--out", "o", "--threads", "0"], capsys)
    assert rc == 2 and "--threads" in lines[0] and "at least 1" in lines[0]
    assert build_parser().parse_args(["classify", "p.star", "--out", "o"]).threads is None


def test_available_cores_honours_affinity_and_cgroup(tmp_path, monkeypatch):
    v2 = tmp_path / "cpu.max"
    v2.write_text("150000 100000\n")
    assert cgroup_cpu_limit(v2) == 1.5
    v2.write_text("max 100000\n")
    assert cgroup_cpu_limit(v2, (tmp_path / "q", tmp_path / "p")) is None
    (tmp_path / "q").write_text("200000")
    (tmp_path / "p").write_text("100000")
    assert cgroup_cpu_limit(tmp_path / "none", (tmp_path / "q", tmp_path / "p")) == 2.0
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr("companion.threads.cgroup_cpu_limit", lambda: 1.5)
    assert available_cores() == 2  # quota 1.5 cores rounds up
    monkeypatch.setattr("companion.threads.cgroup_cpu_limit", lambda: None)
    assert available_cores() == 4


def test_limit_threads_caps_blas_and_fft_pools():
    import numpy as np  # noqa: F401  (loads the BLAS pool)
    import scipy.fft
    from threadpoolctl import threadpool_info

    with limit_threads(1) as n:
        assert n == 1
        assert scipy.fft.get_workers() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    with limit_threads(None) as n:
        assert n == available_cores()


def test_simulate_max_shift_is_a_fraction_of_the_box(tmp_path, capsys):
    rc, lines = _run(["simulate", str(tmp_path / "s"), "--max-shift", "3"], capsys)
    assert rc == 2 and len(lines) == 1
    assert "fraction of the box" in lines[0] and "0.023" in lines[0]  # 3 px of 128
    assert not (tmp_path / "s").exists()
    out = tmp_path / "s2"
    argv = ["simulate", str(out), "--n-particles", "30", "--box", "32", "--max-shift", "0.05"]
    rc, _ = _run([*argv, "--quiet", "--json"], capsys)
    assert rc == 0
    info = json.loads((out / "simulation.json").read_text())
    assert info["max_shift"] == pytest.approx(0.05 * 32)


@pytest.mark.parametrize("bench", ["speed", "quality", "modes", "select", "scale"])
def test_bench_refuses_a_non_empty_out_unless_overwrite(bench, tmp_path, capsys, monkeypatch):
    """bench * --out: an existing non-empty directory is refused in one line before any work
    (nothing in it touched); --overwrite writes into it."""
    import companion.commands.bench as cmd

    ran = []
    monkeypatch.setattr(cmd, f"_{bench}", lambda args: ran.append(args.out) or 0)
    out = tmp_path / "b"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, lines = _run(["bench", bench, "--out", str(out)], capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert f"--out {out}: is not empty" in lines[0] and "--overwrite" in lines[0]
    assert ran == [] and [p.name for p in out.iterdir()] == ["notes.txt"]
    assert _run(["bench", bench, "--out", str(tmp_path / "new")], capsys)[0] == 0
    assert _run(["bench", bench, "--out", str(out), "--overwrite"], capsys)[0] == 0
    assert ran == [str(tmp_path / "new"), str(out)]


def test_bench_scale_resumes_its_own_out_and_overwrite_starts_again(tmp_path, capsys, monkeypatch):
    import companion.bench.scale as scale

    seen = []

    def fake_run(out, *args, **kwargs):
        seen.append(sorted(p.name for p in out.iterdir()))
        return {}

    monkeypatch.setattr(scale, "run_scale_benchmark", fake_run)
    monkeypatch.setattr(scale, "format_scale", lambda rep: "")
    out = tmp_path / "bs"
    (out / "runs" / "n10_k2_x").mkdir(parents=True)
    (out / scale.POINTS_FILE).write_text("{}")
    (out / "base_40_32").mkdir()
    args = ["bench", "scale", "--n-particles", "40", "--n-classes", "2", "--out", str(out)]
    assert _run(args, capsys)[0] == 0  # rerun: resumes, nothing removed
    assert seen[-1] == ["base_40_32", "runs", scale.POINTS_FILE]
    assert _run([*args, "--overwrite"], capsys)[0] == 0  # finished points and runs removed
    assert seen[-1] == ["base_40_32"]
