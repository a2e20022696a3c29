"""Per-field id encoders for data preparation: a vocabulary counted on train, or feature hashing.

Both map a column of raw values (int64 or string; null = missing) to int64 indices in ``[0, num_embeddings)``, index
0 being reserved for "unknown": a value not in the vocabulary (unseen in train, or seen fewer than ``min_count``
times), and for hashed fields a missing value. A missing value is otherwise a category like any other: it gets its own
index when it is frequent enough in train (absent fields are common in Ali-CCP, and informative).

Counting is streamed: each chunk's ``value_counts`` is appended to a pending list and merged into the running totals
(an Arrow group-by) only when the pending rows outgrow the totals, so the work is O(rows + distinct values * log) and
memory is O(distinct values), whatever the number of rows.
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

UNKNOWN = 0  # reserved index: out-of-vocabulary (and missing, for hashed fields)
MIN_MERGE_ROWS = 1 << 16


def key_kind(t: pa.DataType) -> str:
    """'int' or 'str' for a categorical value type; raises TypeError for anything else."""
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    raise TypeError(f"type {t} is not a categorical type (integer or string)")


def align(values: pa.Array, kind: str) -> pa.Array:
    """Cast ``values`` to the key type of ``kind`` (int64 or string). Raises pa.ArrowInvalid when a string is not an
    integer (the caller names the column)."""
    want = pa.int64() if kind == "int" else pa.string()
    if values.type == want:
        return values
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    return pc.cast(values, want)


class Counter:
    """Counts the values of one field over the train rows (see module docstring)."""

    def __init__(self) -> None:
        self.kind: Optional[str] = None
        self.nulls = 0
        self.total = 0
        self._state: Optional[pa.Table] = None  # columns k (key), c (count); keys distinct
        self._pending: List[pa.Table] = []
        self._pending_rows = 0

    def add(self, values: pa.Array) -> None:
        """values: flat array of raw values (int or string; nulls allowed)."""
        if self.kind is None:
            self.kind = key_kind(values.type)
        values = align(values, self.kind)
        self.total += len(values)
        self.nulls += values.null_count
        if values.null_count:
            values = values.drop_null()
        if not len(values):
            return
        vc = pc.value_counts(values)
        self._pending.append(pa.table({"k": vc.field("values"), "c": vc.field("counts")}))
        self._pending_rows += len(vc)
        if self._pending_rows > max(MIN_MERGE_ROWS, 0 if self._state is None else self._state.num_rows):
            self._merge()

    def _merge(self) -> None:
        parts = ([self._state] if self._state is not None else []) + self._pending
        self._pending, self._pending_rows = [], 0
        if not parts:
            return
        merged = pa.concat_tables(parts).group_by("k").aggregate([("c", "sum")])
        self._state = pa.table({"k": merged.column("k"), "c": merged.column("c_sum")})

    def finish(self, min_count: int) -> Vocab:
        """The vocabulary of values seen at least ``min_count`` times: indices 1..V by decreasing count (ties by
        value), a kept missing value last."""
        self._merge()
        kind = self.kind or "int"
        if self._state is None:
            keys = pa.array([], pa.int64() if kind == "int" else pa.string())
            counts = np.zeros(0, np.int64)
            distinct = 0
        else:
            distinct = self._state.num_rows
            kept = self._state.filter(pc.greater_equal(self._state.column("c"), min_count))
            kept = kept.sort_by([("c", "descending"), ("k", "ascending")])
            keys = kept.column("k").combine_chunks()
            counts = kept.column("c").to_numpy()
        null_index = len(keys) + 1 if self.nulls and self.nulls >= min_count else UNKNOWN
        return Vocab(kind, keys, counts, null_index, self.nulls, distinct + (1 if self.nulls else 0))


class Vocab:
    """value -> index in 1..size (0 = unknown). ``keys[i]`` has index i + 1; a missing value has ``null_index``."""

    def __init__(self, kind: str, keys: pa.Array, counts: np.ndarray, null_index: int, null_count: int,
                 distinct: int):
        self.kind = kind
        self.keys = keys
        self.counts = counts
        self.null_index = null_index
        self.null_count = null_count
        self.distinct = distinct  # distinct values in train (missing counted as one), before min_count
        self.size = len(keys) + (1 if null_index != UNKNOWN else 0)
        self.num_embeddings = self.size + 1
        index = np.arange(1, len(keys) + 1, dtype=np.int64)
        if kind == "int":
            k = keys.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            order = np.argsort(k, kind="stable")
            self._sorted, self._index = k[order], index[order]
        else:
            self._lookup: Dict[str, int] = dict(zip(keys.to_pylist(), index.tolist()))

    def encode(self, values: pa.Array) -> np.ndarray:
        """(n,) int64 indices of a flat array of raw values."""
        values = align(values, self.kind)
        n = len(values)
        if self.kind == "int":
            raw = values.fill_null(0).to_numpy(zero_copy_only=False) if values.null_count else values.to_numpy(
                zero_copy_only=False)
            if len(self._sorted):
                pos = np.searchsorted(self._sorted, raw)
                pos_c = np.minimum(pos, len(self._sorted) - 1)
                out = np.where(self._sorted[pos_c] == raw, self._index[pos_c], UNKNOWN)
            else:
                out = np.zeros(n, np.int64)
        else:
            enc = values.dictionary_encode()
            uniq = enc.dictionary.to_pylist()
            mapped = np.fromiter((self._lookup.get(u, UNKNOWN) for u in uniq), np.int64, len(uniq))
            idx = enc.indices.fill_null(0).to_numpy(zero_copy_only=False) if enc.indices.null_count else \
                enc.indices.to_numpy(zero_copy_only=False)
            out = mapped[idx] if len(uniq) else np.zeros(n, np.int64)
        if values.null_count:
            out = np.where(values.is_null().to_numpy(zero_copy_only=False), self.null_index, out)
        return out.astype(np.int64, copy=False)

    def table(self) -> pa.Table:
        """The vocabulary as a table (value, index, count); a kept missing value is the row with a null value."""
        keys, idx, cnt = self.keys, np.arange(1, len(self.keys) + 1, dtype=np.int64), self.counts
        if self.null_index != UNKNOWN:
            keys = pa.concat_arrays([keys, pa.nulls(1, keys.type)])
            idx = np.append(idx, self.null_index)
            cnt = np.append(cnt, self.null_count)
        return pa.table({"value": keys, "index": idx, "count": np.asarray(cnt, np.int64)})

    def describe(self, min_count: int) -> Dict[str, object]:
        return {"kind": "vocab", "key_type": self.kind, "min_count": min_count, "train_distinct": self.distinct,
                "size": self.size, "num_embeddings": self.num_embeddings}


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser on uint64 (wrapping arithmetic): a well-mixed 64-bit hash of each element."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class Hasher:
    """value -> 1 + hash(value) mod buckets; a missing value -> 0. Integers are hashed with splitmix64, strings with
    8-byte BLAKE2b of their UTF-8 bytes, both salted with ``seed``: stable across runs, machines and processes."""

    def __init__(self, buckets: int, seed: int = 0, kind: Optional[str] = None):
        if buckets < 1:
            raise ValueError(f"hash buckets must be >= 1, got {buckets}")
        self.buckets = buckets
        self.seed = seed
        self.kind = kind
        self.num_embeddings = buckets + 1
        self.size = buckets

    def encode(self, values: pa.Array) -> np.ndarray:
        if self.kind is None:
            self.kind = key_kind(values.type)
        values = align(values, self.kind)
        n = len(values)
        salt = np.uint64(splitmix64(np.array([self.seed], np.uint64))[0])
        if self.kind == "int":
            raw = values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            h = splitmix64(raw.view(np.uint64) ^ salt)
        else:
            enc = values.dictionary_encode()
            key = int(salt).to_bytes(8, "little")
            uh = np.fromiter(
                (int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8, key=key).digest(), "little")
                 for u in enc.dictionary.to_pylist()),
                np.uint64,
                len(enc.dictionary),
            )
            idx = enc.indices.fill_null(0).to_numpy(zero_copy_only=False)
            h = uh[idx] if len(uh) else np.zeros(n, np.uint64)
        out = (h % np.uint64(self.buckets)).astype(np.int64) + 1
        if values.null_count:
            out = np.where(values.is_null().to_numpy(zero_copy_only=False), UNKNOWN, out)
        return out

    def describe(self, min_count: int = 0) -> Dict[str, object]:
        return {"kind": "hash", "key_type": self.kind, "buckets": self.buckets, "size": self.buckets,
                "num_embeddings": self.num_embeddings}
