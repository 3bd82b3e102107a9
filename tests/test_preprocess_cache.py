"""The preprocessed-particle cache: resumable after kill -9, keyed on what the images are,
non-finite pixels refused (or dropped), a full disk an error, batches from --memory-limit."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from classify_data import make_particles

from companion.classify import backend, diskcache, preprocess
from companion.classify import fourier as fo
from companion.classify.em import classify
from companion.errors import InputError, ParameterError
from companion.params import ClassifyParams


def _geom(ps) -> fo.Geometry:
    return fo.Geometry.create(ps.box, ps.pixel_size, 8.0, None)


@pytest.fixture()
def small(tmp_path):
    return make_particles(tmp_path / "data", n=240, n_classes=3, box=48, psize=3.0, snr=1.0,
                          seed=3, n_stacks=3)  # fmt: skip


def _same(a: preprocess.Prepared, b: preprocess.Prepared) -> None:
    assert np.array_equal(np.asarray(a.coeffs), np.asarray(b.coeffs))
    assert np.array_equal(a.sigma2_init, b.sigma2_init)
    for x, y in zip(a.average_sums, b.average_sums, strict=True):
        assert np.array_equal(x, y)


def test_kill_9_during_preprocessing_then_continue_gives_the_same_cache(small, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    ps, geom = small.particles, _geom(small.particles)
    monkeypatch.setattr(preprocess, "PREPROCESS_MOST", 32)
    ref = preprocess.prepare(ps, geom, tmp_path / "ref", np, reuse=False)
    (tmp_path / "ps.pkl").write_bytes(pickle.dumps(ps))
    script = textwrap.dedent(f"""
        import os, pickle, signal, numpy as np
        from companion.classify import preprocess, fourier as fo
        preprocess.PREPROCESS_MOST = 32
        preprocess.SAVE_EVERY_S = 0.0
        ps = pickle.loads(open({str(tmp_path / "ps.pkl")!r}, "rb").read())
        geom = fo.Geometry.create(ps.box, ps.pixel_size, 8.0, None)
        class Kill:
            def progress(self, done, total, stage):
                if done >= 128:
                    os.kill(os.getpid(), signal.SIGKILL)
        preprocess.prepare(ps, geom, __import__("pathlib").Path({str(tmp_path / "c")!r}),
                           np, reuse=True, callbacks=Kill())
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (tmp_path / "c" / "progress.npz").is_file()
    assert not (tmp_path / "c" / "coeffs.json").exists()
    seen: list[int] = []

    class Count:
        def progress(self, done, total, stage):
            seen.append(done)

    again = preprocess.prepare(ps, geom, tmp_path / "c", np, reuse=True, callbacks=Count())
    assert seen[0] > 32  # continued, not started over
    _same(ref, again)
    assert not (tmp_path / "c" / "progress.npz").exists()


def test_without_continue_an_interrupted_cache_is_not_adopted(small, tmp_path):
    ps, geom = small.particles, _geom(small.particles)
    ref = preprocess.prepare(ps, geom, tmp_path / "ref", np, reuse=False)
    c = tmp_path / "c"
    preprocess.prepare(ps, geom, c, np, reuse=False)
    m = np.memmap(c / "coeffs.c64", dtype=np.complex64, mode="r+")
    m[:] = 7  # another run's leftovers under the same key
    m.flush()
    del m
    fresh = preprocess.prepare(ps, geom, c, np, reuse=False)
    _same(ref, fresh)


