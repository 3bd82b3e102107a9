"""Reading and writing STAR files: fast, exact, RELION-compatible.

``read_star`` parses every data block (loops into DataFrames via pandas' C parser, key-value
blocks into dicts); ``write_star`` writes blocks with a hand-written header and a vectorised
body (see :mod:`companion.relion.star_format`), atomically. Columns whose RELION label holds
text (names, paths, Zernike lists) are always read as strings, so ``0001`` stays ``0001``.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from companion.errors import InputError
from companion.io.atomic import atomic_path
from companion.relion.star_format import escape_string, format_value, iter_table_bytes

Block = pd.DataFrame | dict[str, Any]

DEFAULT_VERSION = "30001"
_STRING_LABEL = re.compile(r"Name|Image$|File$|Filename$|Metadata$|Zernike$|Spectrum$|Label$")
_NUMERIC_NA = ["nan", "-nan", "NaN", "-NaN", "NAN", "<NA>"]
_VERSION_RE = re.compile(rb"#\s*version\s+(\d+)")
# a loop body ends at the first blank line, comment, new block, new loop or label line
_BODY_END = re.compile(rb"\n[ \t]*(?:\n|#|data_|loop_|_)|\n[ \t]*$")


def is_string_label(label: str) -> bool:
    """True for RELION labels that hold text (names, paths, lists), read as strings."""
    return bool(_STRING_LABEL.search(label))


@dataclass
class StarFile:
    """Parsed STAR file: blocks in file order and the ``# version`` found (or None)."""

    path: Path
    blocks: dict[str, Block] = field(default_factory=dict)
    version: str | None = None
    notes: list[str] = field(default_factory=list)


def read_star(path: str | Path) -> dict[str, Block]:
    """All data blocks of a STAR file: ``{name: DataFrame | dict}`` (``data_`` stripped)."""
    return parse_star(Path(path)).blocks


def parse_star(path: Path, data: bytes | None = None, *, allow_crlf: bool = False) -> StarFile:
    """Parse ``path`` (or its already-read bytes); raise InputError on malformed text."""
    if data is None:
        data = read_bytes(path)
    check_text(path, data)
    encoding = text_encoding(path, data)
    if b"\r" in data:
        if not allow_crlf:
            raise InputError(crlf_message(path, data))
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    star = StarFile(path=path)
    if encoding != "utf-8":
        star.notes.append(encoding_note(path, data))
    pos, n = 0, len(data)
    name: str | None = None
    while pos < n:
        end = _line_end(data, pos)
        line = data[pos:end].strip()
        if line.startswith(b"#"):
            m = _VERSION_RE.match(line)
            if m and star.version is None:
                star.version = m.group(1).decode()
        elif line.startswith(b"data_"):
            name = line[5:].decode(errors="replace").strip()
            if name in star.blocks:
                star.notes.append(f"{path}: block data_{name} appears twice; the first is used")
                name = f"{name}#{len(star.blocks)}"
            star.blocks[name] = {}
        elif line.startswith(b"loop_"):
            if name is None:
                raise InputError(f"{path}: line {_lineno(data, pos)}: loop_ before any data_ block")
            star.blocks[name], end = _parse_loop(path, data, end + 1, name, encoding)
        elif line.startswith(b"_") and name is not None:
            block = star.blocks[name]
            if isinstance(block, dict):
                key, *value = line.decode(errors="replace").split(None, 1)
                block[key[1:]] = _scalar(value[0].strip() if value else "")
        pos = end + 1
    return star


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found — check the path") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory — give a STAR file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None


def check_text(path: Path, data: bytes) -> None:
    """InputError for a compressed or binary file (before its bytes are parsed as text)."""
    if data[:2] == b"\x1f\x8b":
        raise InputError(f"{path}: gzip-compressed, not a STAR text file — run `gunzip` first")
    if data[:4] in (b"BZh9", b"PK\x03\x04", b"\xfd7zX"):
        raise InputError(f"{path}: a compressed archive, not a STAR text file — unpack it first")
    nul = data.find(b"\0", 0, 1 << 16)
    if nul >= 0:
        raise InputError(
            f"{path}: line {_lineno(data, nul)}: binary data (a NUL byte), not a STAR text file "
            "— give the particles .star file"
        )


