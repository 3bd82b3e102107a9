"""companion-relion as RELION's External job: argument shapes, version detection, node files,
exit/abort files, and end-to-end runs from a simulated RELION project (subprocesses with the
exact argument shape RELION and ccpem-pipeliner use), plus Debian RELION 3.1.3 reading the
outputs and starting a new 2D run from the selected particles."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from companion.errors import InputError, ParameterError
from companion.relion.external_job import JobArgsError, parse_job_args, parse_select
from companion.relion.pipeline import (
    ABORT_NOW,
    EXIT_ABORTED,
    EXIT_FAILURE,
    EXIT_SUCCESS,
    OUTPUT_NODES,
    AbortWatcher,
    detect_version,
    format_output_nodes,
    normalise_version,
    write_exit_file,
    write_output_nodes,
)
from companion.relion.star import read_star

REPO = Path(__file__).resolve().parent.parent

PIPELINE_40 = """
# version 30001

data_pipeline_general

_rlnPipeLineJobCounter                       3


# version 30001

data_pipeline_processes

loop_
_rlnPipeLineProcessName #1
_rlnPipeLineProcessAlias #2
_rlnPipeLineProcessTypeLabel #3
_rlnPipeLineProcessStatusLabel #4
Import/job001/       None relion.import.other  Succeeded
External/job002/       None relion.external    Running


# version 30001

data_pipeline_nodes

loop_
_rlnPipeLineNodeName #1
_rlnPipeLineNodeTypeLabel #2
_rlnPipeLineNodeTypeLabelDepth #3
particles.star ParticlesData.star.relion            1

