"""Fast, exact text formatting of STAR table columns.

Every column becomes a fixed-width block of bytes built with whole-array NumPy operations
(no per-value Python formatting on the common path): integers as integers, booleans as 0/1,
floats in fixed point with the fewest decimals (RELION's 6 for float64 columns) that read
back to exactly the same value, and strings as they are. Missing values are never written
as ``<NA>``: a missing number is ``nan`` and a missing string ``""`` (RELION's own escape).
Numbers are right-aligned and strings left-aligned, as ``relion_refine`` writes them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any, Protocol

import numpy as np
import pandas as pd

_SPACE, _MINUS, _DOT, _ZERO, _NL = 32, 45, 46, 48, 10
_POW10 = 10 ** np.arange(19, dtype=np.int64)
_EXACT_LIMIT = float(2**52)  # |value| * 10**d must stay below this for exact integer maths
CHUNK_ROWS = 1 << 18


class Column(Protocol):
    width: int

    def render(self, rows: slice) -> np.ndarray:
        """Bytes of ``rows``, transposed: uint8[width, len(rows)]."""
        ...


def _ndigits(a: np.ndarray) -> np.ndarray:
    """Number of decimal digits of non-negative int64 values (0 has one digit)."""
    nd = np.ones(a.shape, dtype=np.int64)
    top = int(a.max()) if a.size else 0
    k = 1
    while k < 19 and int(_POW10[k]) <= top:
        nd += a >= _POW10[k]
        k += 1
    return nd


def _put_digits(out: np.ndarray, a: np.ndarray, nd: np.ndarray, right: int) -> None:
    """Digits of ``a`` into ``out`` (width, n), right-aligned, the last in row ``right - 1``."""
    top = int(nd.max()) if nd.size else 0
    a = a.copy()
    for k in range(top):
        a, digit = np.divmod(a, 10)
        np.copyto(out[right - 1 - k], (digit + _ZERO).astype(np.uint8), where=k < nd)


class _IntColumn:
    def __init__(self, values: np.ndarray) -> None:
        self.values = np.asarray(values, dtype=np.int64)
        nd = _ndigits(np.abs(self.values))
        self.width = int((nd + (self.values < 0)).max()) if self.values.size else 1

    def render(self, rows: slice) -> np.ndarray:
        v = self.values[rows]
        a = np.abs(v)
        nd = _ndigits(a)
        out = np.full((self.width, len(v)), _SPACE, dtype=np.uint8)
        _put_digits(out, a, nd, self.width)
        neg = np.flatnonzero(v < 0)
        out[self.width - 1 - nd[neg], neg] = _MINUS
        return out


class _FixedColumn:
    """Floats in fixed point with ``decimals`` digits; nan/inf written as such."""

    def __init__(self, values: np.ndarray, decimals: int) -> None:
        self.values = values
        self.decimals = decimals
        finite = np.isfinite(values)
        ip = self._scaled(values[finite]) // _POW10[decimals]
        int_width = int((_ndigits(ip) + (values[finite] < 0)).max()) if ip.size else 1
        self.width = int_width + 1 + decimals
        if not finite.all():
            self.width = max(self.width, 4)

    def _scaled(self, v: np.ndarray) -> np.ndarray:
        return np.rint(np.abs(v.astype(np.float64)) * float(_POW10[self.decimals])).astype(np.int64)

    def render(self, rows: slice) -> np.ndarray:
        v = self.values[rows]
        d, w = self.decimals, self.width
        finite = np.isfinite(v)
        s = self._scaled(np.where(finite, v, 0))
        ip, fp = s // _POW10[d], s % _POW10[d]
        out = np.full((w, len(v)), _SPACE, dtype=np.uint8)
        if d:
            _put_digits(out, fp, np.full(len(v), d, dtype=np.int64), w)
            out[w - d - 1] = _DOT
        right = w - d - 1 if d else w
        nd = _ndigits(ip)
        _put_digits(out, ip, nd, right)
        neg = np.flatnonzero((v < 0) & (s > 0))
        out[right - 1 - nd[neg], neg] = _MINUS
        for row in np.flatnonzero(~finite):
            text = str(float(v[row])).encode()
            out[:, row] = _SPACE
            out[w - len(text) :, row] = np.frombuffer(text, dtype=np.uint8)
        return out


class _StringColumn:
    """Strings, left-aligned: a byte matrix of the values (or of the categories + codes)."""

    def __init__(self, table: np.ndarray, codes: np.ndarray | None = None) -> None:
        self.table = table
        self.codes = codes
        self.width = table.shape[1]

    @classmethod
    def of(cls, values: pd.Series | np.ndarray) -> _StringColumn:
        s = pd.Series(values, copy=False)
        if isinstance(s.dtype, pd.CategoricalDtype):
            texts = s.cat.categories.astype(str).tolist() + ['""']
            codes = np.asarray(s.cat.codes)
            return cls(_text_matrix(texts), np.where(codes < 0, len(texts) - 1, codes))
        texts = s.to_numpy(dtype=object)
        na = s.isna().to_numpy()
        if na.any():
            texts = texts.copy()
            texts[na] = '""'
        return cls(_text_matrix(texts))

    def render(self, rows: slice) -> np.ndarray:
        m = self.table[rows] if self.codes is None else self.table[self.codes[rows]]
        return m.T


def _text_matrix(texts: Any) -> np.ndarray:
    """uint8[len(texts), width]: UTF-8 bytes, left-aligned, space-padded, STAR-escaped."""
    m = _bytes_matrix(texts)
    bad = (m[:, 0] == 0) | ((m == _SPACE) | (m == 9) | (m == _NL) | (m == 13)).any(axis=1)
    if bad.any():
        texts = [str(t) for t in texts]
        for i in np.flatnonzero(bad).tolist():
            texts[i] = escape_string(" ".join(texts[i].splitlines()))
        m = _bytes_matrix(texts)
    m[m == 0] = _SPACE
    return m


def _bytes_matrix(texts: Any) -> np.ndarray:
    try:
        arr = np.array(texts, dtype=np.bytes_)
    except UnicodeEncodeError:
        arr = np.array([str(t).encode() for t in texts], dtype=np.bytes_)
    width = max(1, arr.dtype.itemsize)
    arr = np.ascontiguousarray(arr.astype(f"S{width}", copy=False))
    return arr.view(np.uint8).reshape(len(arr), width)


def escape_string(text: str) -> str:
    """RELION's STAR escape: empty or whitespace-holding strings are double-quoted."""
    if text == "" or any(c.isspace() for c in text):
        return '"' + text.replace('"', "'") + '"'
    return text


