"""The CryoSPARC External job, driven by the real cryosparc-tools against a local stand-in.

The stand-in (tests/cs_standin) serves the CryoSPARC v5 API subset the workflow calls. End
to end runs use the real classifier on a small particle set; failure paths replace the
classifier with a quick fake (they test the job's lifecycle, not classification).
"""

from __future__ import annotations

import json
from datetime import UTC

import numpy as np
import pytest
from cryosparc.dataset import Dataset
from cs_standin import SLOT_FIELDS, StandIn
from cs_standin.fixtures import make_particles

import companion.cryosparc.client as client
import companion.cryosparc.external as ext
import companion.cryosparc.joblog as joblog
from companion.classify.result import ClassResult
from companion.cli import main as cli_main
from companion.cryosparc.conventions import ALIGNMENTS2D_FIELDS
from companion.errors import Aborted

EMAIL, PASSWORD = "ali@example.org", "s3cret"
N, BOX, STACKS, K = 60, 32, 3, 3
FAST = [
    "--n-classes",
    str(K),
    "--online-iters",
    "3",
    "--full-iters",
    "1",
    "--batch-per-class",
    "10",
    "--max-resolution",
    "12",
    "--psi-step",
    "15",
    "--device",
    "cpu",
    "--seed",
    "1",
]


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """A running stand-in with user, project P1, workspaces W1/W2, source job J1 (particles)."""
    s = StandIn(tmp_path / "server")
    s.state.add_user(EMAIL, PASSWORD)
    s.project_dir = s.state.add_project("P1")
    s.state.add_workspace("P1", "W1")
    s.state.add_workspace("P1", "W2")
    s.dset, s.truth = make_particles(s.project_dir, n=N, box=BOX, n_stacks=STACKS)
    s.src = s.state.add_source_job("P1", "W1", s.dset)
    s.start()
    for var in ("CRYOSPARC_BASE_URL", "CRYOSPARC_MASTER_HOSTNAME", "CRYOSPARC_BASE_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CRYOSPARC_EMAIL", EMAIL)
    monkeypatch.setenv("CRYOSPARC_PASSWORD", PASSWORD)
    monkeypatch.setattr(joblog, "MARK_FAILED_DELAYS", (0.2, 0.4, 0.8))
    yield s
    s.stop()


@pytest.fixture
def spy(monkeypatch):
    """The real classifier, recording (particles, result) of each run."""
    runs: list[tuple] = []
    real = ext.classify

    def wrapper(particles, params, out_dir, callbacks):
        out = real(particles, params, out_dir, callbacks)
        runs.append((particles, out[0]))
        return out

    monkeypatch.setattr(ext, "classify", wrapper)
    return runs


def fake_result(n: int, k: int, box: int) -> ClassResult:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % k
    f32 = np.float32
    s = box // 2 + 1
    return ClassResult(
        class_id=labels.astype(np.int32),
        psi_deg=rng.uniform(0, 360, n).astype(f32),
        shift_px=rng.normal(size=(n, 2)).astype(f32),
        max_prob=np.ones(n, f32),
        class_prob=np.ones(n, f32),
        loglik=np.zeros(n, f32),
        n_significant=np.ones(n, np.int32),
        norm_correction=np.ones(n, f32),
        half_set=(np.arange(n) % 2).astype(np.uint8),
        class_ess=np.ones(n, f32),
        averages=rng.normal(size=(k, box, box)).astype(f32),
        class_sizes=np.bincount(labels, minlength=k),
        class_distribution=np.full(k, 1 / k, f32),
        resolution_A=np.full(k, 10.0, f32),
        accuracy_rot_deg=np.ones(k, f32),
        accuracy_trans_A=np.ones(k, f32),
        prior_offset_px=np.zeros((k, 2), f32),
        shell_resolution_A=np.ones(s, f32),
        frc=np.zeros((k, s), f32),
        ssnr=np.zeros((k, s), f32),
        sigma2_ref=np.zeros((k, s), f32),
        tau2=np.zeros((k, s), f32),
        sigma2_noise=np.ones((1, s), f32),
        optics_groups=np.ones(1, np.int32),
        iteration=3,
        n_iterations=3,
        work_box=box,
        work_psize=4.0,
        current_resolution_A=12.0,
        loglik_total=0.0,
        avg_pmax=1.0,
        sigma_offsets_A=1.0,
        cap=None,
        params={},
        device="cpu",
    )