"""
PIPELINE_50 = PIPELINE_40.replace("# version 30001", "# version 50001").replace(
    "ParticlesData.star.relion", "ParticleGroupMetadata.star.relion"
)


def pipeline_31(real_data: Path) -> str:
    return (real_data / "default_pipeline.star").read_text()


# --- argument shapes --------------------------------------------------------------------


def test_relion_gui_call_shape():
    argv = (
        "--o External/job012/ --in_parts Select/job009/particles.star --n_classes 50 "
        "--anneal off --balance equal --recenter --j 8 --pipeline_control External/job012/"
    ).split()
    job = parse_job_args(argv)
    assert job.out == "External/job012/"
    assert job.in_parts == "Select/job009/particles.star"
    assert job.threads == 8
    assert job.params == {"n_classes": "50", "anneal": "off", "balance": "equal", "recenter": True}


def test_ccpem_pipeliner_call_shape():
    # inputs before --o, --in_3Dref with a capital D, no --j for one thread, kebab spellings
    argv = (
        "--in_3Dref Refine3D/job010/run_class001.mrc --in_parts p.star --in_mask m.mrc "
        "--o External/job003/ --n-classes 20 --max-per-class 100 --balance cap"
    ).split()
    job = parse_job_args(argv)
    assert job.out == "External/job003/" and job.threads is None
    assert job.inputs == {"in_3dref": "Refine3D/job010/run_class001.mrc", "in_mask": "m.mrc"}
    assert job.params == {"n_classes": "20", "max_per_class": "100", "balance": "cap"}


def test_bare_flags_and_job_options():
    argv = (
        "--o X/ --in_parts p.star --no_recenter --keep_iterations --particle_diameter "
        "--select 1,4,7 --relion_version 3.1 --seed=4"
    ).split()
    job = parse_job_args(argv)
    assert job.params == {"recenter": False, "particle_diameter": None, "seed": "4"}
    assert job.keep_iterations and job.select == "1,4,7" and job.relion_version == "3.1"
    # RELION pastes a value with spaces unquoted
    assert parse_job_args("--o X/ --select 1, 4, 7 --j 2".split()).select == "1, 4, 7"


def test_help_lists_parameters(capsys):
    from companion.relion.external_job import main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--in_parts" in text and "--n_classes" in text and "--balance" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        ("--o X/ --in_parts p.star --bogus 3", "unknown option --bogus"),
        ("--o X/ --in_parts p.star --n_classes", "--n_classes needs a value"),
        ("--o X/ stray", "unexpected argument 'stray'"),
        ("--o X/ --n_classes 3 --n-classes 4", "given twice"),
        ("--o X/ --j many", "--j"),
        ("--o X/ --recenter maybe", "--recenter"),
        ("--in_parts p.star", "--o"),
    ],
)
def test_bad_command_lines(argv, message):
    with pytest.raises(JobArgsError, match=message):
        parse_job_args(argv.split())


def test_every_parameter_of_the_model_is_an_option_in_both_spellings():
    """The parser is generated from ClassifyParams: a field added to the model is accepted
    without a change here, as --name_with_underscores and --name-with-dashes."""
    from companion.params import ClassifyParams, field_choices

    for name, info in ClassifyParams.model_fields.items():
        choices = field_choices(info)
        value = "Yes" if info.annotation is bool else choices[0] if choices else "7"
        want = True if info.annotation is bool else value
        for spelling in {name, name.replace("_", "-")}:
            job = parse_job_args(["--o", "X/", f"--{spelling}", value])
            assert job.params == {name: want}, spelling


def test_relion_booleans_and_one_line_errors():
    # RELION writes booleans as Yes/No; the value field is passed as typed
    job = parse_job_args("--o X/ --recenter No --drop_bad_images yes --keep_iterations Yes".split())
    assert job.params == {"recenter": False, "drop_bad_images": True} and job.keep_iterations
    # a label typed with its dashes: RELION puts two more in front
    assert parse_job_args("--o X/ ----n_classes 5".split()).params == {"n_classes": "5"}
    for argv, want in [
        ("--o X/ --j 0", "--j 0: the number of threads must be at least 1"),
        ("--o X/ --anneal of", "--anneal 'of': choose one of on, off — did you mean off?"),
        ("--o X/ --bogus 3", "unknown option --bogus — companion-relion --help lists"),
        ("--o X/ --recenter --no_recenter", "--no_recenter is given twice (also as --recenter)"),
        ("--o X/ --select", "--select needs a value"),
    ]:
        with pytest.raises(JobArgsError) as err:
            parse_job_args(argv.split())
        assert str(err.value) == want or str(err.value).startswith(want), str(err.value)
        assert "\n" not in str(err.value)


def test_usage_is_the_parsers_help(capsys):
    from companion.relion.external_job import build_parser, main

    assert main(["--help"]) == 0
    assert capsys.readouterr().out.strip() == build_parser().format_help().strip()


def test_parse_select():
    from fake_result import make_fake_result, set_particle_and_junk_averages

    result = set_particle_and_junk_averages(make_fake_result(40, 6, 16), junk=[])
    assert parse_select("1,4", result) == [1, 4]
    assert parse_select("2 3-5", result) == [2, 3, 4, 5]
    auto = parse_select("auto", result)
    assert auto and set(auto) <= set(range(1, 7))
    for bad in ("0", "7", "x"):
        with pytest.raises(ParameterError):
            parse_select(bad, result)


def test_auto_select_drops_empty_and_junk_classes():
    from fake_result import make_fake_result, set_particle_and_junk_averages

    result = set_particle_and_junk_averages(make_fake_result(600, 6, 16), junk=[4])
    result.class_sizes = np.array([150, 140, 130, 120, 60, 0])
    assert parse_select("auto", result) == [1, 2, 3, 4]


# --- versions and node files ------------------------------------------------------------


def test_detect_version(tmp_path, real_data):
    assert detect_version(tmp_path) == "4.0"  # no pipeline file: default
    (tmp_path / "default_pipeline.star").write_text(pipeline_31(real_data))
    assert detect_version(tmp_path) == "3.1"
    (tmp_path / "default_pipeline.star").write_text(PIPELINE_40)
    assert detect_version(tmp_path) == "4.0"
    (tmp_path / "default_pipeline.star").write_text(PIPELINE_50)
    assert detect_version(tmp_path) == "5.0"
    assert detect_version(tmp_path, override="3") == "3.1"
    for text, want in [("4", "4.0"), ("5.0.1", "5.0"), ("relion-3.1", "3.1")]:
        assert normalise_version(text) == want
    with pytest.raises(ParameterError):
        normalise_version("2.1")


NODES = [
    ("External/job012/run_it025_optimiser.star", "optimiser"),
    ("External/job012/run_it025_data.star", "particles"),
    ("External/job012/run_it025_model.star", "model"),
    ("External/job012/particles.star", "selected_particles"),
    ("External/job012/class_averages.star", "class_averages"),
]


def _squeezed(text: str) -> str:
    """STAR text with each line's runs of spaces collapsed (the writer pads columns)."""
    return "\n".join(" ".join(line.split()) for line in text.split("\n"))


