"""Fuzzed STAR and .cs metadata (issue 16): whatever the bytes, the readers either return
particles or raise CompanionError — never another exception. A fixed example budget with a
derandomised search keeps the run short and the same on every machine."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from cryosparc.dataset import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from companion.errors import CompanionError
from companion.simulate import simulate
from companion.sources import inspect_report, open_particles

STAR_EXAMPLES = 250
CS_EXAMPLES = 150


def fuzz(n: int) -> settings:
    """A fixed, derandomised budget of ``n`` examples (no example database)."""
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module")
def proj(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "s"
    simulate(out, 40, box=24, seed=5, per_micrograph=20, n_optics_groups=2, progress=False)
    return out


def _outcome(path: Path) -> str:
    """Read ``path`` strictly and leniently; anything but success or CompanionError fails."""
    try:
        particles = open_particles(path)
        particles.check_images()
        particles.read_images(np.arange(min(3, len(particles))))
        result = "ok"
    except CompanionError:
        result = "error"
    report = inspect_report(path)
    assert report.blocking or report.particles is not None
    for problem in report.problems:
        assert "\n" not in problem, problem
    return result


# ----------------------------------------------------------------------------- STAR


def _mutate_star(data: st.DataObject, text: bytes) -> bytes:
    lines = text.split(b"\n")
    ops = data.draw(st.lists(st.integers(0, 10), min_size=1, max_size=4), label="ops")
    for op in ops:
        n = len(lines)
        i = data.draw(st.integers(0, max(0, n - 1)), label="line")
        if op == 0:  # flip bytes
            blob = b"\n".join(lines)
            if blob:
                pos = data.draw(st.integers(0, len(blob) - 1))
                b = bytearray(blob)
                b[pos] = data.draw(st.integers(0, 255))
                lines = bytes(b).split(b"\n")
        elif op == 1:  # truncate
            blob = b"\n".join(lines)
            lines = blob[: data.draw(st.integers(0, len(blob)))].split(b"\n")
        elif op == 2:  # drop a line (a label, a row, a data_ or loop_ line)
            del lines[i : i + 1]
        elif op == 3:  # duplicate a line
            lines.insert(i, lines[i] if lines else b"")
        elif op == 4:  # replace one field of a line
            f = lines[i].split() if lines else []
            if f:
                j = data.draw(st.integers(0, len(f) - 1))
                f[j] = data.draw(
                    st.sampled_from([b"nan", b"-1", b"abc", b"1e999", b'""', b"0", b"@", b"\xe9"])
                )
                lines[i] = b" ".join(f)
        elif op == 5:  # drop a field from a line
            f = lines[i].split() if lines else []
            if f:
                del f[data.draw(st.integers(0, len(f) - 1))]
                lines[i] = b" ".join(f)
        elif op == 6:  # duplicate a whole block
            blob = b"\n".join(lines)
            start = blob.find(b"data_", data.draw(st.integers(0, len(blob))))
            if start >= 0:
                lines = (blob + b"\n" + blob[start:]).split(b"\n")
        elif op == 7:  # another encoding
            enc = data.draw(st.sampled_from(["utf-16", "latin-1", "utf-8-sig", "cp1252"]))
            blob = b"\n".join(lines).decode("utf-8", "replace").replace("1.5", "1·5", 1)
            lines = blob.encode(enc, "replace").split(b"\n")
        elif op == 8:  # CRLF or a tab
            lines[i] = lines[i] + data.draw(st.sampled_from([b"\r", b"\t", b" \x00"]))
        elif op == 9:  # insert random bytes
            lines.insert(i, data.draw(st.binary(max_size=40)))
        else:  # swap two lines
            j = data.draw(st.integers(0, max(0, n - 1)))
            if lines:
                lines[i], lines[j] = lines[j], lines[i]
    return b"\n".join(lines)


@fuzz(STAR_EXAMPLES)
@given(data=st.data())
def test_star_reader_never_crashes(proj, data):
    source = (proj / "particles.star").read_bytes()
    path = proj / "fuzzed.star"
    path.write_bytes(_mutate_star(data, source))
    _outcome(path)


# ----------------------------------------------------------------------------- .cs

_CASTS = {
    "text": lambda v: v.astype(str).astype(object),
    "float": lambda v: v.astype(np.float64) + 0.25 if v.dtype.kind in "iuf" else v,
    "int": lambda v: v.astype(np.int64) if v.dtype.kind in "iuf" else np.arange(len(v)),
    "negative": lambda v: -np.abs(v) if v.dtype.kind in "if" else v,
    "nan": lambda v: np.full(v.shape, np.nan, np.float32),
    "first_column": lambda v: v.reshape(len(v), -1)[:, 0].copy() if v.ndim > 1 else v,
    "paths_out": lambda v: np.array(["../" * 5 + "x.mrcs"] * len(v), dtype=object),
}


def _cs_bytes(fields: list[tuple[str, np.ndarray]]) -> bytes:
    buf = io.BytesIO()
    Dataset(fields).save(buf)
    return buf.getvalue()


@fuzz(CS_EXAMPLES)
@given(data=st.data())
def test_cs_reader_never_crashes(proj, data):
    base = Dataset.load(str(proj / "particles.cs"))
    fields = [(f, np.asarray(base[f])) for f in base.fields()]
    names = [f for f, _ in fields]
    for _ in range(data.draw(st.integers(1, 3), label="n_ops")):
        op = data.draw(st.sampled_from(["drop", "cast", "rows", "none"]), label="op")
        name = data.draw(st.sampled_from(names), label="field")
        if op == "drop":
            fields = [(f, v) for f, v in fields if f != name] or fields
        elif op == "cast":
            how = data.draw(st.sampled_from(sorted(_CASTS)), label="cast")
            fields = [(f, _CASTS[how](v) if f == name else v) for f, v in fields]
        elif op == "rows":
            n = len(fields[0][1])
            rows = st.lists(st.integers(0, n - 1), max_size=8) if n else st.just([])
            idx = np.array(data.draw(rows, label="rows"), dtype=int)
            fields = [(f, v[idx]) for f, v in fields]
    try:  # building the input: cryosparc-tools warns when a cast field holds NaN
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            blob = _cs_bytes(fields)
    except Exception:  # cryosparc-tools cannot write this combination: nothing to read
        return
    if data.draw(st.booleans(), label="damage bytes"):
        b = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 4))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(b[: data.draw(st.integers(0, len(b)), label="truncate at")])
    path = proj / "fuzzed.cs"
    path.write_bytes(blob)
    _outcome(path)