@pytest.fixture
def fake(monkeypatch):
    """A quick stand-in classifier: 3 iterations through the callbacks, then a fixed result."""
    state = {"before_result": None}

    def fake_classify(particles, params, out_dir, callbacks):
        for it in (1, 2, 3):
            callbacks.on_iteration(
                {
                    "iteration": it,
                    "n_iterations": 3,
                    "resolution_A": 12.0,
                    "class_sizes": [N // K] * K,
                }
            )
        if state["before_result"] is not None:
            state["before_result"]()
        return fake_result(len(particles), params.n_classes, particles.box), {}, {}

    monkeypatch.setattr(ext, "classify", fake_classify)
    return state


def run_cli(standin, *extra: str) -> int:
    return cli_main(
        [
            "cryosparc",
            "classify",
            "--url",
            standin.url,
            "--project",
            "P1",
            "--job",
            standin.src,
            *FAST,
            *extra,
        ]
    )


def new_jobs(standin) -> list:
    return [j for (p, u), j in standin.state.jobs.items() if u != standin.src]


def saved_outputs(standin, job) -> list[str]:
    return [name for (p, j, name) in standin.state.datasets if j == job.uid]


def one_line_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1, err
    return err[0]


def connect_tools(standin):
    from cryosparc.tools import CryoSPARC

    return CryoSPARC(standin.url, host=None, base_port=None, email=EMAIL, password=PASSWORD)


# ------------------------------------------------------------------------ end to end


def test_end_to_end_through_the_api(standin, spy, capsys):
    rc = run_cli(standin, "--select", "auto", "--json", "--title", "balanced 2D")
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    (job,) = new_jobs(standin)
    assert job.status == "completed" and job.title == "balanced 2D"
    assert report["job_uid"] == job.uid and report["n_particles"] == N
    assert job.workspace_uids == ["W1"]  # the source job's workspace
    # every stack downloaded exactly once; no image read from the server's disk directly
    assert standin.count("projects.download_file") == STACKS
    particles, result = spy[0]
    assert particles.stack_paths[0].name == "particles.mrcs"  # the local copy

    cs = connect_tools(standin)
    out_job = cs.find_project("P1").find_job(job.uid)
    out = out_job.load_output("particles", slots="all")
    assert len(out) == N
    for name, dtype, shape, _ in ALIGNMENTS2D_FIELDS:
        assert out[name].dtype == np.dtype(dtype) and out[name].shape[1:] == shape, name
    for suffix, dtype in SLOT_FIELDS["alignments2D"]:  # what the server declares
        want = np.dtype(dtype)
        col = out[f"alignments2D/{suffix}"]
        assert (col.dtype, col.shape[1:]) == (want.base, want.shape)
    # passthrough: every source slot joined back by uid, values unchanged
    src = standin.dset
    pos = {u: i for i, u in enumerate(src["uid"])}
    rows = np.array([pos[u] for u in out["uid"]])
    for name in ("blob/path", "blob/idx", "ctf/df1_A", "location/center_x_frac"):
        assert np.array_equal(np.asarray(out[name]), np.asarray(src[name])[rows]), name
    # labels and poses are the classifier's, row for row (the input order is the source's)
    assert np.array_equal(out["uid"], src["uid"])
    assert np.array_equal(out["alignments2D/class"], result.class_id.astype(np.uint32))
    assert np.allclose(
        out["alignments2D/pose"], np.mod(np.radians(result.psi_deg), 2 * np.pi), atol=1e-5
    )
    assert np.allclose(out["alignments2D/psize_A"], 4.0)

    # class averages: template rows k = image k of J<n>/class_averages.mrc = the result's
    tmpl = out_job.load_output("class_averages", slots="all")
    assert np.array_equal(tmpl["blob/idx"], np.arange(K))
    assert set(tmpl["blob/path"]) == {f"{job.uid}/class_averages.mrc"}
    _, data = cs.find_project("P1").download_mrc(f"{job.uid}/class_averages.mrc")
    assert data.shape == (K, BOX, BOX)
    assert np.allclose(data, result.averages, atol=1e-5)

    # --select auto: the two outputs split the particles by the selected classes
    sel = out_job.load_output("particles_selected", slots="all")
    rej = out_job.load_output("particles_rejected", slots="all")
    chosen = set(report["selected_classes"])
    assert chosen and len(sel) + len(rej) == N
    assert set(sel["alignments2D/class"]) <= chosen
    assert not set(sel["uid"]) & set(rej["uid"])
    # rejected members of selected classes: the per-particle stage's outliers, logged
    n_out = int(np.isin(np.asarray(rej["alignments2D/class"]), list(chosen)).sum())
    assert n_out <= 0.2 * len(sel)
    assert "blob/path" in sel.fields()  # passthrough too

    # event log: parameters, ONE iteration line updated in place, two image logs
    events = standin.state.events[("P1", job.uid)]
    texts = [e.text for e in events if e.type == "text"]
    assert any(t.startswith("Parameters:") and "n_classes" in t for t in texts)
    it_lines = [t for t in texts if t.startswith("Iteration")]
    assert len(it_lines) == 1 and it_lines[0].startswith(f"Iteration {result.iteration} of")
    assert any(t.startswith("Selected") for t in texts)
    assert (n_out > 0) == any(f"; {n_out} outliers of these classes left out" in t for t in texts)
    assert standin.count("jobs.update_event_log") >= result.iteration - 1
    images = [e for e in events if e.type == "image"]
    assert len(images) == 2
    assert all(
        a.filetype == "png" and a.fileid in standin.state.assets for e in images for a in e.imgfiles
    )


def test_script_with_mounted_project_dir(standin, spy, capsys):
    from companion.cryosparc.external_job import main as script_main

    rc = script_main(
        [
            "--url",
            standin.url,
            "--project",
            "P1",
            "--job",
            standin.src,
            "--project-dir",
            str(standin.project_dir),
            "--workspace",
            "W2",
            *FAST,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    (job,) = new_jobs(standin)
    assert job.status == "completed" and job.workspace_uids == ["W2"]
    assert standin.count("projects.download_file") == 0  # images read in place
    particles, result = spy[0]
    assert len(particles.stack_paths) == STACKS
    out = standin.state.datasets[("P1", job.uid, "particles")]
    assert np.array_equal(out["alignments2D/class"], result.class_id.astype(np.uint32))
    assert sorted(
        p.relative_to(standin.project_dir).as_posix() for p in particles.stack_paths
    ) == sorted({p.lstrip(">") for p in standin.dset["blob/path"]})
    # images through the API give the very same classification (same seed, same order)
    assert run_cli(standin) == 0
    assert standin.count("projects.download_file") == STACKS
    _, streamed = spy[1]
    assert np.array_equal(streamed.class_id, result.class_id)
    assert np.allclose(streamed.averages, result.averages, atol=1e-5)


def test_streamed_images_equal_mounted_images(standin, fake, monkeypatch, tmp_path):
    seen = {}
    real_stage = ext.stage_images

    def stage(source, particles, root, joblog):
        local = real_stage(source, particles, root, joblog)
        seen["streamed"] = local.read_images(np.arange(N))
        seen["mounted"] = ext._load_particles(
            standin.dset, standin.project_dir, None, "P1 J1.particles"
        ).read_images(np.arange(N))
        return local

    monkeypatch.setattr(ext, "stage_images", stage)
    assert run_cli(standin, "--cache-dir", str(tmp_path)) == 0
    assert np.array_equal(seen["streamed"], seen["mounted"])
    assert not list(tmp_path.glob("companion-cs-images-*"))  # local copy removed


# ------------------------------------------------------------------------ failures


def test_server_error_on_save_output_fails_the_job(standin, fake, capsys):
    standin.fail("jobs.save_output", 500, "database unavailable")
    assert run_cli(standin) == 2
    line = one_line_error(capsys)
    assert "database unavailable" in line and "saving output particles" in line
    (job,) = new_jobs(standin)
    assert job.status == "failed"
    assert "database unavailable" in job.errors_run[-1].message
    assert saved_outputs(standin, job) == []
    assert all(o.num_items == 0 for o in job.spec.outputs.root.values())


def test_server_refusing_the_second_save_says_what_was_saved(standin, fake, capsys):
    standin.fail("jobs.save_output", 422, "quota exceeded", after=1)  # the second save
    assert run_cli(standin) == 2
    line = one_line_error(capsys)
    (job,) = new_jobs(standin)
    assert saved_outputs(standin, job) == ["particles"]  # what the server holds
    assert "quota exceeded" in line and "saving output class_averages" in line
    assert f"keeps the outputs already saved: particles ({N})" in line
    assert "not saved: class_averages" in line
    assert job.status == "failed"
    assert "particles (" in job.errors_run[-1].message


def test_outputs_are_checked_before_the_first_save(standin, fake, monkeypatch, capsys):
    from companion.cryosparc import conventions

    real = conventions.alignments2d_fields

    def broken(particles, result):
        fields = real(particles, result)
        fields["alignments2D/shift"] = fields["alignments2D/shift"] * np.nan
        return fields

    monkeypatch.setattr(conventions, "alignments2d_fields", broken)
    assert run_cli(standin) == 2
    line = one_line_error(capsys)
    assert "alignments2D/shift holds NaN" in line and "nothing was saved" in line
    (job,) = new_jobs(standin)
    assert job.status == "failed" and saved_outputs(standin, job) == []


def test_connection_lost_mid_run_marks_job_failed_when_server_returns(standin, fake, capsys):
    # the server goes away after answering the first in-place update of the iteration line
    # and is back 0.3 s later, while companion still tries to mark the job failed
    standin.on("jobs.update_event_log", lambda: standin.bounce(0.3), after=1)
    assert run_cli(standin) == 2
    line = one_line_error(capsys)
    assert "cannot reach CryoSPARC" in line and "marked failed" in line
    (job,) = new_jobs(standin)
    assert job.status == "failed" and "cannot reach CryoSPARC" in job.errors_run[-1].message
    assert saved_outputs(standin, job) == []


def test_connection_lost_for_good_says_job_is_left_running(standin, fake, capsys):
    fake["before_result"] = standin.stop
    assert run_cli(standin) == 2
    line = one_line_error(capsys)
    assert "could not be marked failed" in line and "mark it failed or delete it" in line
    (job,) = new_jobs(standin)
    assert job.status == "running" and saved_outputs(standin, job) == []


def test_stack_mismatch_found_while_streaming_fails_the_job(standin, fake, capsys):
    import mrcfile

    stack = standin.project_dir / "stacks/mic_00002.mrcs"
    with mrcfile.open(stack, mode="r+") as mrc:
        mrc.set_data(mrc.data[:1].copy())  # the server's stack lost images
    assert run_cli(standin) == 2
    line = one_line_error(capsys)
    assert "mic_00002.mrcs" in line and "do not match" in line and "marked failed" in line
    (job,) = new_jobs(standin)
    assert job.status == "failed" and "do not match" in job.errors_run[-1].message
    assert saved_outputs(standin, job) == []


def test_ctrl_c_marks_the_job_failed_not_completed(standin, fake, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ext, "classify", interrupted)
    assert run_cli(standin) == 130
    (job,) = new_jobs(standin)
    assert job.status == "failed" and "interrupted" in job.errors_run[-1].message


def test_stop_request_marks_the_job_failed(standin, monkeypatch):
    def stopping(particles, params, out_dir, callbacks):
        assert callbacks.should_stop()
        raise Aborted("after iteration 2")

    monkeypatch.setattr(ext, "classify", stopping)
    from companion.params import ClassifyParams

    req = ext.ExternalJobRequest(
        url=standin.url,
        project="P1",
        job=standin.src,
        params=ClassifyParams(n_classes=K, device="cpu"),
    )
    with pytest.raises(Aborted):
        ext.run_external_job(req, should_stop=lambda: True)
    (job,) = new_jobs(standin)
    assert job.status == "failed" and "stopped on request" in job.errors_run[-1].message


@pytest.mark.parametrize(
    ("setup", "args", "expected"),
    [
        ("bad_password", (), "rejected the login for ali@example.org"),
        ("no_credentials", (), "no CryoSPARC login"),
        (None, ("--job", "J99"), "job J99 not found in project P1"),
        (None, ("--project", "P9"), "project P9 not found"),
        (None, ("--output", "picks"), "has no output 'picks'; its particle outputs: particles"),
        (None, ("--workspace", "W7"), "workspace W7 not found in project P1"),
        (None, ("--select", "0,5"), "class 5 does not exist with --n-classes 3"),
        (None, ("--select", "best"), "--select 'best'"),
        ("server_v4", (), "is v4.7.1 but cryosparc-tools is"),
        ("tools_v4", (), "cryosparc-tools 4.7.1 is installed"),
        ("refused", (), "cannot reach CryoSPARC"),
        ("slow", ("--timeout", "0.3"), "did not answer within 0.3 s"),
        ("wrong_mount", (), "not found"),
        (None, ("--cache-dir", "/nonexistent/cache"), "--cache-dir /nonexistent/cache"),
    ],
)
def test_user_errors_are_one_line_and_create_no_job(standin, fake, capsys, monkeypatch, tmp_path,
                                                    setup, args, expected):  # fmt: skip
    url = standin.url
    extra = list(args)
    if setup == "bad_password":
        monkeypatch.setenv("CRYOSPARC_PASSWORD", "wrong")
    elif setup == "no_credentials":
        monkeypatch.delenv("CRYOSPARC_PASSWORD")
        monkeypatch.setattr(
            "cryosparc.auth.get_default_auth_config_path", lambda: tmp_path / "no-auth.json"
        )
    elif setup == "server_v4":
        standin.state.version = "v4.7.1"
    elif setup == "tools_v4":
        monkeypatch.setattr(client, "tools_version", lambda: "4.7.1")
    elif setup == "refused":
        standin.stop()
    elif setup == "slow":
        standin.delay("openapi", 1.0)
    elif setup == "wrong_mount":
        (tmp_path / "mnt").mkdir()
        extra += ["--project-dir", str(tmp_path / "mnt")]
    argv = [
        "cryosparc",
        "classify",
        "--url",
        url,
        "--project",
        "P1",
        "--job",
        standin.src,
        *FAST,
        *extra,
    ]
    # later options win: --job/--project/--output given in extra override the defaults
    assert cli_main(argv) == 2
    line = one_line_error(capsys)
    assert expected in line, line
    assert new_jobs(standin) == []


def test_saved_login_replaces_the_password(standin, monkeypatch, tmp_path):
    from cryosparc.api import APIClient
    from cryosparc.auth import InstanceAuthSessions

    token = APIClient(f"{standin.url}/api/cmd").login(
        grant_type="password",
        username=EMAIL,
        password=__import__("hashlib").sha256(PASSWORD.encode()).hexdigest(),
    )
    sessions = InstanceAuthSessions({})
    from datetime import datetime, timedelta

    sessions.insert(standin.url, EMAIL, token, datetime.now(UTC) + timedelta(days=1))
    path = tmp_path / "auth.json"
    sessions.save(path)
    monkeypatch.setattr("cryosparc.auth.get_default_auth_config_path", lambda: path)
    monkeypatch.delenv("CRYOSPARC_PASSWORD")
    cs, url = client.connect(standin.url + "/")
    assert url == standin.url and cs.user.emails[0].address == EMAIL


# ------------------------------------------------------------------------ the stand-in itself


def test_standin_rejects_what_cryosparc_rejects(standin):
    from cryosparc.errors import APIError

    cs = connect_tools(standin)
    project = cs.find_project("P1")
    job = project.create_external_job("W1", title="t")
    job.connect("particles", standin.src, "particles", slots=["blob", "ctf"])
    job.add_output("particle", name="particles", slots=["alignments2D"], passthrough="particles")
    inp = job.load_input("particles", slots=["blob"])
    out = job.alloc_output("particles", inp)
    with pytest.raises(APIError) as exc:  # not running
        job.save_output("particles", out)
    assert exc.value.code == 400 and "running" in exc.value.data["detail"]
    job.start("running")
    with pytest.raises(APIError) as exc:  # a required field missing
        job.save_output("particles", out.drop_fields(["alignments2D/pose"], copy=True))
    assert exc.value.code == 422 and "alignments2D/pose" in exc.value.data["detail"]
    foreign = Dataset.allocate(2, out.descr(exclude_uid=True))
    with pytest.raises(APIError) as exc:  # rows that are not in the passthrough input
        job.save_output("particles", foreign)
    assert exc.value.code == 422
    job.save_output("particles", out)
    job.stop()
    with pytest.raises(APIError):  # no outputs on a completed job
        job.add_output("template", name="late", slots=["blob"])
    with pytest.raises(APIError) as exc:
        cs.api.jobs.find_one("P1", "J99")
    assert exc.value.code == 404
    full = job.load_output("particles", slots="all")
    assert {"alignments2D/class", "blob/path", "ctf/df1_A", "location/center_x_frac"} <= set(
        full.fields()
    )
    with pytest.raises(APIError) as exc:  # a slot that is not connected
        project.create_external_job("W1").connect(
            "particles", standin.src, "particles", slots=["blob", "alignments3D"]
        )
    assert exc.value.code == 422


def test_select_parsing():
    assert ext.parse_select(None) is None
    assert ext.parse_select("AUTO") == "auto"
    assert ext.parse_select("3, 0,7-9") == [0, 3, 7, 8, 9]
    from fake_result import set_particle_and_junk_averages

    result = set_particle_and_junk_averages(fake_result(9, 3, 8), junk=[2])
    assert ext.select_classes(result, "auto").classes.tolist() == [True, True, False]
    assert ext.select_classes(result, [2]).classes.tolist() == [False, False, True]


def test_help_has_examples_and_no_password_option():
    import argparse

    import companion.commands.cryosparc as cmd

    assert "Examples:" in cmd.__doc__ and "companion cryosparc classify" in cmd.__doc__
    parser = argparse.ArgumentParser()
    cmd.add_classify_args(parser)
    options = [o for a in parser._actions for o in a.option_strings]
    assert "--url" in options and "--n-classes" in options
    assert not [o for o in options if "pass" in o or "token" in o]


def test_parameters_are_validated_once_per_run(standin, monkeypatch, capsys):
    """The CryoSPARC job (real classifier): the params model validates once (the command
    line) and check_feasible runs once, before the job exists, not again in the run."""
    from param_counts import install

    counts = install(monkeypatch.setattr)
    assert run_cli(standin, "--select", "auto") == 0
    assert counts.as_tuple() == (1, 1)
    (job,) = new_jobs(standin)
    assert job.status == "completed"
    counts.validated = counts.feasible = 0
    assert run_cli(standin, "--n-classes", "100") == 2  # refused before a job exists
    assert counts.as_tuple() == (1, 1) and len(new_jobs(standin)) == 1
    capsys.readouterr()
