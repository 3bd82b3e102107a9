"""One run per output directory (issue 16): the lock, stale locks, leftovers of earlier runs,
and a full or read-only disk as a one-line error with nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from companion.cli import main as cli_main
from companion.errors import OutputError
from companion.outdir import LOCK_FILE, check_free_space
from companion.simulate import simulate

REPO = Path(__file__).resolve().parent.parent
FAST = ["--n-classes", "2", "--online-iters", "1", "--full-iters", "1"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outdir") / "s"
    simulate(out, 60, box=32, seed=4, per_micrograph=30, n_optics_groups=1, progress=False)
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _classify(star: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "companion.cli", "classify", str(star), "--out", str(out)]
    return subprocess.Popen(
        [*cmd, *FAST, *extra], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_second_run_on_one_out_is_refused_and_the_first_completes(sim, tmp_path):
    out = tmp_path / "out"
    first = _classify(sim / "particles.star", out, "--online-iters", "30")
    t0 = time.monotonic()
    while not (out / LOCK_FILE).exists():
        assert first.poll() is None, first.communicate()[1]
        assert time.monotonic() - t0 < 120, "the first run never took the lock"
        time.sleep(0.05)
    second = _classify(sim / "particles.star", out, "--n-classes", "3")
    _, err2 = second.communicate(timeout=120)
    _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1[-2000:]
    assert second.returncode == 2, err2[-2000:]
    last = err2.strip().splitlines()[-1]
    assert "Traceback" not in err2
    assert last.startswith("companion classify: error:") and str(out) in last
    assert f"pid {first.pid}" in last and "another companion run" in last
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_classes"] == 2  # the refused run (3 classes) wrote nothing
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_stale_lock_of_a_dead_process_is_reclaimed(sim, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    (out / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": "h"}) + "\n")
    with caplog.at_level("INFO"):
        assert cli_main(["classify", str(sim / "particles.star"), "--out", str(out), *FAST]) == 0
    assert "reclaimed the lock" in caplog.text
    assert (out / "summary.json").is_file() and not (out / LOCK_FILE).exists()


def test_leftovers_of_earlier_runs_are_removed_at_start(sim, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint").mkdir()
    tmp_files = [
        out / ".run_it002_data.star.abc123.tmp",
        out / ".summary.json.99.tmp",
        out / "checkpoint" / "state.npz.tmp",
    ]
    stale = [out / "run_it007_data.star", out / "run_it007_classes.mrcs"]
    for p in tmp_files + stale:
        p.write_text("left over")
    keep = out / "notes.tmp"  # not one of ours
    keep.write_text("mine")
    assert cli_main(["classify", str(sim / "particles.star"), "--out", str(out), *FAST]) == 0
    assert not any(p.exists() for p in tmp_files + stale)
    assert keep.read_text() == "mine"
    assert (out / "run_it002_data.star").is_file() and (out / "summary.json").is_file()
    assert not list(out.glob(".*.tmp"))


def test_check_free_space(tmp_path):
    check_free_space(tmp_path / "cache.bin", 1 << 20)
    with pytest.raises(
        OutputError, match="cache.bin: the disk is full for the cache: it needs .* free"
    ):
        check_free_space(tmp_path / "cache.bin", 1 << 62, "the cache")


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None,
    reason="mounting a small tmpfs needs root (run the suite as root to test a full disk)",
)
@pytest.mark.parametrize(
    "options,fix",
    [("size=64k", "disk is full"), ("size=120k", "disk is full"), ("ro,size=64k", "read-only")],
)
def test_full_or_read_only_disk_is_one_line_and_leaves_no_outputs(sim, tmp_path, options, fix):
    mnt = tmp_path / "mnt"
    try:
        _mount_tmpfs(mnt, options)
    except subprocess.CalledProcessError:
        pytest.skip("cannot mount a tmpfs here (container without CAP_SYS_ADMIN)")
    try:
        out = mnt / "out"
        proc = _classify(sim / "particles.star", out)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (proc.returncode, err[-2000:])
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and last.startswith("companion classify: error:")
        assert str(out) in last and fix in last
        left = {p.name for p in out.glob("*")} if out.exists() else set()
        assert not left & {"summary.json", "class_averages.png", "class_occupancy.png"}
        assert not [n for n in left if n.startswith("run_it")], left
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
