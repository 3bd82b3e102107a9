"""The bad-input catalogue (issue 16): every kind of broken input, output directory or saved
state is exit 2 with ONE error line (the last line of stderr) naming the file or row, no
traceback, nothing half-written and the inputs unchanged. Runs the CLI in-process."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryosparc.dataset import Dataset

from companion.cli import main as cli_main
from companion.outdir import LOCK_FILE
from companion.simulate import simulate

FAST = ["--n-classes", "2", "--online-iters", "1", "--full-iters", "1"]
STACK1 = "stacks/mic_00001.mrcs"


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad") / "s"
    simulate(out, 60, box=32, seed=3, per_micrograph=30, n_optics_groups=1, progress=False)
    return out


# ----------------------------------------------------------------------------- mutations
# each kind: (proj) -> (input file, extra CLI args, strings the error line must hold,
#                        commands to run)

KINDS: dict[str, Callable[[Path], tuple[Path, list[str], list[str], tuple[str, ...]]]] = {}
BOTH = ("info", "classify")


def kind(fn: Callable) -> Callable:
    KINDS[fn.__name__] = fn
    return fn


def _star(p: Path) -> Path:
    return p / "particles.star"


def _rows(text: str) -> list[int]:
    """Line numbers (0-based) of the particle rows."""
    return [i for i, ln in enumerate(text.split("\n")) if "@stacks/" in ln]


def _edit_row(p: Path, row: int, col: int, value: str) -> Path:
    star = _star(p)
    lines = star.read_text().split("\n")
    i = _rows(star.read_text())[row - 1]
    f = lines[i].split()
    f[col] = value
    lines[i] = " ".join(f)
    star.write_text("\n".join(lines))
    return star


def _replace(path: Path, old: bytes, new: bytes, count: int = -1) -> Path:
    data = path.read_bytes()
    assert old in data, old
    path.write_bytes(data.replace(old, new, count))
    return path


def _cs(p: Path, edit: Callable[[list[tuple[str, np.ndarray]]], list]) -> Path:
    path = p / "particles.cs"
    d = Dataset.load(str(path))
    Dataset(edit([(f, d[f]) for f in d.fields()])).save(str(path))
    return path


def _set(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable:
    return lambda fields: [(k, fn(v) if k == name else v) for k, v in fields]


def _text(v: np.ndarray) -> np.ndarray:
    return np.array(["x"] * len(v), dtype=object)


def _mrc_header(p: Path, offset: int, value: int) -> Path:
    stack = p / STACK1
    b = bytearray(stack.read_bytes())
    b[offset : offset + 4] = np.int32(value).tobytes()
    stack.write_bytes(bytes(b))
    return _star(p)


# --- STAR metadata
@kind
def missing_stack(p):
    (p / "stacks" / "mic_00002.mrcs").unlink()
    return _star(p), [], ["row 31", "mic_00002.mrcs", "not found"], BOTH


@kind
def index_past_end(p):
    star = _replace(_star(p), b"000005@stacks/mic_00001", b"000999@stacks/mic_00001", 1)
    return star, [], ["row 5", "999", "30 images"], BOTH


@kind
def no_image_name(p):
    star = _star(p)
    lines = [ln for ln in star.read_text().split("\n") if not ln.startswith("_rlnImageName")]
    lines = [" ".join(ln.split()[1:]) if "@stacks/" in ln else ln for ln in lines]
    star.write_text("\n".join(lines))
    return star, [], ["rlnImageName"], BOTH


@kind
def box_mismatch(p):
    star = _replace(_star(p), b" 1.5 32 2", b" 1.5 64 2")
    return star, [], ["row 1", "32x32", "64"], BOTH


@kind
def nan_defocus(p):
    return _edit_row(p, 7, 3, "nan"), [], ["row 7", "rlnDefocusU"], BOTH


@kind
def negative_defocus(p):
    return _edit_row(p, 12, 4, "-1500.0"), [], ["row 12", "rlnDefocusV"], BOTH


@kind
def text_defocus(p):
    return _edit_row(p, 9, 3, "abc"), [], ["row 9", "rlnDefocusU"], BOTH


@kind
def empty_star(p):
    _star(p).write_text("")
    return _star(p), [], ["empty"], BOTH


@kind
def whitespace_star(p):
    _star(p).write_text("\n   \n\t\n")
    return _star(p), [], ["empty"], BOTH


@kind
def not_found(p):
    return p / "nope.star", [], ["not found"], BOTH


@kind
def unknown_suffix(p):
    return p / "truth.csv", [], [".star", ".cs"], BOTH


@kind
def input_is_directory(p):
    (p / "dir.star").mkdir()
    return p / "dir.star", [], ["directory"], BOTH


@kind
def crlf(p):
    star = _star(p)
    star.write_bytes(star.read_bytes().replace(b"\n", b"\r\n"))
    return star, [], ["CRLF", "dos2unix"], BOTH


@kind
def gzip_star(p):
    star = _star(p)
    star.write_bytes(gzip.compress(star.read_bytes()))
    return star, [], ["gzip"], BOTH


@kind
def binary_star(p):
    star = _star(p)
    star.write_bytes(bytes(range(256)) * 8)
    return star, [], ["binary"], BOTH


@kind
def empty_optics(p):
    star = _replace(_star(p), b"1 opticsGroup1 300.0 2.7 0.1 1.5 32 2\n", b"")
    return star, [], ["data_optics", "no rows"], BOTH


@kind
def short_row(p):
    star = _star(p)
    lines = star.read_text().split("\n")
    i = _rows(star.read_text())[3]
    lines[i] = " ".join(lines[i].split()[:-2])
    star.write_text("\n".join(lines))
    return star, [], ["row 4", "7 fields"], BOTH


@kind
def long_row(p):
    star = _star(p)
    lines = star.read_text().split("\n")
    i = _rows(star.read_text())[5]
    lines[i] += " 7.0"
    star.write_text("\n".join(lines))
    return star, [], ["row 6", "10 fields"], BOTH


@kind
def long_first_row(p):  # pandas would drop the extra field with only a warning
    star = _star(p)
    lines = star.read_text().split("\n")
    i = _rows(star.read_text())[0]
    lines[i] += " 7.0"
    star.write_text("\n".join(lines))
    return star, [], ["row 1", "10 fields"], BOTH


@kind
def non_utf8_in_row(p):
    # a Latin-1 byte in one image name: read as Latin-1, the stack is not found by that name
    star = _replace(_star(p), b"000003@stacks/mic_00001.mrcs", b"000003@stacks/mic_0000\xe9.mrcs")
    return star, [], ["row 3", "mic_0000é.mrcs"], BOTH


@kind
def duplicate_label(p):
    star = _replace(_star(p), b"_rlnDefocusV #5", b"_rlnDefocusU #5")
    return star, [], ["rlnDefocusU", "twice"], BOTH


@kind
def optics_group_unknown(p):
    return _edit_row(p, 2, 2, "7"), [], ["row 2", "rlnOpticsGroup 7"], BOTH


@kind
def no_particle_rows(p):
    star = _star(p)
    star.write_text("\n".join(ln for ln in star.read_text().split("\n") if "@stacks/" not in ln))
    return star, [], ["data_particles", "no particles"], BOTH


@kind
def model_star(p):
    star = _star(p)
    star.write_text("data_model_general\n_rlnReferenceDimensionality 2\n")
    return star, [], ["model"], BOTH


@kind
def loop_before_data(p):
    star = _star(p)
    star.write_text("loop_\n_rlnImageName #1\n1@a.mrcs\n")
    return star, [], ["line 1", "loop_"], BOTH


@kind
def zero_pixel_size(p):
    star = _replace(_star(p), b" 0.1 1.5 32 2", b" 0.1 0.0 32 2")
    return star, [], ["row 1", "pixel size 0"], BOTH


# --- image stacks
@kind
def truncated_stack(p):
    stack = p / STACK1
    stack.write_bytes(stack.read_bytes()[:5000])
    return _star(p), [], ["mic_00001.mrcs", "truncated"], BOTH


@kind
def stack_shorter_than_header(p):
    (p / STACK1).write_bytes(b"\0" * 100)
    return _star(p), [], ["mic_00001.mrcs", "shorter than an MRC header"], BOTH


@kind
def garbage_stack(p):
    (p / STACK1).write_bytes(b"\x07" * 5000)
    return _star(p), [], ["mic_00001.mrcs", "mode"], BOTH


@kind
def stack_bad_mode(p):
    return _mrc_header(p, 12, 17), [], ["mic_00001.mrcs", "mode 17"], BOTH


@kind
def stack_bad_nz(p):
    return _mrc_header(p, 8, -5), [], ["mic_00001.mrcs", "32x32x-5"], BOTH


@kind
def stack_bad_nx(p):
    return _mrc_header(p, 0, 0), [], ["mic_00001.mrcs", "impossible"], BOTH


@kind
def stack_is_directory(p):
    (p / STACK1).unlink()
    (p / STACK1).mkdir()
    return _star(p), [], ["mic_00001.mrcs"], BOTH


# --- CryoSPARC .cs
@kind
def missing_stack_cs(p):
    (p / "stacks" / "mic_00002.mrcs").unlink()
    return p / "particles.cs", [], ["row 31", "mic_00002.mrcs", "not found"], BOTH


@kind
def empty_cs(p):
    (p / "particles.cs").write_bytes(b"")
    return p / "particles.cs", [], ["empty"], BOTH


@kind
def garbage_cs(p):
    (p / "particles.cs").write_bytes(b"\x93NUMPY garbage" * 50)
    return p / "particles.cs", [], ["not a CryoSPARC .cs dataset"], BOTH


@kind
def truncated_cs(p):
    cs = p / "particles.cs"
    cs.write_bytes(cs.read_bytes()[:700])
    return cs, [], ["not a CryoSPARC .cs dataset"], BOTH


@kind
def cs_without_blob(p):
    path = _cs(p, lambda f: [(k, v) for k, v in f if not k.startswith("blob/")])
    return path, [], ["blob/"], BOTH


@kind
def cs_missing_defocus(p):
    return _cs(p, lambda f: [(k, v) for k, v in f if k != "ctf/df1_A"]), [], ["ctf/df1_A"], BOTH


@kind
def cs_zero_rows(p):
    return _cs(p, lambda f: [(k, v[:0]) for k, v in f]), [], ["0 rows"], BOTH


@kind
def cs_idx_float(p):
    return _cs(p, _set("blob/idx", lambda v: v + 0.5)), [], ["blob/idx", "float64"], BOTH


@kind
def cs_idx_text(p):
    path = _cs(p, _set("blob/idx", lambda v: v.astype(str).astype(object)))
    return path, [], ["blob/idx", "integers"], BOTH


@kind
def cs_path_numbers(p):
    path = _cs(p, _set("blob/path", lambda v: np.arange(len(v))))
    return path, [], ["blob/path", "text"], BOTH


@kind
def cs_shape_1d(p):
    return _cs(p, _set("blob/shape", lambda v: v[:, 0].copy())), [], ["blob/shape"], BOTH


@kind
def cs_shape_not_square(p):
    path = _cs(p, _set("blob/shape", lambda v: v * np.array([1, 2], dtype=v.dtype)))
    return path, [], ["blob/shape", "not square"], BOTH


@kind
def cs_psize_text(p):
    return _cs(p, _set("blob/psize_A", _text)), [], ["blob/psize_A", "numbers"], BOTH


@kind
def cs_defocus_text(p):
    return _cs(p, _set("ctf/df1_A", _text)), [], ["ctf/df1_A"], BOTH


@kind
def cs_voltage_text(p):
    return _cs(p, _set("ctf/accel_kv", _text)), [], ["ctf/accel_kv"], BOTH


@kind
def cs_sign_text(p):
    return _cs(p, _set("blob/sign", _text)), [], ["blob/sign"], BOTH


@kind
def cs_sign_zero(p):
    return _cs(p, _set("blob/sign", lambda v: v * 0)), [], ["row 1", "blob/sign"], BOTH


@kind
def cs_phase_text(p):
    return _cs(p, _set("ctf/phase_shift_rad", _text)), [], ["ctf/phase_shift_rad"], BOTH


@kind
def cs_path_escapes_project(p):
    path = _cs(p, _set("blob/path", lambda v: np.array(["../../etc/passwd"] * len(v), object)))
    return path, ["--project-dir", str(p)], ["blob/path", "../../etc/passwd", "outside"], BOTH


@kind
def cs_path_absolute(p):
    path = _cs(p, _set("blob/path", lambda v: np.array(["/etc/passwd"] * len(v), object)))
    return path, [], ["blob/path", "/etc/passwd", "outside"], BOTH


# --- parameters and output directory (classify only)
@kind
def more_classes_than_particles(p):
    return _star(p), ["--n-classes", "100"], ["100 classes"], ("classify",)


@kind
def out_is_a_file(p):
    (p / "out").write_text("not a directory")
    return _star(p), [], ["out", "is a file"], ("classify",)


@kind
def out_under_a_file(p):
    (p / "out").write_text("not a directory")
    return _star(p), ["--out", str(p / "out" / "deeper")], ["a parent", "is a file"], ("classify",)


@kind
def out_locked_by_another_run(p):
    (p / "out").mkdir()
    (p / "out" / LOCK_FILE).write_text('{"pid": 4242, "host": "otherhost", "started": "now"}\n')
    return _star(p), [], ["another companion run", "pid 4242", "otherhost"], ("classify",)


@kind
def damaged_checkpoint_on_continue(p):
    ckpt = p / "out" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "state.npz").write_bytes(b"PK\x03\x04 truncated zip")
    return _star(p), ["--continue"], ["checkpoint", "damaged"], ("classify",)


def _tree(root: Path) -> dict[str, str]:
    """{relative path: content hash} of every file under ``root`` (directories marked)."""
    out = {}
    for q in sorted(root.rglob("*")):
        rel = str(q.relative_to(root))
        out[rel] = hashlib.sha1(q.read_bytes()).hexdigest() if q.is_file() else "<dir>"
    return out


def test_catalogue_has_at_least_40_kinds():
    assert len(KINDS) >= 40, len(KINDS)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_bad_input_is_one_line_exit_2(sim, tmp_path, capsys, name):
    proj = tmp_path / "proj"
    shutil.copytree(sim, proj)
    path, extra, must, commands = KINDS[name](proj)
    held = None
    if name == "out_locked_by_another_run":  # a live holder: the lock is taken, not stale
        held = os.open(proj / "out" / LOCK_FILE, os.O_RDWR)
        fcntl.flock(held, fcntl.LOCK_EX)
    before = _tree(proj)
    try:
        for cmd in commands:
            argv = [cmd, str(path)]
            if cmd == "classify":
                argv += FAST if "--out" in extra else ["--out", str(proj / "out"), *FAST]
            argv += extra
            rc = cli_main(argv)
            cap = capsys.readouterr()
            err = cap.err.strip().splitlines()
            assert rc == 2, (cmd, rc, cap.err[-2000:])
            assert "Traceback" not in cap.out + cap.err
            assert "Warning" not in cap.err, cap.err  # no numpy/mrcfile warnings leak
            errors = [ln for ln in err if ln.startswith(f"companion {cmd}: error:")]
            assert errors and err[-1] == errors[-1], err[-3:]  # the last line is the error
            if cmd == "classify":
                assert len(errors) == 1, errors
            for text in must:
                assert text in errors[-1], (cmd, text, errors[-1])
            assert _tree(proj) == before, f"{cmd} changed or left files"
    finally:
        if held is not None:
            os.close(held)
