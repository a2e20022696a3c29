"""Parquet shard writing for prepared data sets: a buffered per-split writer and an atomic output folder.

``SplitWriter`` takes encoded tables of any size and writes ``<split>/part-NNNNN.parquet`` files of a planned number
of rows each, in row groups of ``row_group_rows`` (a file's last row group may be shorter); at most one row group is
buffered. ``atomic_output`` yields a hidden sibling folder that is renamed to the target only when the block
finishes, and removed if it fails or is interrupted, so a folder with spec.json is always complete.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import uuid
from typing import Iterator, List, Optional

import pyarrow as pa
import pyarrow.parquet as pq


def plan_rows_per_file(rows: int, rows_per_file: int, min_files: int) -> int:
    """Rows per file for a split of ``rows`` rows: at most ``rows_per_file``, at least ``min(min_files, rows)`` files,
    and files of nearly equal size (so ranks get balanced shares)."""
    if rows <= 0:
        return max(1, rows_per_file)
    files = max(math.ceil(rows / rows_per_file), min(min_files, rows), 1)
    return math.ceil(rows / files)


class SplitWriter:
    """Writes one split's shards under ``root`` (see module docstring)."""

    def __init__(self, root: str, split: str, schema: pa.Schema, rows_per_file: int, row_group_rows: int,
                 compression: str = "snappy"):
        self.root = root
        self.split = split
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.row_group_rows = max(1, min(row_group_rows, rows_per_file))
        self.compression = compression
        self.files: List[str] = []
        self.rows = 0
        self._buf: List[pa.Table] = []
        self._buf_rows = 0
        self._writer: Optional[pq.ParquetWriter] = None
        self._file_rows = 0
        os.makedirs(os.path.join(root, split), exist_ok=True)

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._buf.append(table.select(self.schema.names).cast(self.schema))
        self._buf_rows += table.num_rows
        while self._buf_rows >= self._next_group_rows():
            self._flush(self._next_group_rows())

    def _next_group_rows(self) -> int:
        return min(self.row_group_rows, self.rows_per_file - self._file_rows)

    def _flush(self, n: int) -> None:
        data = pa.concat_tables(self._buf)
        group, rest = data.slice(0, n), data.slice(n)
        self._buf = [rest] if rest.num_rows else []
        self._buf_rows = rest.num_rows
        if self._writer is None:
            rel = f"{self.split}/part-{len(self.files):05d}.parquet"
            self._writer = pq.ParquetWriter(os.path.join(self.root, rel), self.schema, compression=self.compression)
            self.files.append(rel)
            self._file_rows = 0
        self._writer.write_table(group, row_group_size=n)
        self._file_rows += n
        self.rows += n
        if self._file_rows >= self.rows_per_file:
            self._writer.close()
            self._writer = None
            self._file_rows = 0

    def close(self) -> List[str]:
        while self._buf_rows:
            self._flush(min(self._buf_rows, self._next_group_rows()))
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.files

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None


def check_out_dir(out_dir: str) -> str:
    """Absolute ``out_dir``; a FileExistsError if it exists and is not an empty folder."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} already exists and is not empty; remove it or pick another --out")
    return out_dir


@contextlib.contextmanager
def atomic_output(out_dir: str) -> Iterator[str]:
    """Yield a temporary folder next to ``out_dir``; on success it becomes ``out_dir`` (atomic rename), on any error
    or interrupt it is deleted."""
    out_dir = check_out_dir(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above); a non-empty one makes this fail instead of being replaced
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
