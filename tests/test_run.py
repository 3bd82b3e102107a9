"""run_classification with a stand-in classifier and sink: order, atomicity, checks."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from runner_fakes import fake_particles, fake_result

import companion.classify
import companion.classify.backend as backend
from companion import host as hostmod
from companion import run as runmod
from companion.errors import Aborted, DeviceError, ParameterError
from companion.params import ClassifyParams


class FakeSink:
    def __init__(self, fail_after: int | None = None):
        self.calls: list[int] = []
        self.fail_after = fail_after

    def __call__(self, out_dir: Path, root, particles, result, iteration):
        self.calls.append(iteration)
        assert not (out_dir / "summary.json").exists()
        data = out_dir / f"{root}_it{iteration:03d}_data.star"
        data.write_text(f"{len(particles)} {result.n_classes}\n")
        if self.fail_after is not None and len(self.calls) > self.fail_after:
            (out_dir / f"{root}_it{iteration:03d}_model.star").write_text("half")
            raise OSError("disk full")
        model = out_dir / f"{root}_it{iteration:03d}_model.star"
        model.write_text("model\n")
        return {"data": data, "model": model}


@dataclass(frozen=True)
class FakeHost:
    """A real Host's layout (iteration directories) with the fixture's sink as its writer."""

    real: hostmod.Host
    state: dict

    @property
    def name(self) -> str:
        return self.real.name

    def iteration_dir(self, out_dir, iteration):
        return self.real.iteration_dir(out_dir, iteration)

    def write_result(self, out_dir, root, particles, result, iteration):
        return self.state["sink"](out_dir, root, particles, result, iteration)


@pytest.fixture
def fakes(monkeypatch):
    state = {"calls": 0, "result": fake_result(n=60, k=5, box=32), "sink": FakeSink()}

    def classify(particles, params, *, work_dir, resume, callbacks, checked=False):
        state["calls"] += 1
        state["resume"] = resume
        (Path(work_dir) / "checkpoint").mkdir(exist_ok=True)
        (Path(work_dir) / "checkpoint" / "state.npz").write_text("ckpt")
        for it in (1, 2, 3):
            callbacks.on_iteration({"iteration": it, "n_iterations": 3, "seconds": 0.01})
            if callbacks.intermediate is not None and it < 3:
                callbacks.intermediate(it, state["result"])
            if callbacks.should_stop():
                raise Aborted(f"stopped after iteration {it}")
        return state["result"]

    monkeypatch.setattr(companion.classify, "classify", classify)
    for name, real in hostmod.HOSTS.items():
        monkeypatch.setitem(hostmod.HOSTS, name, FakeHost(real, state))
    return state


def _params(**kw) -> ClassifyParams:
    base = dict(n_classes=5, online_iters=2, full_iters=1, device="cpu")
    base.update(kw)
    return ClassifyParams(**base)


def test_writes_host_outputs_report_and_summary_last(tmp_path, fakes, monkeypatch, caplog):
    order = []
    real_write_json = runmod.write_json

    def spy(path, obj):
        order.append("summary")
        for name, p in obj["files"].items():
            if name != "summary":
                assert (out / p).is_file(), f"{name} missing when summary.json is written"
        assert not Path(path).exists()
        return real_write_json(path, obj)

    monkeypatch.setattr(runmod, "write_json", spy)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="companion.run"):
        res = runmod.run_classification(fake_particles(60), _params(), out, root="run")
    assert order == ["summary"]
    assert fakes["sink"].calls == [3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary == res.summary
    # relative to the output directory, so a script reading it from elsewhere finds them
    assert summary["files"]["data"] == "run_it003_data.star"
    assert summary["files"]["gallery"] == "class_averages.png"
    assert summary["files"]["summary"] == "summary.json"
    assert (out / summary["files"]["occupancy"]).is_file()
    assert summary["class_sizes"] == fakes["result"].class_sizes.tolist()
    assert summary["iterations"] == 3 and summary["device"] == "cpu (numpy)"
    assert set(summary["timings"]) >= {"classify_s", "write_s", "run_s"}
    assert res.paths["summary"] == out / "summary.json"
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iteration")]
    assert len(lines) == 3 and all("ETA" in x for x in lines)


def test_sink_failure_leaves_nothing_half_written(tmp_path, fakes):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "summary.json").write_text("{}")  # from an earlier run: must not survive
    fakes["sink"] = FakeSink(fail_after=0)
    with pytest.raises(OSError, match="disk full"):
        runmod.run_classification(fake_particles(60), _params(), out)
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert left == ["checkpoint/state.npz", "notes.txt"]


def test_report_failure_removes_host_files(tmp_path, fakes, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("matplotlib broke")

    monkeypatch.setattr(runmod, "write_occupancy", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        runmod.run_classification(fake_particles(60), _params(), out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(balance="cap", max_per_class=10), "max-per-class 10"),  # 10 × 5 < 60
        (dict(n_classes=100), "100 classes for 60 particles"),
    ],
)
def test_infeasible_parameters_fail_before_any_work(tmp_path, fakes, kw, match):
    out = tmp_path / "out"
    with pytest.raises(ParameterError, match=match):
        runmod.run_classification(fake_particles(60), _params(**kw), out)
    assert fakes["calls"] == 0 and not out.exists()


def test_gpu_absent_is_a_device_error(tmp_path, fakes, monkeypatch):
    monkeypatch.setattr(backend, "cupy_or_none", lambda: None)
    with pytest.raises(DeviceError, match="--device gpu"):
        runmod.run_classification(fake_particles(60), _params(device="gpu"), tmp_path / "o")
    assert fakes["calls"] == 0


def test_cap_broken_by_classifier_writes_nothing(tmp_path, fakes):
    fakes["result"] = fake_result(n=60, k=5)  # class 0 holds 28
    fakes["result"].cap = 12
    with pytest.raises(RuntimeError, match="breaks the cap"):
        runmod.run_classification(fake_particles(60), _params(balance="equal"), tmp_path / "o")
    assert fakes["sink"].calls == []
    assert not (tmp_path / "o" / "summary.json").exists()


def test_cap_kept_is_reported(tmp_path, fakes):
    fakes["result"] = fake_result(n=60, k=5, cap=12)
    out = runmod.run_classification(fake_particles(60), _params(balance="equal"), tmp_path / "o")
    assert out.summary["cap"] == 12 and out.summary["largest_class"] == 12
    assert out.summary["cap_respected"] is True


def test_keep_iterations_writes_every_iteration(tmp_path, fakes):
    out = tmp_path / "o"
    runmod.run_classification(fake_particles(60), _params(), out, keep_iterations=True)
    assert fakes["sink"].calls == [1, 2, 3]
    assert {p.name for p in out.glob("run_it*_data.star")} == {
        "run_it001_data.star",
        "run_it002_data.star",
        "run_it003_data.star",
    }


def test_cryosparc_iterations_go_to_subdirectories(tmp_path, fakes):
    out = tmp_path / "o"
    runmod.run_classification(
        fake_particles(60, host="cryosparc"), _params(), out, keep_iterations=True
    )
    assert (out / "iteration_001" / "run_it001_data.star").is_file()
    assert (out / "run_it003_data.star").is_file()


def test_stop_request_aborts_without_summary(tmp_path, fakes):
    class Stop:
        def should_stop(self):
            return True

    out = tmp_path / "o"
    with pytest.raises(Aborted):
        runmod.run_classification(fake_particles(60), _params(), out, callbacks=Stop())
    assert not (out / "summary.json").exists()
    assert (out / "checkpoint" / "state.npz").is_file()


def test_user_callbacks_are_called(tmp_path, fakes):
    seen = []

    class Mine:
        def on_iteration(self, info):
            seen.append(info["iteration"])

    runmod.run_classification(fake_particles(60), _params(), tmp_path / "o", callbacks=Mine())
    assert seen == [1, 2, 3]


def test_unknown_host_is_refused_before_work(tmp_path, monkeypatch):
    monkeypatch.setattr(companion.classify, "classify", lambda *a, **k: pytest.fail("classify ran"))
    with pytest.raises(ParameterError, match="host 'other'"):
        runmod.run_classification(fake_particles(60, host="other"), _params(), tmp_path / "o")


def test_progress_eta_counts_full_passes_heavier(caplog):
    p = _params(online_iters=2, full_iters=1, batch_per_class=2)  # batch 10 of 100
    prog = runmod.ProgressLog(100, p)
    assert prog.work == [10, 10, 100]
    with caplog.at_level(logging.INFO, logger="companion.run"):
        prog.on_iteration({"iteration": 1, "n_iterations": 3, "resolution_A": 12.0})
    msg = caplog.records[-1].getMessage()
    assert msg.startswith("iteration 1/3") and "res 12.0 Å" in msg and "ETA" in msg


def test_check_cap_rejects_inconsistent_sizes():
    res = fake_result(n=60, k=5)
    res.class_sizes = np.array([60, 0, 0, 0, 0])
    with pytest.raises(RuntimeError, match="disagree"):
        runmod.check_cap(res, 60)


def test_intermediate_writes_only_particles_seen(tmp_path, fakes, monkeypatch):
    partial = fake_result(n=60, k=5)
    partial.class_id = partial.class_id.copy()
    partial.class_id[::2] = -1  # not yet seen by online EM
    written = []

    def sink(out_dir, root, particles, result, iteration):
        written.append((iteration, len(particles), result.class_sizes.sum(), result.n_particles))
        return {}

    fakes["sink"] = sink
    real = fakes["result"]

    def classify(particles, params, *, work_dir, resume, callbacks, checked=False):
        callbacks.intermediate(1, partial)
        return real

    monkeypatch.setattr(companion.classify, "classify", classify)
    runmod.run_classification(fake_particles(60), _params(), tmp_path / "o", keep_iterations=True)
    assert written == [(1, 30, 30, 30), (3, 60, 60, 60)]


def test_params_cap_is_enforced_even_if_result_forgets_it(tmp_path, fakes):
    fakes["result"] = fake_result(n=60, k=5)  # class 0 holds 28, result.cap None
    params = _params(balance="cap", max_per_class=20)
    with pytest.raises(RuntimeError, match="> 20 particles"):
        runmod.run_classification(fake_particles(60), params, tmp_path / "o")
    assert fakes["sink"].calls == []


def test_sink_and_classifier_can_be_injected(tmp_path):
    state = {"sink": FakeSink()}
    host = FakeHost(hostmod.CRYOSPARC, state)  # relion particles, CryoSPARC layout
    result = fake_result(n=60, k=5, box=32)
    out = runmod.run_classification(
        fake_particles(60),
        _params(),
        tmp_path / "o",
        host,
        keep_iterations=True,
        classifier=lambda particles, params, *, work_dir, resume, callbacks: result,
    )
    assert out.summary["host"] == "cryosparc" and state["sink"].calls == [result.iteration]


def test_host_registry():
    assert hostmod.host_for_path("a/b.STAR") is hostmod.RELION
    assert hostmod.host_for_path("x.cs") is hostmod.CRYOSPARC
    assert hostmod.host_named("cryosparc").iteration_dir(Path("o"), 2) == Path("o/iteration_002")
    assert hostmod.RELION.iteration_dir(Path("o"), 2) == Path("o")


def test_external_job_modules_load_without_numpy():
    """The RELION job sets BLAS threads from --j before NumPy loads: importing the job
    module (and so its host package) must not import NumPy."""
    import subprocess
    import sys

    code = (
        "import sys, companion.relion.external_job, companion.cryosparc.external_job; "
        "sys.exit('numpy' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