def float_decimals(values: np.ndarray) -> int | None:
    """Fewest fixed-point decimals that write ``values`` so they read back exactly.

    float64 columns try RELION's 6 first, then 9, 12, 15; float32 columns try 1..9 (the value
    read back in double precision and rounded to float32 must equal the input). None when no
    fixed-point form is exact (the caller falls back to shortest round-trip repr).
    """
    is32 = values.dtype == np.float32
    a = np.abs(values[np.isfinite(values)]).astype(np.float64)
    if a.size == 0:
        return 6
    top = float(a.max())
    for d in range(1, 10) if is32 else (6, 9, 12, 15):
        scale = float(_POW10[d])
        if top * scale >= _EXACT_LIMIT:
            break
        back = np.rint(a * scale) / scale
        same = back.astype(np.float32) == a.astype(np.float32) if is32 else back == a
        if same.all():
            return d
    return None


def relion_decimals(values: np.ndarray) -> int | None:
    """Decimals for RELION's precision (%.6f), more when small values need them to keep
    about four significant digits; None when values are too large for fixed point."""
    a = np.abs(values[np.isfinite(values)]).astype(np.float64)
    a = a[a > 0]
    if a.size == 0:
        return 6
    top, d = float(a.max()), 6
    small = float(a.min())
    if small < 1e-3:
        d = min(15, 6 + int(np.ceil(-np.log10(small))) - 3)
    while d > 6 and top * float(_POW10[d]) >= _EXACT_LIMIT:
        d -= 1
    return d if top * float(_POW10[d]) < _EXACT_LIMIT else None


def column_formatter(values: Any, exact: bool = True) -> Column:
    """A formatter for one column (pandas Series or array-like) of any dtype.

    ``exact=False`` lets float columns be written at RELION's precision (see
    :func:`relion_decimals`) when no short fixed-point form reads back exactly.
    """
    s = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values), copy=False)
    dtype = s.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        return _StringColumn.of(s)
    if pd.api.types.is_object_dtype(dtype):
        kind = pd.api.types.infer_dtype(s, skipna=True)
        if kind in ("integer", "boolean") and not s.isna().any():
            return _IntColumn(s.astype(np.int64).to_numpy())
        if kind in ("floating", "mixed-integer-float", "integer"):
            return _float_formatter(s.astype(np.float64).to_numpy(), exact)
        return _StringColumn.of(s)
    if pd.api.types.is_bool_dtype(dtype):
        if s.isna().any():
            return _float_formatter(s.astype("float64").to_numpy())
        return _IntColumn(s.to_numpy(dtype=np.int64))
    if pd.api.types.is_integer_dtype(dtype):
        if s.isna().any():
            return _float_formatter(s.astype("float64").to_numpy(na_value=np.nan))
        return _IntColumn(s.to_numpy(dtype=np.int64))
    if pd.api.types.is_float_dtype(dtype):
        arr = s.to_numpy(na_value=np.nan) if s.hasnans else s.to_numpy()
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float64)
        return _float_formatter(arr, exact)
    return _StringColumn.of(s.astype(str))


def _float_formatter(arr: np.ndarray, exact: bool = True) -> Column:
    d = float_decimals(arr)
    if d is None and not exact:
        d = relion_decimals(arr)
    if d is None:
        return _StringColumn.of(arr.astype(str))  # NumPy's shortest round-trip repr
    return _FixedColumn(arr, d)


def format_value(value: Any) -> str:
    """One value as STAR text (for key-value blocks), same rules as a column."""
    if isinstance(value, str):
        return escape_string(value)
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    col = column_formatter(pd.Series([value]))
    return col.render(slice(0, 1)).T.tobytes().decode().strip()


def iter_table_bytes(
    df: pd.DataFrame, chunk_rows: int = CHUNK_ROWS, approximate: Collection[str] = ()
) -> Iterator[bytes]:
    """The body of a loop table as bytes, one chunk of rows at a time.

    Float columns named in ``approximate`` may be written at RELION's precision.
    """
    cols = [
        column_formatter(df.iloc[:, j], exact=str(df.columns[j]) not in approximate)
        for j in range(df.shape[1])
    ]
    if not cols:
        return
    widths = [c.width for c in cols]
    total = sum(widths) + len(widths)
    n = len(df)
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(n, start + chunk_rows))
        block = np.empty((total, rows.stop - rows.start), dtype=np.uint8)
        pos = 0
        for col, w in zip(cols, widths, strict=True):
            block[pos : pos + w] = col.render(rows)
            block[pos + w] = _SPACE
            pos += w + 1
        block[-1] = _NL
        yield block.T.tobytes()