def test_output_nodes_text_per_version():
    assert _squeezed(format_output_nodes(NODES, "5.0")) == (
        "\n# version 50001\n\ndata_output_nodes\n\nloop_\n_rlnPipeLineNodeName #1\n"
        "_rlnPipeLineNodeTypeLabel #2\n"
        "External/job012/run_it025_optimiser.star OptimiserData.star.relion.class2d\n"
        "External/job012/run_it025_data.star ParticleGroupMetadata.star.relion.class2d\n"
        "External/job012/particles.star ParticleGroupMetadata.star.relion\n"
        "External/job012/class_averages.star Image2DGroupMetadata.star.relion.classaverages\n\n"
    )
    v4 = _squeezed(format_output_nodes(NODES, "4.0"))
    assert "# version 30001" in v4 and "_rlnPipeLineNodeTypeLabel #2" in v4
    assert "run_it025_optimiser.star ProcessData.star.relion.optimiser.class2d\n" in v4
    assert "run_it025_data.star ParticlesData.star.relion.class2d\n" in v4
    assert "job012/particles.star ParticlesData.star.relion\n" in v4
    assert "class_averages.star ImagesData.star.relion.classaverages\n" in v4
    assert "model.star" not in v4
    v31 = _squeezed(format_output_nodes(NODES, "3.1"))
    assert "_rlnPipeLineNodeType #2" in v31 and "Label" not in v31
    assert "run_it025_data.star 3\n" in v31 and "run_it025_model.star 8\n" in v31
    assert "particles.star 3\n" in v31 and "class_averages.star 5\n" in v31
    assert "optimiser" not in v31
    assert v31.endswith("\n\n")  # RELION ends a loop at the first empty line


def test_write_output_nodes_refuses_missing_files(tmp_path):
    job = tmp_path / "External" / "job001"
    job.mkdir(parents=True)
    (job / "run_it001_data.star").write_text("x")
    with pytest.raises(InputError, match="missing"):
        write_output_nodes(
            job, [(job / "run_it001_data.star", "particles"), (job / "nope.star", "optimiser")],
            "4.0", tmp_path,
        )  # fmt: skip
    assert not (job / OUTPUT_NODES).exists()
    out = write_output_nodes(job, [(job / "run_it001_data.star", "particles")], "3.1", tmp_path)
    nodes = read_star(out)["output_nodes"]
    assert list(nodes["rlnPipeLineNodeName"]) == ["External/job001/run_it001_data.star"]


def test_exit_files_and_abort_watcher(tmp_path):
    write_exit_file(tmp_path, "failure")
    write_exit_file(tmp_path, "success")
    assert (tmp_path / EXIT_SUCCESS).exists() and not (tmp_path / EXIT_FAILURE).exists()
    watcher = AbortWatcher(tmp_path)
    assert not watcher.requested()
    (tmp_path / ABORT_NOW).touch()
    assert watcher.requested()
    watcher.clear()
    assert not (tmp_path / ABORT_NOW).exists()
    with pytest.raises(ValueError):
        write_exit_file(tmp_path, "done")


# --- end to end -------------------------------------------------------------------------

