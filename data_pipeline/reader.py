"""Streaming Parquet reader that yields fixed-size Batches, one reader per rank.

Every rank must run the same number of steps (collectives in the sparse/dense all-to-alls and all-reduces hang
otherwise), so the caller all-reduces the batch count first: the MIN of num_full_batches() for training (every rank
drops its tail) and the MAX of num_padded_batches() for evaluation (short ranks pad with weight-0 rows, so every row
is scored exactly once). Memory: at most one row group plus a carry-over of < batch_size rows is held at a time.

Speed (docs/performance.md, benchmarks/input_pipeline.py): row groups are decoded with ``ParquetFile.read_row_group``
(the fastest raw read there for row groups of a few thousand rows), converted to numpy
once, and shuffled, sliced and concatenated as numpy arrays; the id-range and weight checks run on the first read of
each row group only (the reader lives for the whole run, so later epochs skip them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


@dataclass
class _Rows:
    """n rows in numpy: single-valued fields as one (F_single, n) int64 array (spec order), bags as (offsets (n+1,)
    from 0, ids) with per-id float32 weights for weighted bags, labels (n, T) float32. Built per row group, then
    permuted, sliced and concatenated without going back to Arrow: the batch layout is built from these arrays."""

    n: int
    single: np.ndarray
    bags: Dict[str, Tuple[np.ndarray, np.ndarray]]
    bag_weights: Dict[str, np.ndarray]
    labels: np.ndarray

    def take(self, idx: np.ndarray) -> _Rows:
        bags, weights = {}, {}
        for name, (off, ids) in self.bags.items():
            lens = np.diff(off)[idx]
            new_off = np.zeros(len(idx) + 1, np.int64)
            np.cumsum(lens, out=new_off[1:])
            # position of every kept id in the old values: each row's old start, shifted along its new span
            pos = np.repeat(off[:-1][idx] - new_off[:-1], lens) + np.arange(new_off[-1], dtype=np.int64)
            bags[name] = (new_off, ids[pos])
            if name in self.bag_weights:
                weights[name] = self.bag_weights[name][pos]
        # ndarray.take: faster than fancy indexing along axis 1 for the (F, n) id matrix
        return _Rows(len(idx), self.single.take(idx, axis=1), bags, weights, self.labels.take(idx, axis=0))

    def slice(self, a: int, b: int) -> _Rows:
        bags, weights = {}, {}
        for name, (off, ids) in self.bags.items():
            lo, hi = int(off[a]), int(off[b])
            bags[name] = (off[a : b + 1] - lo, ids[lo:hi])
            if name in self.bag_weights:
                weights[name] = self.bag_weights[name][lo:hi]
        return _Rows(b - a, self.single[:, a:b], bags, weights, self.labels[a:b])

    @staticmethod
    def concat(x: _Rows, y: _Rows) -> _Rows:
        bags, weights = {}, {}
        for name, (off, ids) in x.bags.items():
            off2, ids2 = y.bags[name]
            bags[name] = (np.concatenate([off, off2[1:] + off[-1]]), np.concatenate([ids, ids2]))
            if name in x.bag_weights:
                weights[name] = np.concatenate([x.bag_weights[name], y.bag_weights[name]])
        return _Rows(x.n + y.n, np.concatenate([x.single, y.single], axis=1), bags, weights,
                     np.concatenate([x.labels, y.labels]))


def _plain(col: pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)


class ShardReader:
    """Reads this rank's ``files`` (absolute paths) into Batches of exactly ``batch_size`` rows.

    Each Batch: features KJT (keys = spec field names; values int64, lengths int32, stride B; when the spec has a
    weighted bag field, also per-id weights float32: that field's ``<name>__weights``, 1.0 for every other id),
    labels (B, T) float32, weights (B,) float32.
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
        self._weight_col = {f.name: f.weight_column for f in spec.fields if f.weighted}
        self.columns = self.keys + list(self._weight_col.values()) + list(spec.labels)
        self._multi = {f.name: f.multi_valued for f in spec.fields}
        self._card = {f.name: int(f.num_embeddings) for f in spec.fields}
        self._single = [f.name for f in spec.fields if not f.multi_valued]
        self._single_card = np.array([self._card[n] for n in self._single], dtype=np.int64)
        self._metadata: List[pq.FileMetaData] = []
        for f in self.files:
            self._validate_schema(f)
            self._metadata.append(pq.read_metadata(f))
        # one entry per row group, in file order: (file index, row group index, rows); footers only, no data
        self._row_groups: List[Tuple[int, int, int]] = [
            (i, g, meta.row_group(g).num_rows)
            for i, meta in enumerate(self._metadata) for g in range(meta.num_row_groups)
        ]
        self._num_rows = sum(n for _, _, n in self._row_groups)
        self._checked: set = set()  # row groups whose ids, weights and nulls were already validated
        self._lengths_cache: Dict[int, torch.Tensor] = {}

    def _validate_schema(self, file: str) -> None:
        schema = pq.read_schema(file)
        for name in self.columns:
            if name not in schema.names:
                raise ValueError(
                    f"{file}: missing column {name!r} required by the dataset spec; rewrite the shard with it or "
                    "remove it from spec.json"
                )
            t = schema.field(name).type
            if name in self._weight_col.values():
                ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_floating(t.value_type)
                want, hint = "list<float>", " (the per-id weights of a weighted bag field)"
            elif name in self._multi:
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

    def _read(self, k: int, rng: Optional[np.random.Generator]) -> _Rows:
        """Row group k (only the spec columns) as numpy rows, permuted if rng is given; validated on first read."""
        fi, g, _ = self._row_groups[k]
        path = self.files[fi]
        # use_threads=False: a row group of a few thousand rows decodes faster on one thread than split over the
        # pool, and the worker's own thread keeps the core (docs/performance.md, input pipeline)
        table = pq.ParquetFile(path, metadata=self._metadata[fi]).read_row_group(g, columns=self.columns,
                                                                                  use_threads=False)
        where = f"{path} (row group {g})"
        check = k not in self._checked
        if check:
            for name in self.columns:
                col = table.column(name)
                nulls = col.null_count + (pc.list_flatten(col).null_count
                                          if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) else 0)
                if nulls:
                    raise ValueError(f"{where}: column {name!r} has {nulls} null(s); fill them")
        n = table.num_rows
        single = np.empty((len(self._single), n), dtype=np.int64)
        for i, name in enumerate(self._single):
            single[i] = table.column(name).to_numpy()
        bags: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        weights: Dict[str, np.ndarray] = {}
        for name, multi in self._multi.items():
            if multi:
                arr = _plain(table.column(name))
                # flatten() and offsets respect slicing; .values would return the unsliced child array
                off = arr.offsets.to_numpy().astype(np.int64)
                bags[name] = (off - off[0], arr.flatten().to_numpy().astype(np.int64, copy=False))
                if name in self._weight_col:
                    w = _plain(table.column(self._weight_col[name]))
                    woff = w.offsets.to_numpy()
                    if check and not np.array_equal(woff - woff[0], bags[name][0]):
                        row = int(np.flatnonzero(np.diff(woff) != np.diff(off))[0])
                        raise ValueError(
                            f"{where}: row {row} has {int(off[row + 1] - off[row])} id(s) in {name!r} but "
                            f"{int(woff[row + 1] - woff[row])} weight(s) in {self._weight_col[name]!r}; every id "
                            "needs exactly one weight"
                        )
                    weights[name] = w.flatten().to_numpy().astype(np.float32, copy=False)
                    if check and not np.isfinite(weights[name]).all():
                        raise ValueError(f"{where}: column {self._weight_col[name]!r} holds NaN or infinite weights; "
                                         "fix or drop those rows")
        labels = np.empty((n, len(self.spec.labels)), dtype=np.float32)
        for t, name in enumerate(self.spec.labels):
            labels[:, t] = table.column(name).to_numpy()
        if check:
            if n and len(self._single):
                lo, hi = single.min(axis=1), single.max(axis=1)
                bad = np.flatnonzero((lo < 0) | (hi >= self._single_card))
                if len(bad):
                    i = int(bad[0])
                    self._range_error(where, self._single[i], int(lo[i]), int(hi[i]))
            for name, (_, ids) in bags.items():
                if len(ids) and (ids.min() < 0 or ids.max() >= self._card[name]):
                    self._range_error(where, name, int(ids.min()), int(ids.max()))
            self._checked.add(k)
        rows = _Rows(n, single, bags, weights, labels)
        return rows if rng is None else rows.take(rng.permutation(n))

    def _range_error(self, where: str, name: str, lo: int, hi: int) -> None:
        raise ValueError(f"{where}: column {name!r} has ids in [{lo}, {hi}], outside [0, {self._card[name]}) "
                         "(num_embeddings in spec.json)")

    def _stream(self, order: List[int], rng: Optional[np.random.Generator]) -> Iterator[_Rows]:
        """Rows of exactly batch_size, then (if rows remain) one final shorter chunk."""
        carry: Optional[_Rows] = None  # < batch_size rows left over from the previous row group
        for i in order:
            rows = self._read(i, rng)
            if carry is not None and carry.n:
                rows = _Rows.concat(carry, rows)
            off = 0
            while off + self.batch_size <= rows.n:
                yield rows.slice(off, off + self.batch_size)
                off += self.batch_size
            carry = rows.slice(off, rows.n)
        if carry is not None and carry.n:
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
        order = list(range(len(self._row_groups)))
        rng = None
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = [int(i) for i in rng.permutation(len(order))]
        done = 0
        for rows in self._stream(order, rng):
            yield self._to_batch(rows, 0)  # _stream yields full batches first, and we stop before any short tail
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
            for rows in self._stream(list(range(len(self._row_groups))), None):
                yield self._to_batch(rows, self.batch_size - rows.n)
                done += 1
                if done == num_batches:
                    return
        for _ in range(num_batches - done):
            yield self.padding_batch()

    def padding_batch(self) -> Batch:
        """batch_size padding rows: every field id 0 (one id per row, also for bags), labels 0, weights 0."""
        empty = _Rows(0, np.zeros((len(self._single), 0), np.int64),
                      {n: (np.zeros(1, np.int64), np.zeros(0, np.int64)) for n, m in self._multi.items() if m},
                      {n: np.zeros(0, np.float32) for n in self._weight_col}, np.zeros((0, len(self.spec.labels)),
                                                                                       np.float32))
        return self._to_batch(empty, self.batch_size)

    def _to_batch(self, rows: _Rows, n_pad: int) -> Batch:
        """Rows -> Batch, appending n_pad padding rows (one id 0, weight 1 per field). KJT layout is key-major:
        values = [field 0 ids of all rows, field 1 ids of all rows, ...], lengths (F * B,)."""
        n, b, nf = rows.n, rows.n + n_pad, len(self.keys)
        weighted = bool(self._weight_col)
        if not rows.bags:  # every field single-valued: one (F, B) array is the whole values tensor
            ids = np.zeros((nf, b), dtype=np.int64)
            ids[:, :n] = rows.single
            values = torch.from_numpy(ids.reshape(-1))
            lengths = self._lengths_cache.get(b)
            if lengths is None:
                lengths = self._lengths_cache.setdefault(b, torch.ones(nf * b, dtype=torch.int32))
            id_weights = None
        else:
            parts: List[np.ndarray] = []
            lens: List[np.ndarray] = []
            wparts: List[np.ndarray] = []
            pad_ids, pad_len = np.zeros(n_pad, np.int64), np.ones(n_pad, np.int32)
            si = 0
            for name in self.keys:
                if self._multi[name]:
                    off, fids = rows.bags[name]
                    parts.append(fids)
                    lens.append(np.diff(off).astype(np.int32))
                    if weighted:
                        wparts.append(rows.bag_weights[name] if name in rows.bag_weights
                                      else np.ones(len(fids), np.float32))
                else:
                    parts.append(rows.single[si])
                    lens.append(np.ones(n, np.int32))
                    si += 1
                    if weighted:
                        wparts.append(np.ones(n, np.float32))
                parts.append(pad_ids)
                lens.append(pad_len)
                if weighted:
                    wparts.append(np.ones(n_pad, np.float32))
            values = torch.from_numpy(np.concatenate(parts))
            lengths = torch.from_numpy(np.concatenate(lens))
            id_weights = torch.from_numpy(np.concatenate(wparts)) if weighted else None
        labels = np.zeros((b, len(self.spec.labels)), dtype=np.float32)
        labels[:n] = rows.labels
        weights = np.zeros(b, dtype=np.float32)
        weights[:n] = 1.0
        kjt = KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths, weights=id_weights, stride=b)
        return Batch(features=kjt, labels=torch.from_numpy(labels), weights=torch.from_numpy(weights))
