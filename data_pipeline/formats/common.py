"""What every input format shares: the chunk they yield, errors, bad-row accounting and the streaming readers.

A format (``formats/aliccp.py``, ``csvfmt.py``, ``table.py``) is a ``Source``: it checks its inputs up front (files,
headers, schemas, declared columns) and then streams ``RawChunk``s per input role, never holding a whole input. A
chunk holds validated 0/1 labels, the raw categorical values of every field (int64 or string, null = missing; bags as
list arrays) and, for time splits, a timestamp per row. Everything after that (splits, chain policy, vocabulary,
encoding, writing) is format-independent and lives in ``data_pipeline/prepare.py``.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

Progress = Callable[[int], None]  # called with the number of input bytes consumed since the last call


class PrepareError(ValueError):
    """Bad input or options. The message names the file, column and row where it applies and says what to do."""


@dataclass
class FieldDef:
    """A field to extract. multi_valued: a bag (list of ids per row); weighted: the bag also carries a float weight
    per id (the Ali-CCP feature value, e.g. a count for the *_14 history fields), written as ``<name>__weights``."""

    name: str
    multi_valued: bool = False
    weighted: bool = False


@dataclass
class RawChunk:
    """Consecutive rows of one input file. ``index``: (n,) int64 ordinal of each row among the parsed rows of its
    input role (rows later found malformed included), so seeded random splits depend neither on block sizes nor on
    which rows get dropped."""

    file: str
    rows: np.ndarray  # (n,) int64 1-based data-row number within the file, for messages
    index: np.ndarray  # (n,) int64, see above
    labels: np.ndarray  # (n, T) int8 in {0, 1}
    features: Dict[str, pa.Array]  # single: int64/string array; bag: list array
    weights: Dict[str, pa.Array] = field(default_factory=dict)  # weighted bag -> list<float32> aligned with its ids
    time: Optional[np.ndarray] = None  # (n,) int64 microseconds since the epoch (UTC), for time splits

    @property
    def n(self) -> int:
        return len(self.index)

    def take(self, mask: np.ndarray) -> RawChunk:
        """The rows where the boolean ``mask`` is true."""
        idx = pa.array(np.flatnonzero(mask))
        return RawChunk(
            file=self.file,
            rows=self.rows[mask],
            index=self.index[mask],
            labels=self.labels[mask],
            features={k: v.take(idx) for k, v in self.features.items()},
            weights={k: v.take(idx) for k, v in self.weights.items()},
            time=None if self.time is None else self.time[mask],
        )


class BadRows:
    """Malformed rows, counted by reason (with the first example of each) and skipped, up to ``limit`` in all
    (negative: no limit); past it, a PrepareError."""

    def __init__(self, limit: int):
        self.limit = limit
        self.counts: Dict[str, int] = {}
        self.by_role: Dict[str, Dict[str, int]] = {}
        self.examples: Dict[str, str] = {}
        self.role = "train"

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, where: str, text: str = "", n: int = 1) -> None:
        if n <= 0:
            return
        self.counts[reason] = self.counts.get(reason, 0) + n
        role = self.by_role.setdefault(self.role, {})
        role[reason] = role.get(reason, 0) + n
        if reason not in self.examples:
            snippet = text if len(text) <= 120 else text[:117] + "..."
            self.examples[reason] = f"{where}: {snippet!r}" if text else where

    def check(self) -> None:
        if 0 <= self.limit < self.total:
            detail = "; ".join(f"{r}: {n} (first: {self.examples[r]})" for r, n in sorted(self.counts.items()))
            raise PrepareError(
                f"{self.total} malformed rows, more than --max-bad-rows={self.limit} ({detail}). The input looks "
                "damaged or is not in the expected layout; fix it, or raise --max-bad-rows to skip them"
            )


# ---------------------------------------------------------------------------------------------------------- files


def expand_inputs(path: str, exts: Sequence[str]) -> List[str]:
    """A file, or the files in a folder whose names end with one of ``exts`` (sorted); a PrepareError if none."""
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f)
            for f in os.listdir(path)
            if any(f.endswith(e) for e in exts) and not f.startswith((".", "_"))
        )
        if not files:
            raise PrepareError(f"{path}: folder holds no {'/'.join(exts)} files")
        return files
    if not os.path.isfile(path):
        raise PrepareError(f"{path}: no such file or folder")
    return [path]


def open_text(path: str):
    """Binary file object over the decompressed bytes (.gz) or the file itself."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def first_line(path: str, max_bytes: int = 1 << 22) -> str:
    with open_text(path) as f:
        raw = f.readline(max_bytes)
    return raw.decode("utf-8", errors="replace").rstrip("\r\n")