N_PARTICLES, N_CLASSES = 240, 4
CLASSIFY = {
    "n_classes": N_CLASSES, "max_resolution": 12, "online_iters": 4, "batch_per_class": 15,
    "full_iters": 1, "psi_step": 30, "device": "cpu", "anneal": "off", "seed": 1,
}  # fmt: skip
SLOW = {"online_iters": 60}  # 10-100 ms each: time to stop the job mid-run
TOTAL_SLOW = 61


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A RELION project made by the simulator (particles.star + stacks at the top)."""
    from companion.simulate import simulate

    proj = tmp_path_factory.mktemp("relion_project")
    simulate(proj, n=N_PARTICLES, box=48, psize=3.0, seed=2, formats=("star",), progress=False)
    assert (proj / "particles.star").is_file()
    return proj


@pytest.fixture
def project(simulated, tmp_path):
    """A fresh copy of the simulated project (jobs write into it)."""
    proj = tmp_path / "project"
    shutil.copytree(simulated, proj, symlinks=True)
    return proj


def job_command(job: str, *extra: str, slow: bool = False) -> list[str]:
    # RELION's exact shape: --o with a trailing slash, inputs, params, --j, --pipeline_control
    params = {**CLASSIFY, **(SLOW if slow else {})}
    return [
        sys.executable, "-m", "companion.relion.external_job", "--o", f"External/{job}/",
        "--in_parts", "particles.star",
        *[t for k, v in params.items() for t in (f"--{k}", str(v))],
        *extra, "--j", "1", "--pipeline_control", f"External/{job}/",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_job(
    proj: Path, job: str, *extra: str, slow: bool = False, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run like RELION: from the project dir, stdout/stderr appended to run.out/run.err."""
    job_dir = proj / "External" / job
    job_dir.mkdir(parents=True, exist_ok=True)
    with open(job_dir / "run.out", "a") as out, open(job_dir / "run.err", "a") as err:
        r = subprocess.run(
            job_command(job, *extra, slow=slow), cwd=proj, stdout=out, stderr=err, env=_env(),
            timeout=timeout,
        )  # fmt: skip
    return r


def listed_nodes(job_dir: Path) -> list[tuple[str, str]]:
    nodes = read_star(job_dir / OUTPUT_NODES)["output_nodes"]
    label = [c for c in nodes.columns if c.startswith("rlnPipeLineNodeType")][0]
    return list(zip(nodes["rlnPipeLineNodeName"], nodes[label].astype(str), strict=True))


def exit_files(job_dir: Path) -> set[str]:
    return {p.name for p in job_dir.glob("RELION_JOB_*")}


def test_end_to_end_versions_selection_and_continue(project, real_data):
    """RELION 4.0 project: a full run with --select auto; then the same command in a 3.1 and
    a 5.0 project directory (RELION's 'continue': resumes from the finished checkpoint)."""
    job_dir = project / "External" / "job012"
    (project / "default_pipeline.star").write_text(PIPELINE_40)
    r = run_job(project, "job012", "--select", "auto", "--keep_iterations")
    err = (job_dir / "run.err").read_text()
    assert r.returncode == 0, err[-3000:]
    assert exit_files(job_dir) == {EXIT_SUCCESS}
    out = (job_dir / "run.out").read_text()
    assert "iteration 5/5" in out  # per-iteration progress
    assert "class occupancy" in out and "RELION 4.0" in out and "threads: 1" in out
    nodes = listed_nodes(job_dir)
    assert ("External/job012/run_it005_data.star", "ParticlesData.star.relion.class2d") in nodes
    assert (
        "External/job012/run_it005_optimiser.star",
        "ProcessData.star.relion.optimiser.class2d",
    ) in nodes
    assert ("External/job012/particles.star", "ParticlesData.star.relion") in nodes
    assert ("External/job012/class_averages.star", "ImagesData.star.relion.classaverages") in nodes
    for name, _ in nodes:
        assert (project / name).is_file(), name
    assert (job_dir / "class_averages.png").is_file()
    for it in range(1, 6):  # --keep_iterations
        assert (job_dir / f"run_it{it:03d}_optimiser.star").is_file()
    opt = read_star(job_dir / "run_it005_optimiser.star")["optimiser_general"]
    assert opt["rlnModelStarFile"] == "External/job012/run_it005_model.star"
    data = read_star(job_dir / "run_it005_data.star")["particles"]
    assert len(data) == N_PARTICLES
    assert set(data["rlnClassNumber"]) <= set(range(1, N_CLASSES + 1))
    selected = read_star(job_dir / "particles.star")["particles"]
    chosen = set(read_star(job_dir / "class_averages.star")[""]["rlnClassNumber"])
    assert set(selected["rlnClassNumber"]) == chosen and 0 < len(selected) <= N_PARTICLES

    for version, pipeline, want in [
        ("3.1", pipeline_31(real_data), ("External/job012/run_it005_model.star", "8")),
        ("5.0", PIPELINE_50, ("External/job012/run_it005_optimiser.star",
                              "OptimiserData.star.relion.class2d")),
    ]:  # fmt: skip
        for name in exit_files(job_dir):  # RELION deletes them before continuing
            (job_dir / name).unlink()
        (project / "default_pipeline.star").write_text(pipeline)
        r = run_job(project, "job012", "--select", "auto", "--keep_iterations")
        assert r.returncode == 0, (job_dir / "run.err").read_text()[-3000:]
        assert exit_files(job_dir) == {EXIT_SUCCESS}
        assert want in listed_nodes(job_dir), version
        assert f"RELION {version}" in (job_dir / "run.out").read_text()
        for name, _ in listed_nodes(job_dir):
            assert (project / name).is_file(), name
    assert "continuing" in (job_dir / "run.out").read_text()