def text_encoding(path: Path, data: bytes) -> str:
    """``"utf-8"``, or ``"latin-1"`` when the bytes are not valid UTF-8 (every byte decodes)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "latin-1"
    return "utf-8"


def encoding_note(path: Path, data: bytes) -> str:
    try:
        data.decode("utf-8")
        return ""
    except UnicodeDecodeError as exc:
        pos = exc.start
    return (
        f"{path}: line {_lineno(data, pos)}: byte 0x{data[pos]:02x} is not UTF-8 — the file was "
        "read as Latin-1; check the names on that line"
    )


def crlf_message(path: Path, data: bytes) -> str:
    line = data.count(b"\n", 0, data.index(b"\r")) + 1
    return (
        f"{path}: line {line}: Windows (CRLF) line endings — RELION rejects them too; "
        f"convert the file with `dos2unix {path}` (or `sed -i 's/\\r$//' {path}`)"
    )


def _line_end(data: bytes, pos: int) -> int:
    end = data.find(b"\n", pos)
    return len(data) if end < 0 else end


def _lineno(data: bytes, pos: int) -> int:
    return data.count(b"\n", 0, pos) + 1


def _scalar(text: str) -> Any:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _parse_loop(
    path: Path, data: bytes, pos: int, name: str, encoding: str = "utf-8"
) -> tuple[pd.DataFrame, int]:
    """Parse the loop whose labels start at ``pos``; return the table and its last position."""
    labels: list[str] = []
    n = len(data)
    while pos < n:
        end = _line_end(data, pos)
        line = data[pos:end].strip()
        if line.startswith(b"_"):
            labels.append(line.split()[0][1:].decode(errors="replace"))
        elif line and not line.startswith(b"#"):
            break
        elif labels and not line:
            break
        pos = end + 1
    if not labels:
        raise InputError(f"{path}: data_{name}: loop_ without column labels")
    dup = pd.Index(labels)[pd.Index(labels).duplicated()]
    if len(dup):
        raise InputError(f"{path}: data_{name}: label {dup[0]} appears twice — remove one")
    if pos >= n:
        return _parse_body(path, b"", labels, name), n
    m = _BODY_END.search(data, pos - 1)
    stop = n if m is None else m.start() + 1
    return _parse_body(path, data[pos:stop], labels, name, encoding), stop - 1


def _parse_body(
    path: Path, body: bytes, labels: list[str], name: str, encoding: str = "utf-8"
) -> pd.DataFrame:
    if not body or body.isspace():
        return pd.DataFrame({lab: pd.Series(dtype=object) for lab in labels})
    str_cols = {lab: str for lab in labels if is_string_label(lab)}
    try:
        with warnings.catch_warnings():
            # pandas only warns (and drops the extra fields) when the first row is too long
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = _read_table(body, labels, str_cols, encoding)
    except pd.errors.ParserWarning:
        lines = body.split(b"\n")
        i = next((k for k, ln in enumerate(lines) if len(ln.split()) > len(labels)), 0)
        raise InputError(
            f"{path}: data_{name} row {i + 1}: {len(lines[i].split())} fields but {len(labels)} "
            "column labels — fix or remove that row"
        ) from None
    except pd.errors.ParserError as exc:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if m:
            raise InputError(
                f"{path}: data_{name} row {m.group(2)}: {m.group(3)} fields but {len(labels)} "
                "column labels — fix or remove that row"
            ) from None
        raise InputError(f"{path}: data_{name}: cannot parse the table ({exc})") from None
    _check_short_rows(path, body, df, name)
    return df


def _read_table(
    body: bytes, labels: list[str], str_cols: dict[str, type], encoding: str
) -> pd.DataFrame:
    return pd.read_csv(
        io.BytesIO(body),
        sep=r"\s+",
        header=None,
        names=labels,
        dtype=str_cols,
        keep_default_na=False,
        na_values={lab: _NUMERIC_NA for lab in labels if lab not in str_cols},
        engine="c",
        low_memory=False,
        quotechar='"',
        index_col=False,
        encoding=encoding,
    )


def _check_short_rows(path: Path, body: bytes, df: pd.DataFrame, name: str) -> None:
    last = df.iloc[:, -1]
    missing = last.isna().to_numpy().copy()
    if not pd.api.types.is_numeric_dtype(last):  # a missing field reads as "" here
        missing |= (last.astype(str) == "").to_numpy()
    cand = np.flatnonzero(missing)
    if cand.size == 0:
        return
    lines = body.split(b"\n")
    ncol = df.shape[1]
    for i in cand:
        got = len(lines[i].split())
        if got < ncol:
            raise InputError(
                f"{path}: data_{name} row {i + 1}: {got} fields but {ncol} column labels "
                "— fix or remove that row"
            )


def write_star(
    path: str | Path,
    blocks: Mapping[str, Block],
    version_comment: str | int | None = DEFAULT_VERSION,
    *,
    approximate: Collection[str] = (),
) -> None:
    """Write ``blocks`` (``{name: DataFrame | dict}``) as a STAR file, atomically.

    DataFrames become ``loop_`` tables, dicts key-value blocks; names are given without
    ``data_``. ``version_comment`` is written before every block as RELION does: an int or
    digits (``30001`` → ``# version 30001``), a full ``#`` line, or None for none. Booleans are
    written as 0/1, missing numbers as ``nan``, never ``<NA>``; floats read back exactly.
    The file appears complete or not at all (temporary file, then rename).
    ``approximate``: labels of float columns that may be written at RELION's precision
    (6 decimals, more for tiny values) when no short exact form exists — for newly computed
    values, where exactness is not worth a slow shortest-repr pass.
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb", buffering=1 << 20) as f:
        _write_blocks(f, blocks, version_comment, approximate)


def format_star(
    blocks: Mapping[str, Block],
    version_comment: str | int | None = DEFAULT_VERSION,
    *,
    approximate: Collection[str] = (),
) -> str:
    """The text ``write_star`` writes for ``blocks`` (for small files built in memory)."""
    buf = io.BytesIO()
    _write_blocks(buf, blocks, version_comment, approximate)
    return buf.getvalue().decode()


def _write_blocks(
    f: Any,
    blocks: Mapping[str, Block],
    version_comment: str | int | None,
    approximate: Collection[str],
) -> None:
    comment = _version_line(version_comment)
    for name, block in blocks.items():
        bname = name[5:] if name.startswith("data_") else name
        f.write(f"\n{comment}\ndata_{bname}\n\n".encode())
        if isinstance(block, pd.DataFrame):
            _write_loop(f, block, approximate)
        else:
            _write_pairs(f, block)


def _version_line(version_comment: str | int | None) -> str:
    if version_comment is None:
        return ""
    text = str(version_comment).strip()
    if text.startswith("#"):
        return text + "\n"
    if text.isdigit():
        return f"# version {text}\n"
    return f"# {text}\n"


def _write_loop(f: Any, df: pd.DataFrame, approximate: Collection[str]) -> None:
    header = ["loop_"] + [f"_{_label(c)} #{i + 1}" for i, c in enumerate(df.columns)]
    f.write(("\n".join(header) + "\n").encode())
    for chunk in iter_table_bytes(df, approximate=approximate):
        f.write(chunk)
    f.write(b"\n")


def _write_pairs(f: Any, pairs: Mapping[str, Any]) -> None:
    if not pairs:
        return
    width = max(len(_label(k)) for k in pairs) + 2
    lines = []
    for key, value in pairs.items():
        text = escape_string(str(value)) if isinstance(value, Path) else format_value(value)
        lines.append(f"_{_label(key):<{width}}{text}")
    f.write(("\n".join(lines) + "\n\n").encode())


def _label(name: Any) -> str:
    return str(name).lstrip("_")