def file_size(path: str) -> int:
    return os.path.getsize(path)


def is_number(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- streaming CSV


@dataclass
class CsvLayout:
    """How to read one CSV file: the column names and whether its first line is a header."""

    names: List[str]
    header: bool
    delimiter: str = ","
    quoting: bool = True


def _open_input(path: str):
    """(raw file, stream of decompressed bytes); ``raw.tell()`` is the progress in input bytes."""
    raw = open(path, "rb")
    if path.endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    return raw, raw


def line_blocks(stream, block_bytes: int) -> Iterator[bytes]:
    """The stream in blocks of about ``block_bytes`` that end at a line end (the last may not). Memory: one block
    (plus the longest line, if a line is longer than a block)."""
    rest = b""
    while True:
        data = stream.read(block_bytes)
        if not data:
            if rest:
                yield rest
            return
        buf = rest + data if rest else data
        cut = buf.rfind(b"\n")
        if cut < 0:
            rest = buf
            continue
        yield buf[: cut + 1]
        rest = buf[cut + 1:]


def stream_csv(
    path: str,
    layout: CsvLayout,
    types: Dict[str, pa.DataType],
    bad: BadRows,
    progress: Optional[Progress],
    block_bytes: int,
) -> Iterator[Tuple[int, pa.RecordBatch]]:
    """Yield (number of data rows before this batch, batch) over the columns in ``types`` (read with those types).

    The file is cut into line-aligned blocks here and each block parsed on its own, so exactly one block is in memory
    (Arrow's streaming CSV reader reads up to 32 blocks ahead). Values may therefore not contain line breaks. Rows
    with the wrong number of columns are counted in ``bad`` as 'wrong_column_count' and skipped. A value that does
    not convert to its type raises a PrepareError naming the column, row and value."""
    n_cols = len(layout.names)
    lines_before = 0

    def on_invalid(row) -> str:
        line = f"line {lines_before + row.number}" if row.number is not None else "a line"
        bad.add("wrong_column_count", f"{path}: {line} has {row.actual_columns} of {row.expected_columns} columns",
                row.text)
        return "skip"

    parse = pcsv.ParseOptions(delimiter=layout.delimiter, quote_char='"' if layout.quoting else False,
                              invalid_row_handler=on_invalid)
    convert = pcsv.ConvertOptions(column_types=types, include_columns=list(types), strings_can_be_null=False)
    raw, stream = _open_input(path)
    done, pos, first = 0, 0, True
    try:
        for block in line_blocks(stream, block_bytes):
            skip = 1 if first and layout.header else 0
            first = False
            read = pcsv.ReadOptions(column_names=layout.names, skip_rows=skip, block_size=len(block) + 1,
                                    use_threads=False)
            try:
                table = pcsv.read_csv(pa.py_buffer(block), read_options=read, parse_options=parse,
                                      convert_options=convert)
            except pa.ArrowInvalid as e:
                if "Empty CSV file" in str(e):
                    table = None
                else:
                    raise _csv_error(path, layout, types, e, n_cols, block, read, parse, done) from None
            lines_before += block.count(b"\n")
            if progress is not None:
                now = raw.tell()
                progress(now - pos)
                pos = now
            bad.check()
            if table is not None and table.num_rows:
                batch = table.combine_chunks().to_batches()[0]
                yield done, batch
                done += batch.num_rows
    finally:
        if stream is not raw:
            stream.close()
        raw.close()


def _csv_error(path: str, layout: CsvLayout, types: Dict[str, pa.DataType], err: Exception, n_cols: int,
               block: bytes, read: pcsv.ReadOptions, parse: pcsv.ParseOptions, rows_before: int) -> PrepareError:
    """A PrepareError for an Arrow CSV failure: re-read the block as text to find the first value that does not
    convert (column, row, value); otherwise pass Arrow's message on."""
    msg = str(err)
    if "conversion error" in msg or "invalid value" in msg:
        text = pcsv.read_csv(pa.py_buffer(block), read_options=read, parse_options=parse,
                             convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in types},
                                                                 include_columns=list(types)))
        for name, t in types.items():
            if pa.types.is_string(t):
                continue
            for i, v in enumerate(text.column(name).to_pylist()):
                try:
                    pc.cast(pa.array([v], pa.string()), t)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    row = rows_before + i + 1
                    line = f" (line {row + (1 if layout.header else 0)})"
                    return PrepareError(f"{path}: column {name!r}, row {row}{line}: value {v!r} is not "
                                        f"{_type_word(t)}; fix the row (or drop the column from the features)")
    return PrepareError(f"{path}: cannot read as CSV with {n_cols} columns: {msg}")