def _wait_for(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def _start(proj: Path, job: str, *extra: str, slow: bool = True) -> subprocess.Popen:
    job_dir = proj / "External" / job
    job_dir.mkdir(parents=True, exist_ok=True)
    with open(job_dir / "run.out", "a") as out, open(job_dir / "run.err", "a") as err:
        return subprocess.Popen(
            job_command(job, *extra, slow=slow), cwd=proj, stdout=out, stderr=err, env=_env()
        )  # the child keeps its own copies of the two descriptors


def _checkpointed(job_dir: Path) -> int:
    """The last iteration saved in the job's checkpoint."""
    with np.load(job_dir / "checkpoint" / "state.npz") as z:
        return int(json.loads(z["__header__"].tobytes())["scalars"]["iteration"])


def test_signal_during_a_log_line_is_not_swallowed():
    """logging's handlers catch ``Exception`` from a write; the job's signal exception must
    get through, or a SIGTERM that lands while a line is written is lost."""
    import logging

    from companion.relion.external_job import Terminated, _on_signal

    class Stream:
        def write(self, text: str) -> None:
            _on_signal(signal.SIGTERM, None)  # the signal arrives mid-write

        def flush(self) -> None:
            pass

    logger = logging.getLogger("companion.test.signal_in_log")
    handler = logging.StreamHandler(Stream())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with pytest.raises(Terminated, match="SIGTERM"):
            logger.warning("iteration 3/61")
    finally:
        logger.removeHandler(handler)


def _iterations(text: str) -> list[int]:
    """Finished iterations logged in ``text`` (not the within-iteration progress lines)."""
    return [int(m) for m in re.findall(rf"iteration (\d+)/{TOTAL_SLOW}  ", text)]


@pytest.fixture
def reaper():
    """Processes a test started; any still running at teardown (a failed test) are killed."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sigterm_abort_and_continue(project, reaper):
    """SIGTERM mid-run -> ABORTED; continue (resumes after the last finished iteration), then
    the GUI's abort file -> ABORTED and the file removed; continue again -> SUCCESS."""
    (project / "default_pipeline.star").write_text(PIPELINE_40)
    job_dir = project / "External" / "job020"
    out = job_dir / "run.out"
    proc = _start(project, "job020")
    reaper.append(proc)
    assert _wait_for(lambda: "iteration 3/" in out.read_text(), 60), job_dir / "run.err"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) != 0
    assert exit_files(job_dir) == {EXIT_ABORTED}
    assert not (job_dir / OUTPUT_NODES).exists()
    assert "SIGTERM" in (job_dir / "run.err").read_text().strip().splitlines()[-1]
    last1 = max(_iterations(out.read_text()))
    assert 3 <= last1 < TOTAL_SLOW
    # the signal may land between an iteration's checkpoint and its log line
    saved1 = _checkpointed(job_dir)
    assert saved1 in (last1, last1 + 1)

    (job_dir / EXIT_ABORTED).unlink()  # RELION's continue deletes the exit file
    mark = len(out.read_text())
    proc = _start(project, "job020")
    reaper.append(proc)
    assert _wait_for(lambda: _iterations(out.read_text()[mark:]), 60)
    (job_dir / ABORT_NOW).touch()
    assert proc.wait(60) != 0
    assert exit_files(job_dir) == {EXIT_ABORTED}
    assert not (job_dir / ABORT_NOW).exists()
    assert "aborted" in (job_dir / "run.err").read_text().strip().splitlines()[-1]
    second = out.read_text()[mark:]
    assert "continuing" in second
    assert min(_iterations(second)) == saved1 + 1  # right after the checkpoint
    last2 = max(_iterations(second))
    assert last2 < TOTAL_SLOW
    assert _checkpointed(job_dir) == last2  # the abort file stops between iterations

    (job_dir / EXIT_ABORTED).unlink()
    mark = len(out.read_text())
    r = run_job(project, "job020", slow=True)
    assert r.returncode == 0, (job_dir / "run.err").read_text()[-3000:]
    assert exit_files(job_dir) == {EXIT_SUCCESS}
    third = _iterations(out.read_text()[mark:])
    assert third[0] == last2 + 1 and third[-1] == TOTAL_SLOW
    assert (job_dir / f"run_it{TOTAL_SLOW:03d}_optimiser.star").is_file()
    for name, _ in listed_nodes(job_dir):
        assert (project / name).is_file(), name


