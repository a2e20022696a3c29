"""Streaming Parquet reader that yields fixed-size Batches, one reader per rank.

Every rank must run the same number of steps (collectives in the sparse/dense all-to-alls and all-reduces hang
otherwise), so the caller all-reduces the batch count first: the MIN of num_full_batches() for training (every rank
drops its tail) and the MAX of num_padded_batches() for evaluation (short ranks pad with weight-0 rows, so every row
is scored exactly once). Memory: at most one row group plus a carry-over of < batch_size rows is held at a time.
"""

from __future__ import annotations

import math
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_pipeline.batch import Batch
from data_pipeline.spec import DatasetSpec


def shard_files_for_rank(files: List[str], rank: int, world_size: int) -> List[str]:
    """Whole files for ``rank``: files sorted by path, each given to the rank with the fewest rows so far (ties ->
    lower rank). Row counts come from Parquet footers; no data is read. Every file goes to exactly one rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    files = sorted(files)
    load = [0] * world_size
    owned: List[List[str]] = [[] for _ in range(world_size)]
    for f in files:
        r = min(range(world_size), key=lambda i: (load[i], i))
        load[r] += pq.read_metadata(f).num_rows
        owned[r].append(f)
    if any(not o for o in owned):
        raise ValueError(
            f"{len(files)} shard file(s) cannot feed {world_size} workers (a rank would get no file): write more "
            "shards (a smaller rows_per_file) or use fewer workers"
        )
    return owned[rank]


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_list_of_int(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_int(t.value_type)


class ShardReader:
    """Reads this rank's ``files`` (absolute paths) into Batches of exactly ``batch_size`` rows.

    Each Batch: features KJT (keys = spec field names; values int64, lengths int32, stride B), labels (B, T) float32,
    weights (B,) float32.
    """

    def __init__(self, spec: DatasetSpec, files: List[str], batch_size: int, shuffle: bool = False, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec = spec
        self.files = list(files)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.keys = spec.field_names
        self.columns = self.keys + list(spec.labels)
        self._multi = {f.name: f.multi_valued for f in spec.fields}
        self._card = {f.name: int(f.num_embeddings) for f in spec.fields}
        # canonical types: files may store int8/int32 ids or bool labels; one schema makes row groups concatenable
        self._schema = pa.schema(
            [(f.name, pa.list_(pa.int64()) if f.multi_valued else pa.int64()) for f in spec.fields]
            + [(label, pa.float32()) for label in spec.labels]
        )
        for f in self.files:
            self._validate_schema(f)
        # one fragment per row group, in file order; holds footers only, no data
        self._fragments: List[Tuple[ds.ParquetFileFragment, int]] = []
        if self.files:
            dataset = ds.dataset(self.files, format="parquet")
            for file_frag in dataset.get_fragments():
                for frag in file_frag.split_by_row_group():
                    self._fragments.append((frag, frag.row_groups[0].num_rows))
        self._num_rows = sum(n for _, n in self._fragments)

    def _validate_schema(self, file: str) -> None:
        schema = pq.read_schema(file)
        for name in self.columns:
            if name not in schema.names:
                raise ValueError(
                    f"{file}: missing column {name!r} required by the dataset spec; rewrite the shard with it or "
                    "remove it from spec.json"
                )
            t = schema.field(name).type
            if name in self._multi:
                ok = _is_list_of_int(t) if self._multi[name] else _is_int(t)
                want = "list<integer>" if self._multi[name] else "integer"
                hint = "" if ok else f" (spec multi_valued={self._multi[name]})"
            else:
                ok = _is_int(t) or pa.types.is_boolean(t) or pa.types.is_floating(t)
                want, hint = "integer, bool or float", ""
            if not ok:
                raise ValueError(
                    f"{file}: column {name!r} has type {t}, expected {want}{hint}; fix the shard or spec.json"
                )

    def num_rows(self) -> int:
        return self._num_rows

    def num_full_batches(self) -> int:
        return self._num_rows // self.batch_size

    def num_padded_batches(self) -> int:
        return math.ceil(self._num_rows / self.batch_size)

    # ------------------------------------------------------------------ reading

    def _read(self, frag: ds.ParquetFileFragment, rng: Optional[np.random.Generator]) -> pa.Table:
        """One row group, only the spec columns, cast to the canonical schema, rows permuted if rng is given."""
        table = frag.to_table(columns=self.columns, schema=frag.physical_schema).select(self.columns)
        table = table.cast(self._schema)
        for name in self.columns:
            col = table.column(name)
            if col.null_count:
                raise ValueError(f"{frag.path}: column {name!r} has {col.null_count} null(s); fill them")
        for name in self.keys:
            col = table.column(name)
            vals = pc.list_flatten(col) if self._multi[name] else col
            if len(vals):
                mm = pc.min_max(vals)
                lo, hi = mm["min"].as_py(), mm["max"].as_py()
                if lo < 0 or hi >= self._card[name]:
                    raise ValueError(
                        f"{frag.path}: column {name!r} has ids in [{lo}, {hi}], outside [0, {self._card[name]}) "
                        "(num_embeddings in spec.json)"
                    )
        if rng is not None:
            table = table.take(rng.permutation(table.num_rows))
        return table

    def _stream(self, order: List[int], rng: Optional[np.random.Generator]) -> Iterator[pa.Table]:
        """Tables of exactly batch_size rows, then (if rows remain) one final shorter table."""
        carry: Optional[pa.Table] = None  # < batch_size rows left over from the previous row group
        for i in order:
            table = self._read(self._fragments[i][0], rng)
            if carry is not None and carry.num_rows:
                table = pa.concat_tables([carry, table])  # zero-copy: just chunk references
            off = 0
            while off + self.batch_size <= table.num_rows:
                yield table.slice(off, self.batch_size)
                off += self.batch_size
            carry = table.slice(off)
        if carry is not None and carry.num_rows:
            yield carry

    def iter_train(self, epoch: int, num_batches: int) -> Iterator[Batch]:
        """Exactly ``num_batches`` full batches (all weights 1). With shuffle, row-group order and rows within each
        row group are permuted by a generator seeded with (seed, epoch)."""
        if not 0 <= num_batches <= self.num_full_batches():
            raise ValueError(
                f"asked for {num_batches} train batches but these {len(self.files)} file(s) hold "
                f"{self._num_rows} rows = {self.num_full_batches()} full batches of {self.batch_size}"
            )
        if num_batches == 0:
            return
        order = list(range(len(self._fragments)))
        rng = None
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = [int(i) for i in rng.permutation(len(order))]
        done = 0
        for table in self._stream(order, rng):
            yield self._to_batch(table, 0)  # _stream yields full batches first, and we stop before any short tail
            done += 1
            if done == num_batches:
                return

    def iter_eval(self, num_batches: int) -> Iterator[Batch]:
        """Exactly ``num_batches`` batches in file order, no shuffle; the last partial batch is padded with weight-0
        rows and batches past num_padded_batches() are all padding. Every row is covered exactly once when
        num_batches >= num_padded_batches() (pass the MAX over ranks); fewer just stops early (e.g. a probe batch)."""
        if num_batches < 0:
            raise ValueError(f"num_batches must be >= 0, got {num_batches}")
        done = 0
        if num_batches:
            for table in self._stream(list(range(len(self._fragments))), None):
                yield self._to_batch(table, self.batch_size - table.num_rows)
                done += 1
                if done == num_batches:
                    return
        for _ in range(num_batches - done):
            yield self.padding_batch()

    def padding_batch(self) -> Batch:
        """batch_size padding rows: every field id 0 (one id per row, also for bags), labels 0, weights 0."""
        return self._to_batch(self._schema.empty_table(), self.batch_size)

    def _to_batch(self, table: pa.Table, n_pad: int) -> Batch:
        """Vectorised Table (canonical schema) -> Batch, appending n_pad padding rows. KJT layout is key-major:
        values = [field 0 ids of all rows, field 1 ids of all rows, ...], lengths (F * B,)."""
        n = table.num_rows
        values: List[np.ndarray] = []
        lengths: List[np.ndarray] = []
        pad_ids = np.zeros(n_pad, dtype=np.int64)
        pad_len = np.ones(n_pad, dtype=np.int32)
        for name in self.keys:
            col = table.column(name)
            if self._multi[name]:
                arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
                # flatten() and offsets respect slicing; .values would return the unsliced child array
                values.append(arr.flatten().to_numpy())
                lengths.append(np.diff(arr.offsets.to_numpy()).astype(np.int32))
            else:
                values.append(col.to_numpy())
                lengths.append(np.ones(n, dtype=np.int32))
            values.append(pad_ids)
            lengths.append(pad_len)
        labels = np.zeros((n + n_pad, len(self.spec.labels)), dtype=np.float32)
        for t, name in enumerate(self.spec.labels):
            labels[:n, t] = table.column(name).to_numpy()
        weights = np.zeros(n + n_pad, dtype=np.float32)
        weights[:n] = 1.0
        kjt = KeyedJaggedTensor(
            keys=self.keys,
            values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
            stride=n + n_pad,
        )
        return Batch(features=kjt, labels=torch.from_numpy(labels), weights=torch.from_numpy(weights))