def _type_word(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "an integer id (this format reads integer ids; use the 'table' format for string categories)"
    if pa.types.is_floating(t):
        return "a number"
    return str(t)


# ------------------------------------------------------------------------------------------------ row helpers


def row_words(path: str, header: Optional[bool]) -> Callable[[int], str]:
    """row -> 'path: row R' (1-based data row); for text files (header not None) with the line number, exact when no
    malformed row was skipped before it."""
    if header is None:
        return lambda row: f"{path}: row {row}"
    return lambda row: f"{path}: row {row} (line {row + (1 if header else 0)})"


def labels_matrix(
    cols: Sequence[pa.Array], names: Sequence[str], path: str, rows: np.ndarray, row_word: Callable[[int], str]
) -> np.ndarray:
    """(n, T) int8 labels from numeric/bool columns; a PrepareError at the first missing or non-0/1 value."""
    n = len(rows)
    out = np.zeros((n, len(names)), np.int8)
    for t, (col, name) in enumerate(zip(cols, names)):
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
            raise PrepareError(
                f"{path}: label column {name!r} has type {col.type}; labels must be 0/1 numbers or booleans"
            )
        if col.null_count:
            i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise PrepareError(f"{row_word(int(rows[i]))}: label column {name!r} is empty; every row needs a 0/1 "
                               "label (fill or drop such rows first)")
        v = col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        badm = (v != 0) & (v != 1)
        if badm.any():
            i = int(np.flatnonzero(badm)[0])
            raise PrepareError(
                f"{row_word(int(rows[i]))}: label column {name!r} has value {col[i].as_py()!r}, outside {{0, 1}}; "
                f"labels must be binary (binarize them first), {int(badm.sum())} such value(s) in this block"
            )
        out[:, t] = v
    return out


def parse_time_arg(value: str) -> int:
    """--test-after: ISO date or date-time (naive = UTC) -> microseconds since the epoch."""
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise PrepareError(f"--test-after {value!r} is not an ISO date or date-time (e.g. 2024-03-01 or "
                           "2024-03-01T12:00:00)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(round(dt.timestamp() * 1_000_000))


UNIT_US = {"s": 1_000_000, "ms": 1_000, "us": 1}


def time_us(col: pa.Array, name: str, unit: str, row_word: Callable[[int], str], rows: np.ndarray) -> np.ndarray:
    """(n,) int64 microseconds since the epoch from a timestamp/date column, an ISO string column or numbers in
    ``unit`` since the epoch; a PrepareError at the first missing or unparseable value."""
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if col.null_count:
        i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise PrepareError(f"{row_word(int(rows[i]))}: time column {name!r} is empty; every row needs a time")
    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return pc.cast(col, pa.timestamp("us", tz=getattr(t, "tz", None))).cast(pa.int64()).to_numpy(
            zero_copy_only=False)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        v = col.to_numpy(zero_copy_only=False).astype(np.float64) * UNIT_US[unit]
        return np.round(v).astype(np.int64)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        for target in (pa.timestamp("us"), pa.timestamp("us", tz="UTC")):
            try:
                return pc.cast(col, target).cast(pa.int64()).to_numpy(zero_copy_only=False)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
        for i, v in enumerate(col.to_pylist()):
            ok = False
            for target in (pa.timestamp("us"), pa.timestamp("us", tz="UTC")):
                try:
                    pc.cast(pa.array([v]), target)
                    ok = True
                    break
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    continue
            if not ok:
                raise PrepareError(f"{row_word(int(rows[i]))}: time column {name!r} has value {v!r}, not an ISO "
                                   "date/time (e.g. 2024-03-01 or 2024-03-01 12:00:00)")
    raise PrepareError(f"time column {name!r} has type {t}; it must be a timestamp, a date, an ISO date string or "
                       "a number of --time-unit since 1970-01-01")


# -------------------------------------------------------------------------------------------- feature lists


def parse_feature_list(
    text: pa.Array,
    fields: Sequence[FieldDef],
    entry_sep: str,
    kv_sep: str,
    val_sep: Optional[str],
) -> Tuple[Dict[str, pa.Array], Dict[str, pa.Array], np.ndarray, np.ndarray, np.ndarray]:
    """Parse rows of ``field<kv_sep>id[<val_sep>value]`` entries joined by ``entry_sep`` (Ali-CCP: \\x01, \\x02,
    \\x03), vectorised with Arrow compute.

    Returns (features, weights, entries, bad_entry, bad_id): per wanted field a (n,) int64 array (null where the row
    lacks the field; the first occurrence wins) or, for bags, a list<int64> array (+ list<float32> weights); the
    number of entries of each row; and (n,) masks of rows holding an entry without its separators / with a
    non-integer id or non-numeric value in a wanted field. An empty text is a row with no entries.
    """
    n = len(text)
    if text.null_count:
        text = text.fill_null("")
    parts = pc.split_pattern(text, entry_sep)
    parent = pc.list_parent_indices(parts).to_numpy()
    flat = pc.list_flatten(parts)
    empty_row = pc.equal(text, "").to_numpy(zero_copy_only=False)
    entries = pc.list_value_length(parts).to_numpy(zero_copy_only=False).astype(np.int64)
    entries[empty_row] = 0
    kv = pc.split_pattern(flat, kv_sep, max_splits=1)
    ok = pc.equal(pc.list_value_length(kv), 2).to_numpy(zero_copy_only=False)
    if val_sep is not None:
        ok &= pc.match_substring(flat, val_sep).to_numpy(zero_copy_only=False)
    real = ~empty_row[parent]  # the lone "" entry of an empty row is no entry
    bad_entry = np.zeros(n, bool)
    bad_entry[parent[real & ~ok]] = True
    names = [f.name for f in fields]
    code = pc.index_in(pc.list_element(kv, 0), value_set=pa.array(names, pa.string()))
    code_np = code.fill_null(-1).to_numpy(zero_copy_only=False)
    sel = np.flatnonzero(ok & (code_np >= 0))
    code_np, parent_sel = code_np[sel], parent[sel]
    rest = pc.list_element(kv.take(pa.array(sel)), 1)
    val_txt = None
    if val_sep is not None:
        iv = pc.split_pattern(rest, val_sep, max_splits=1)
        id_txt = pc.list_element(iv, 0)
        val_txt = pc.list_element(iv, 1)
    else:
        id_txt = rest
    id_ok = pc.and_(pc.utf8_is_digit(id_txt), pc.less_equal(pc.utf8_length(id_txt), 18)).to_numpy(
        zero_copy_only=False)
    bad_id = np.zeros(n, bool)
    bad_id[parent_sel[~id_ok]] = True
    ids = np.zeros(len(id_ok), np.int64)
    if id_ok.any():
        ids[id_ok] = pc.cast(id_txt.filter(pa.array(id_ok)), pa.int64()).to_numpy()
    features: Dict[str, pa.Array] = {}
    weights: Dict[str, pa.Array] = {}
    for k, f in enumerate(fields):
        m = np.flatnonzero((code_np == k) & id_ok)
        rows = parent_sel[m]
        vals = ids[m]
        if not f.multi_valued:
            out = np.zeros(n, np.int64)
            present = np.zeros(n, bool)
            out[rows[::-1]] = vals[::-1]  # reversed so the first occurrence is written last and wins
            present[rows] = True
            features[f.name] = pa.array(out, mask=~present)
            continue
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
        features[f.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(vals, pa.int64()))
        if f.weighted:
            if val_txt is None:
                w = np.ones(len(m), np.float32)
            else:
                vt = val_txt.take(pa.array(m))
                numeric = pc.match_substring_regex(vt, r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$").to_numpy(
                    zero_copy_only=False)
                bad_id[rows[~numeric]] = True
                w = np.zeros(len(m), np.float32)
                if numeric.any():
                    w[numeric] = pc.cast(vt.filter(pa.array(numeric)), pa.float32()).to_numpy()
            weights[f.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(w, pa.float32()))
    return features, weights, entries, bad_entry, bad_id


def first_true(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


# ------------------------------------------------------------------------------------------------------ Source


class Source:
    """An input format. ``check()`` validates files, headers/schemas and declared columns without reading the data
    (raises PrepareError); ``chunks(role, ...)`` then streams RawChunks of one input role, counting malformed rows
    in ``bad`` and raising a PrepareError on wrong types or labels. Both passes of ``prepare`` call ``chunks`` and
    must see identical rows."""

    format = ""
    labels: List[str]
    fields: List[FieldDef]
    time_column: Optional[str] = None
    time_unit: str = "s"
    scratch: Optional[str] = None  # a private folder for the run (set by prepare, deleted after), e.g. for caches

    def roles(self) -> Dict[str, List[str]]:
        raise NotImplementedError

    def check(self) -> None:
        raise NotImplementedError

    def chunks(self, role: str, bad: BadRows, progress: Optional[Progress]) -> Iterator[RawChunk]:
        raise NotImplementedError

    def input_bytes(self) -> int:
        return sum(file_size(f) for files in self.roles().values() for f in files)

    def describe(self) -> Dict[str, object]:
        return {"format": self.format, "inputs": self.roles()}