@pytest.mark.parametrize(
    "extra, reason",
    [
        (["--in_parts", "Extract/job999/particles.star"], "not found"),
        (["--in_parts", "particles.star", "--n_classes", "0"], "--n-classes"),
        (["--in_parts", "particles.star", "--frobnicate", "1"], "unknown option --frobnicate"),
    ],
)
def test_failure_writes_exit_file_and_reason(project, extra, reason):
    job_dir = project / "External" / "job030"
    job_dir.mkdir(parents=True)
    (job_dir / OUTPUT_NODES).write_text("stale")  # from an earlier run: must not survive
    cmd = [sys.executable, "-m", "companion.relion.external_job", "--o", "External/job030/", *extra]
    r = subprocess.run(cmd, cwd=project, capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode != 0
    assert exit_files(job_dir) == {EXIT_FAILURE}
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("companion-relion: error:") and reason in last, r.stderr
    assert not (job_dir / OUTPUT_NODES).exists()


@pytest.mark.relion
def test_relion_reads_outputs_and_refines_selected_particles(project):
    """Debian RELION 3.1.3: star_handler reads every listed STAR file; relion_refine starts a
    new 2D run (1 iteration, 2 classes, 1 thread) from the selected particles.star."""
    (project / "default_pipeline.star").write_text(PIPELINE_40)
    job_dir = project / "External" / "job040"
    r = run_job(project, "job040", "--select", "1,2,3")
    assert r.returncode == 0, (job_dir / "run.err").read_text()[-3000:]
    for name, _ in listed_nodes(job_dir):
        if name.endswith(".star"):
            s = subprocess.run(
                ["relion_star_handler", "--i", name, "--o", f"copy_{Path(name).name}"],
                cwd=project, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert s.returncode == 0 and "ERROR" not in s.stderr, f"{name}: {s.stderr[-2000:]}"
    (project / "Class2D" / "job041").mkdir(parents=True)
    cmd = (
        "relion_refine --o Class2D/job041/run --i External/job040/particles.star --iter 1 --K 2 "
        "--tau2_fudge 2 --particle_diameter 120 --ctf --zero_mask --flatten_solvent "
        "--oversampling 1 --psi_step 30 --offset_range 3 --offset_step 2 --j 1 "
        "--dont_combine_weights_via_disc --pool 3"
    ).split()
    s = subprocess.run(cmd, cwd=project, capture_output=True, text=True, timeout=120)
    assert s.returncode == 0, s.stdout[-1500:] + s.stderr[-3000:]
    data = read_star(project / "Class2D" / "job041" / "run_it001_data.star")["particles"]
    assert len(data) == len(read_star(job_dir / "particles.star")["particles"])
    assert set(data["rlnClassNumber"]) <= {1, 2}


def test_refused_continue_leaves_a_finished_job_as_it_was(project):
    """RELION 'Continue' with changed parameters: refused with one line, exit status 2, and
    the finished job keeps RELION_JOB_EXIT_SUCCESS, its node file and every output."""
    job_dir = project / "External" / "job040"
    r = run_job(project, "job040")
    assert r.returncode == 0, (job_dir / "run.err").read_text()[-3000:]

    def files():  # content and modification time of everything but the logs
        return {
            p: (p.read_bytes(), p.stat().st_mtime_ns)
            for p in job_dir.rglob("*")
            if p.is_file() and "run." not in p.name
        }

    before = files()
    assert job_dir / OUTPUT_NODES in before and job_dir / EXIT_SUCCESS in before
    for extra, want in [
        (["--tau2_fudge", "3"], "--tau2-fudge"),  # changed
        (["--tau2_fudge", "-1"], "--tau2-fudge"),  # invalid
        (["--in_parts", "gone.star"], "gone.star: input particles file not found"),
    ]:
        cmd = job_command("job040", *extra)
        if "--in_parts" in extra:  # replaces the usual input
            i = cmd.index("--in_parts")
            del cmd[i : i + 2]
        r = subprocess.run(cmd, cwd=project, capture_output=True, text=True, env=_env(), timeout=60)
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
        assert len(lines) == 1 and want in lines[0], r.stderr
        assert "left as it was" in lines[0]
        assert files() == before
        assert exit_files(job_dir) == {EXIT_SUCCESS}
    # RELION's GUI deletes the exit files before a continue: the refusal puts SUCCESS back
    (job_dir / EXIT_SUCCESS).unlink()
    r = subprocess.run(job_command("job040", "--tau2_fudge", "3"), cwd=project,
                       capture_output=True, text=True, env=_env(), timeout=60)  # fmt: skip
    assert r.returncode == 2 and "cannot continue with changed parameters" in r.stderr
    assert exit_files(job_dir) == {EXIT_SUCCESS}
    after = files()
    assert {p: v for p, v in after.items() if p.name != EXIT_SUCCESS} == {
        p: v for p, v in before.items() if p.name != EXIT_SUCCESS
    }


def test_more_threads_than_cores_warns(project, monkeypatch):
    """--j beyond the cores available to the job: a warning in run.err naming the count."""
    import companion.relion.external_job as rj

    monkeypatch.setattr("companion.threads.available_cores", lambda: 2)
    records = []
    monkeypatch.setattr(rj.log, "warning", lambda msg, *a: records.append(msg % a))
    rj.warn_threads(8)
    assert len(records) == 1 and "--j 8" in records[0] and "only 2 cores" in records[0]
    records.clear()
    rj.warn_threads(2)
    rj.warn_threads(None)
    assert records == []


def test_unknown_option_suggests_the_closest():
    with pytest.raises(JobArgsError, match="did you mean --n_classes"):
        parse_job_args(["--o", "X/", "--n_clases", "3"])


COUNTED_MAIN = (
    "import json, sys; sys.path.insert(0, sys.argv.pop(1)); import param_counts; "
    "counts = param_counts.install(setattr); from companion.relion.external_job import main; "
    "out = sys.argv.pop(1); rc = main(sys.argv[1:]); "
    "open(out, 'w').write(json.dumps([counts.validated, counts.feasible, rc]))"
)


def test_parameters_are_validated_once_per_run(project, tmp_path):
    """A run, RELION's Continue of it and a refused Continue: the params model validates
    once and check_feasible runs at most once per call (counted through pydantic's validator
    and ClassifyParams.check_feasible in the job's own process)."""
    job_dir = project / "External" / "job050"
    counts = tmp_path / "counts.json"

    def counted(*extra: str) -> list[int]:
        cmd = job_command("job050", *extra)
        argv = [sys.executable, "-c", COUNTED_MAIN, str(REPO / "tests"), str(counts), *cmd[3:]]
        r = subprocess.run(argv, cwd=project, capture_output=True, text=True, env=_env(),
                           timeout=120)  # fmt: skip
        assert counts.is_file(), r.stderr[-3000:]
        return json.loads(counts.read_text())

    assert counted() == [1, 1, 0]
    for f in job_dir.glob("RELION_JOB_EXIT_*"):  # RELION's Continue: the same command again
        f.unlink()
    assert counted() == [1, 1, 0]
    assert exit_files(job_dir) == {EXIT_SUCCESS}
    assert counted("--tau2_fudge", "3") == [1, 0, 2]  # refused before any check or work


def test_bad_class_list_fails_before_any_work(project):
    """--select naming a class that cannot exist: refused before classification starts (no
    checkpoint, no run_it files), with one line naming the class."""
    job_dir = project / "External" / "job060"
    r = run_job(project, "job060", "--select", "1,9")
    assert r.returncode == 2
    last = (job_dir / "run.err").read_text().strip().splitlines()[-1]
    assert "--select '1,9': class 9 does not exist with --n-classes 4" in last, last
    assert exit_files(job_dir) == {EXIT_FAILURE}
    assert not (job_dir / "checkpoint").exists() and not list(job_dir.glob("run_it*"))