def _rewrite_stacks(ps, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for path in ps.stack_paths:
        with mrcfile.open(path, mode="r+") as m:
            m.data[:] = rng.normal(size=m.data.shape).astype(np.float32)


def test_replaced_stacks_change_the_cache_key(small, tmp_path, caplog):
    ps, geom = small.particles, _geom(small.particles)
    c = tmp_path / "c"
    preprocess.prepare(ps, geom, c, np, reuse=True)
    key = preprocess.fingerprint(ps, geom)
    _rewrite_stacks(ps, 1)
    os.utime(ps.stack_paths[0], ns=(1, 1))  # mtime differs whatever the clock's resolution
    assert preprocess.fingerprint(ps, geom) != key
    caplog.set_level(logging.INFO)
    new = preprocess.prepare(ps, geom, c, np, reuse=True)
    assert "reusing" not in caplog.text
    _same(new, preprocess.prepare(ps, geom, tmp_path / "fresh", np, reuse=False))


def _params(**kw) -> ClassifyParams:
    base = dict(n_classes=3, max_resolution=8.0, online_iters=3, batch_per_class=40,
                full_iters=1, seed=1, device="cpu")  # fmt: skip
    return ClassifyParams(**(base | kw))


class _StopAfterFirst:
    def __init__(self) -> None:
        self.n = 0

    def on_iteration(self, info) -> None:
        self.n += 1

    def should_stop(self) -> bool:
        return self.n >= 1


def test_stale_cache_and_checkpoint_after_stacks_are_replaced(small, tmp_path):
    """Stop a run, replace the stacks' contents: a fresh run gives the new answer, and
    --continue refuses the old checkpoint."""
    ps = small.particles
    out = tmp_path / "out"
    from companion.errors import Aborted

    with pytest.raises(Aborted):
        classify(ps, _params(), work_dir=out, callbacks=_StopAfterFirst())
    assert (out / "checkpoint" / "cache" / "coeffs.json").is_file()
    _rewrite_stacks(ps, 2)
    os.utime(ps.stack_paths[0], ns=(2, 2))
    with pytest.raises(ParameterError, match="other particles"):
        classify(ps, _params(), work_dir=out, resume=True)
    again = classify(ps, _params(), work_dir=out)
    fresh = classify(ps, _params(), work_dir=tmp_path / "fresh")
    assert np.array_equal(again.class_id, fresh.class_id)
    np.testing.assert_array_equal(again.averages, fresh.averages)


def _poison(ps, i: int, value: float) -> None:
    path = ps.stack_paths[int(ps.stack_index[i])]
    with mrcfile.open(path, mode="r+") as m:
        m.data[int(ps.image_index[i]), 5, 7] = value


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_pixel_is_refused_naming_image_and_stack(small, tmp_path, value):
    ps = small.particles
    _poison(ps, 17, value)
    with pytest.raises(InputError) as exc:
        preprocess.prepare(ps, _geom(ps), tmp_path / "c", np, reuse=False)
    msg = str(exc.value)
    assert "\n" not in msg and "NaN/Inf" in msg and "--drop-bad-images" in msg
    assert str(ps.stack_paths[int(ps.stack_index[17])]) in msg
    assert f"image {int(ps.image_index[17]) + 1} " in msg


def test_drop_bad_images_names_them_and_the_rest_is_unaffected(small, tmp_path):
    ps = small.particles
    geom = _geom(ps)
    _poison(ps, 17, np.nan)
    _poison(ps, 200, np.inf)
    with pytest.raises(preprocess.BadImages) as exc:
        preprocess.prepare(ps, geom, tmp_path / "c", np, reuse=True, drop_bad=True)
    assert exc.value.bad.tolist() == [17, 200]
    assert len(exc.value.keep) == 238 and 17 not in exc.value.keep
    # known on --continue without a second pass
    with pytest.raises(preprocess.BadImages):
        preprocess.prepare(ps, geom, tmp_path / "c", np, reuse=True, drop_bad=True)
    sub = ps.subset(exc.value.keep)
    prep = preprocess.prepare(sub, geom, tmp_path / "c", np, reuse=True, drop_bad=True)
    assert np.isfinite(np.asarray(prep.coeffs)).all()
    assert np.isfinite(prep.sigma2_init).all()


def test_classify_drop_bad_images_end_to_end(small, tmp_path, caplog):
    from companion.run import run_classification

    ps = small.particles
    _poison(ps, 3, np.nan)
    caplog.set_level(logging.INFO)
    out = run_classification(ps, _params(drop_bad_images=True), tmp_path / "out")
    assert out.summary["n_particles"] == 239 and len(out.result.class_id) == 239
    assert np.isfinite(out.result.averages).all()
    assert "leaving out 1 of 240 images" in caplog.text


def test_constant_images_are_warned_about(small, tmp_path, caplog):
    ps = small.particles
    path = ps.stack_paths[int(ps.stack_index[5])]
    with mrcfile.open(path, mode="r+") as m:
        m.data[int(ps.image_index[5])] = 0.0
    caplog.set_level(logging.WARNING)
    preprocess.prepare(ps, _geom(ps), tmp_path / "c", np, reuse=False)
    assert "1 image(s) are constant" in caplog.text and str(path) in caplog.text


def test_too_little_disk_space_is_an_error_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 10 << 20))
    with pytest.raises(diskcache.DiskFullError, match="only 10.0 MiB is free"):
        diskcache.open_array(tmp_path / "x.bin", (1000, 1000), np.complex64, what="a test")
    assert not (tmp_path / "x.bin").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_tmpfs_is_an_error_not_sigbus(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mnt)],
                       capture_output=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        # the free-space check passes (96 MiB free) but reserving 100 MiB cannot
        monkey_spare = diskcache.SPARE_BYTES
        diskcache.SPARE_BYTES = 0
        try:
            with pytest.raises(diskcache.DiskFullError):
                diskcache.open_array(mnt / "x.bin", (100 << 20,), np.uint8, what="a test")
            # fits: every block is reserved, writes cannot fault
            m = diskcache.open_array(mnt / "y.bin", (32 << 20,), np.uint8, what="a test")
            m[:] = 1
            m.flush()
            del m
        finally:
            diskcache.SPARE_BYTES = monkey_spare
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize(
    "text,value",
    [
        ("4G", 4 << 30),
        ("512M", 512 << 20),
        ("1.5GB", int(1.5 * (1 << 30))),
        ("2e9", 2 * 10**9),
        ("64KiB", 64 << 10),
    ],  # fmt: skip
)
def test_parse_size(text, value):
    assert backend.parse_size(text) == value


def test_bad_memory_limit_is_a_parameter_error():
    from companion.params import validate_params

    with pytest.raises(ParameterError, match="--memory-limit"):
        validate_params({"memory_limit": "lots"})


def test_memory_limit_drives_the_batch_and_is_logged(small, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with backend.memory_limit(100 << 20):
        assert backend.work_budget(np) == 50 << 20
    assert backend._memory_limit is None
    r_small = classify(small.particles, _params(memory_limit="40M", online_iters=1, full_iters=0))
    assert "host memory budget 0.04 GiB" in caplog.text
    assert "E-step batch:" in caplog.text
    assert len(r_small.class_id) == 240


def test_cgroup_limit_caps_available_memory(monkeypatch):
    monkeypatch.setattr(backend, "_cgroup_free", lambda: 123 << 20)
    assert backend.available_memory(np) <= 123 << 20
