"""``table``: a user's own Parquet or CSV table (a file or a folder of them), e.g. campaign logs.

    prepare_data.py table --input logs/ --labels click,conversion,core_conversion --time-column ts \\
        --test-after 2024-03-01 --out data/campaign

The labels are given in chain order. Features default to every column that is not a label or the time column; each
is a categorical: integer or string values (Parquet dictionary columns too), a Parquet list column being a bag
(multi-valued field). CSV files need a header line (or --columns); their categoricals are read as strings, so "7" and
"07" are different values. A float feature column is refused (bucketize it first, or leave it out with --features).
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline.formats.common import (
    BadRows,
    CsvLayout,
    FieldDef,
    PrepareError,
    Progress,
    RawChunk,
    Source,
    expand_inputs,
    file_size,
    first_line,
    labels_matrix,
    row_words,
    stream_csv,
    time_us,
)

PARQUET_EXTS = (".parquet", ".pq")
CSV_EXTS = (".csv", ".csv.gz", ".tsv", ".txt")


def is_parquet(path: str) -> bool:
    return path.endswith(PARQUET_EXTS)


def categorical(arr: pa.Array) -> pa.Array:
    """A feature column in canonical form: int64 or string values, or a list<int64|string> bag."""
    t = arr.type
    if pa.types.is_dictionary(t):
        return categorical(arr.dictionary_decode())
    if pa.types.is_large_string(t):
        return arr.cast(pa.string())
    if pa.types.is_integer(t) and t != pa.int64():
        return arr.cast(pa.int64())
    if pa.types.is_boolean(t):
        return arr.cast(pa.int64())
    if pa.types.is_large_list(t) or (pa.types.is_list(t) and categorical_value_type(t.value_type) != t.value_type):
        return arr.cast(pa.list_(categorical_value_type(t.value_type)))
    return arr


def categorical_value_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(t):
        return categorical_value_type(t.value_type)
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return pa.int64()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.string()
    return t


def is_categorical_type(t: pa.DataType) -> bool:
    v = categorical_value_type(t)
    return v in (pa.int64(), pa.string())


def is_bag_type(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and is_categorical_type(t.value_type)


class TableSource(Source):
    """See module docstring. ``inputs``: role -> file or folder; roles 'train' (split into train + valid), 'valid',
    'test', or 'all' (split into all three by the time/fraction options)."""

    format = "table"
    csv_feature_type: pa.DataType = pa.string()

    def __init__(
        self,
        inputs: Dict[str, str],
        labels: Sequence[str],
        features: Optional[Sequence[str]] = None,
        time_column: Optional[str] = None,
        time_unit: str = "s",
        columns: Optional[Sequence[str]] = None,
        delimiter: str = ",",
        block_mb: float = 4.0,
        chunk_rows: int = 65536,
    ):
        self.inputs = dict(inputs)
        self.labels = list(labels)
        self.feature_names = list(features) if features else None
        self.time_column = time_column
        self.time_unit = time_unit
        self.columns = list(columns) if columns else None
        self.delimiter = delimiter
        self.block_bytes = max(1 << 16, int(block_mb * (1 << 20)))
        self.chunk_rows = chunk_rows
        self.fields: List[FieldDef] = []
        self._files: Dict[str, List[str]] = {}
        self._layouts: Dict[str, CsvLayout] = {}
        self.ignored: List[str] = []

    # ------------------------------------------------------------------ checks

    def roles(self) -> Dict[str, List[str]]:
        return self._files

    def _expand(self) -> None:
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            raise PrepareError(f"--labels must name at least 2 distinct columns in chain order, got {self.labels}")
        for role, path in self.inputs.items():
            files = expand_inputs(path, PARQUET_EXTS + CSV_EXTS)
            kinds = {is_parquet(f) for f in files}
            if len(kinds) > 1:
                raise PrepareError(f"{path}: mixes Parquet and CSV files; give one kind per input")
            self._files[role] = files

    def csv_layout(self, path: str, names_hint: Optional[List[str]]) -> CsvLayout:
        """Header line -> its names; otherwise --columns (a PrepareError without them)."""
        line = first_line(path)
        if not line:
            return CsvLayout(self.columns or names_hint or [], header=False, delimiter=self.delimiter)
        toks = [t.strip().strip('"') for t in line.split(self.delimiter)]
        if self.columns:
            header = toks == self.columns
            return CsvLayout(self.columns, header=header, delimiter=self.delimiter)
        return CsvLayout(toks, header=True, delimiter=self.delimiter)

    def _schema(self, path: str, names_hint: Optional[List[str]]) -> Tuple[List[str], Dict[str, pa.DataType]]:
        """Column names and (Parquet only) types of one file."""
        if is_parquet(path):
            try:
                schema = pq.read_schema(path)
            except (pa.ArrowInvalid, OSError) as e:
                raise PrepareError(f"{path}: not a readable Parquet file ({e})") from None
            return list(schema.names), {f.name: f.type for f in schema}
        layout = self.csv_layout(path, names_hint)
        self._layouts[path] = layout
        return layout.names, {}

    def default_features(self, names: List[str]) -> List[str]:
        skip = set(self.labels) | ({self.time_column} if self.time_column else set())
        return [n for n in names if n not in skip]

    def check(self) -> None:
        self._expand()
        first: Optional[List[str]] = None
        kinds: Dict[str, Tuple[str, pa.DataType]] = {}  # feature -> (first file, type) for consistency checks
        for role in self._files:
            for path in self._files[role]:
                names, types = self._schema(path, first)
                if not names:
                    continue  # an empty CSV file: no rows, nothing to check
                if first is None:
                    first = names
                    if self.feature_names is None:
                        self.feature_names = self.default_features(names)
                    self.ignored = [n for n in names if n not in set(self.feature_names) | set(self.labels)
                                    and n != self.time_column]
                self._check_columns(path, names, types, kinds)
        if first is None:
            raise PrepareError(f"no rows: every input file is empty ({', '.join(self.inputs.values())})")
        if not self.feature_names:
            raise PrepareError(f"no feature columns: {first} holds only labels; give --features")
        clash = set(self.feature_names) & set(self.labels)
        if clash:
            raise PrepareError(f"columns {sorted(clash)} are given both as labels and as features")
        self.fields = [
            FieldDef(f, multi_valued=f in kinds and is_bag_type(kinds[f][1])) for f in self.feature_names
        ]

    def _check_columns(self, path: str, names: List[str], types: Dict[str, pa.DataType],
                       kinds: Dict[str, Tuple[str, pa.DataType]]) -> None:
        have = set(names)
        for lab in self.labels:
            if lab not in have:
                raise PrepareError(f"{path}: missing label column {lab!r} (columns: {', '.join(names)}); "
                                   "name the label columns with --labels")
        for f in self.feature_names or []:
            if f not in have:
                raise PrepareError(f"{path}: declared feature column {f!r} does not exist (columns: "
                                   f"{', '.join(names)}); fix --features")
        if self.time_column and self.time_column not in have:
            raise PrepareError(f"{path}: time column {self.time_column!r} does not exist (columns: "
                               f"{', '.join(names)}); fix --time-column")
        if not types:
            return
        for lab in self.labels:
            t = types[lab]
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
                raise PrepareError(f"{path}: label column {lab!r} has type {t}; labels must be 0/1 integers, "
                                   "floats or booleans")
        for f in self.feature_names or []:
            t = types[f]
            if not (is_categorical_type(t) or is_bag_type(t)):
                raise PrepareError(
                    f"{path}: feature column {f!r} has type {t}; categorical features must be integers or strings "
                    "(or lists of them); bucketize it first, or leave it out with --features"
                )
            if f in kinds and is_bag_type(kinds[f][1]) != is_bag_type(t):
                raise PrepareError(f"{path}: column {f!r} is {t} but {kinds[f][1]} in {kinds[f][0]}; a column must "
                                   "be a list in every file or in none")
            kinds.setdefault(f, (path, t))

    # ------------------------------------------------------------------ reading

    def chunks(self, role: str, bad: BadRows, progress: Optional[Progress]) -> Iterator[RawChunk]:
        offset = 0
        for path in self._files[role]:
            reader = self._parquet_batches(path, progress) if is_parquet(path) else self._csv_batches(
                path, bad, progress)
            header = None if is_parquet(path) else self._layouts[path].header
            word = row_words(path, header)
            seen = 0
            for before, batch in reader:
                n = batch.num_rows
                rows = np.arange(before + 1, before + n + 1, dtype=np.int64)
                yield self._chunk(path, batch, rows, rows - 1 + offset, word)
                seen = before + n
            offset += seen

    def _parquet_batches(self, path: str, progress: Optional[Progress]) -> Iterator[Tuple[int, pa.RecordBatch]]:
        cols = self._needed()
        pf = pq.ParquetFile(path)
        total = max(1, pf.metadata.num_rows)
        size, sent, done = file_size(path), 0, 0
        for batch in pf.iter_batches(batch_size=self.chunk_rows, columns=cols):
            yield done, batch
            done += batch.num_rows
            if progress is not None:
                now = size * done // total
                progress(now - sent)
                sent = now

    def _csv_batches(self, path: str, bad: BadRows, progress: Optional[Progress]):
        types: Dict[str, pa.DataType] = {lab: pa.float64() for lab in self.labels}
        for f in self.fields:
            types[f.name] = self.csv_feature_type
        if self.time_column:
            types[self.time_column] = pa.string()
        yield from stream_csv(path, self._layouts[path], types, bad, progress, self.block_bytes)

    def _needed(self) -> List[str]:
        return list(self.labels) + [f.name for f in self.fields] + ([self.time_column] if self.time_column else [])

    def _chunk(self, path: str, batch: pa.RecordBatch, rows: np.ndarray, index: np.ndarray, word) -> RawChunk:
        labels = labels_matrix([batch.column(lab) for lab in self.labels], self.labels, path, rows, word)
        feats: Dict[str, pa.Array] = {}
        for f in self.fields:
            col = categorical(batch.column(f.name))
            if pa.types.is_list(col.type) != f.multi_valued:
                raise PrepareError(f"{path}: column {f.name!r} has type {col.type} here but "
                                   f"{'a list' if f.multi_valued else 'no list'} elsewhere")
            feats[f.name] = col
        t = None
        if self.time_column:
            col = batch.column(self.time_column)
            if pa.types.is_string(col.type) and len(col) and not col.null_count and bool(
                    pc.all(pc.utf8_is_digit(col)).as_py()):
                col = col.cast(pa.int64())  # epoch numbers in a text file
            t = time_us(col, self.time_column, self.time_unit, word, rows)
        return RawChunk(file=path, rows=rows, index=index, labels=labels, features=feats, time=t)

    def describe(self) -> Dict[str, object]:
        return {
            "format": self.format,
            "inputs": {r: [os.path.abspath(f) for f in fs] for r, fs in self._files.items()},
            "labels": self.labels,
            "fields": [f.name for f in self.fields],
            "ignored_columns": self.ignored,
            "time_column": self.time_column,
        }
