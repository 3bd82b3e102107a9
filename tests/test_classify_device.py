"""Device-facing behaviour of the classifier: batch size on resume, one-line out-of-memory
errors from every CUDA library, and (on a GPU) CPU vs GPU agreement on a whole run."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from classify_data import make_particles

from companion.classify import Callbacks, classify
from companion.classify import checkpoint as ckpt
from companion.classify.backend import device_errors
from companion.errors import Aborted, DeviceError
from companion.metrics import ari
from companion.params import ClassifyParams


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_particles(tmp_path_factory.mktemp("dev"), n=240, n_classes=3, box=32,
                          psize=3.0, snr=1.0, seed=2)  # fmt: skip


def params(**kw) -> ClassifyParams:
    base = dict(n_classes=3, max_resolution=8.0, online_iters=2, batch_per_class=50,
                full_iters=2, anneal_start=1, anneal_iters=2, seed=3, device="cpu")  # fmt: skip
    return ClassifyParams(**(base | kw))


def test_resume_recomputes_the_batch_for_this_device(small, tmp_path, caplog):
    """A checkpoint written with another device's batch (here 7) continues with this
    device's batch, and the run still equals an uninterrupted one."""
    p = params()
    full = classify(small.particles, p, work_dir=tmp_path / "full")
    done: list = []
    cb = Callbacks(on_iteration=done.append, should_stop=lambda: len(done) >= 2)
    with pytest.raises(Aborted):
        classify(small.particles, p, work_dir=tmp_path / "cut", callbacks=cb)
    state = tmp_path / "cut" / "checkpoint" / ckpt.STATE_FILE
    with np.load(state) as z:
        header = json.loads(z["__header__"].tobytes().decode())
    st = ckpt.load(state.parent, p, header["fingerprint"])
    own = st.batch
    st.batch = 7
    ckpt.save(state.parent, st, p, header["fingerprint"])
    with caplog.at_level(logging.INFO, logger="companion"):
        resumed = classify(small.particles, p, work_dir=tmp_path / "cut", resume=True)
    assert f"batch size {own} for cpu" in caplog.text and "(checkpoint had 7)" in caplog.text
    np.testing.assert_array_equal(resumed.class_id, full.class_id)


@pytest.mark.parametrize(
    "message",
    ["cuBLAS Error: CUBLAS_STATUS_ALLOC_FAILED", "cuFFT error: CUFFT_ALLOC_FAILED",
     "cuSOLVER Error: CUSOLVER_STATUS_ALLOC_FAILED", "CUSPARSE_STATUS_ALLOC_FAILED"],
)  # fmt: skip
def test_library_allocation_failures_are_one_line_oom(message):
    with pytest.raises(DeviceError) as info:
        with device_errors("classification"):
            raise RuntimeError(message)
    text = str(info.value)
    assert "ran out of memory" in text and "\n" not in text


def test_other_errors_pass_through():
    with pytest.raises(RuntimeError, match="CUFFT_INVALID_PLAN"):
        with device_errors():
            raise RuntimeError("cuFFT error: CUFFT_INVALID_PLAN")


@pytest.mark.gpu
def test_cpu_and_gpu_agree_on_a_whole_classification(small):
    """Same seed on both backends: the labels agree on ≥ 97% of the particles (float32
    sums in other orders move a few borderline particles), the averages to 2% of their
    range, and both runs recover the truth alike."""
    cpu = classify(small.particles, params(device="cpu"))
    gpu = classify(small.particles, params(device="gpu"))
    assert np.mean(cpu.class_id == gpu.class_id) >= 0.97
    span = np.ptp(cpu.averages)
    assert np.abs(cpu.averages - gpu.averages).max() <= 0.02 * span
    assert abs(ari(small.labels, cpu.class_id) - ari(small.labels, gpu.class_id)) <= 0.05
    again = classify(small.particles, params(device="gpu"))
    np.testing.assert_array_equal(again.class_id, gpu.class_id)  # reproducible on the GPU
    np.testing.assert_array_equal(again.averages, gpu.averages)
