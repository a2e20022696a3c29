"""Raw feature values of a customer table -> the int64 tensors the exported model (``model.pt`` / ``model.pt2``) takes.

The artifact maps raw values to embedding indices itself; what stays outside it is only what TorchScript cannot do:

- **string values** become their *string key*: the 8-byte BLAKE2b of the UTF-8 bytes, keyed with
  ``string_salt(seed)`` (``seed`` = the seed the data was prepared with, recorded in model.json), read little-endian
  as an int64. For a hashed string field this is exactly the hash training used (``vocab.Hasher``); for a string
  vocabulary the artifact holds the keys of the vocabulary's strings.
- **missing values** (nulls) become a ``missing`` mask beside the values.

Only numpy, pyarrow and hashlib: a production caller can copy ``string_key`` (docs/serving.md shows it too).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.spec import WEIGHT_SUFFIX

MISSING_POLICIES = ("encode", "error")


def string_salt(seed: int) -> bytes:
    """The BLAKE2b key of string values: splitmix64(seed) as 8 little-endian bytes (as ``vocab.Hasher`` uses)."""
    m = (1 << 64) - 1
    z = (int(seed) + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)).to_bytes(8, "little")


def string_key(value: str, salt: bytes) -> int:
    """The int64 a string value is passed to the model as (see module docstring)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8, key=salt).digest(), "little", signed=True)


def string_keys(values: pa.Array, salt: bytes) -> np.ndarray:
    """(n,) int64 string keys of a string array; a null gets 0 (the caller masks it as missing)."""
    enc = pc.dictionary_encode(values) if not pa.types.is_dictionary(values.type) else values
    uniq = enc.dictionary.to_pylist()
    keys = np.fromiter((string_key(u, salt) for u in uniq), np.int64, len(uniq))
    idx = enc.indices.fill_null(0).to_numpy(zero_copy_only=False) if enc.indices.null_count else \
        enc.indices.to_numpy(zero_copy_only=False)
    return keys[idx] if len(uniq) else np.zeros(len(values), np.int64)


@dataclass
class FieldInput:
    """One model input field as model.json describes it: ``value_type`` 'int64' or 'string'."""

    name: str
    value_type: str = "int64"
    multi_valued: bool = False
    weighted: bool = False  # a weighted bag: column <name>__weights holds one float weight per value

    @property
    def weight_column(self) -> str:
        return self.name + WEIGHT_SUFFIX


def fields_from_card(card: Dict[str, Any]) -> List[FieldInput]:
    return [FieldInput(f["name"], f.get("value_type", "int64"), bool(f.get("multi_valued", False)),
                       bool(f.get("weighted", False)))
            for f in card["fields"]]


@dataclass
class RawInputs:
    """A batch ready for the model. ``dense``: ``raw``/``missing`` are (B, F) for ``model(raw, missing)``; else
    ``values``/``lengths``/``missing`` are the KJT layout for ``model.forward_raw_jagged(values, lengths, missing)``."""

    rows: int
    dense: bool
    raw: Optional[np.ndarray] = None  # (B, F) int64
    values: Optional[np.ndarray] = None  # (N,) int64
    lengths: Optional[np.ndarray] = None  # (F*B,) int64
    missing: Optional[np.ndarray] = None  # (B, F) or (N,) bool
    weights: Optional[np.ndarray] = None  # (N,) float32 per-value weights when a field is a weighted bag

    def torch_args(self):
        import torch

        if self.dense:
            return torch.from_numpy(self.raw), torch.from_numpy(self.missing)
        args = (torch.from_numpy(self.values), torch.from_numpy(self.lengths), torch.from_numpy(self.missing))
        return args if self.weights is None else args + (torch.from_numpy(self.weights),)


def _plain(arr: pa.Array) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def encode_values(arr: pa.Array, value_type: str, salt: bytes, column: str = "") -> tuple:
    """A flat array of raw values -> ((n,) int64 raw, (n,) bool missing), cast like ``vocab.align`` does: integers
    (and bools) for int64 fields, strings parsed as integers (an unparsable one is an error); for string fields
    integers become their decimal string."""
    arr = _plain(arr)
    t = arr.type
    if pa.types.is_boolean(t):
        arr, t = arr.cast(pa.int64()), pa.int64()
    if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
        raise ValueError(f"column {column!r} has type {t}: features must be integer or string values")
    missing = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else np.zeros(len(arr), bool)
    try:
        if value_type == "string":
            arr = arr.cast(pa.string())
            raw = string_keys(arr, salt)
        else:
            arr = arr.cast(pa.int64())
            raw = arr.fill_null(0).to_numpy(zero_copy_only=False) if arr.null_count else \
                arr.to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"column {column!r}: values do not convert to the field's {value_type} type ({e})") from None
    return np.ascontiguousarray(raw, dtype=np.int64), missing


def count_missing(arr: pa.Array, multi_valued: bool) -> int:
    """Absent values of a column: nulls, and for a bag column null bags plus nulls inside bags."""
    arr = _plain(arr)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        return arr.null_count + pc.list_flatten(arr).null_count
    return arr.null_count


def table_to_inputs(table: pa.Table, fields: Sequence[FieldInput], salt: bytes, missing: str = "encode"
                    ) -> RawInputs:
    """Columns named like the fields -> RawInputs (dense when no field is multi-valued).

    Missing values (``missing='encode'``): a null scores as training encoded a missing value (the vocabulary's own
    index for missing when it was frequent enough in train, else the unknown index 0); a null bag is an empty bag.
    ``missing='error'``: any null is a ValueError naming the column and the count.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing policy must be one of {MISSING_POLICIES}, got {missing!r}")
    absent = [f.name for f in fields if f.name not in table.column_names]
    absent += [f.weight_column for f in fields if f.weighted and f.weight_column not in table.column_names]
    if absent:
        raise ValueError(f"the input has no column(s) {absent}; the model needs {[f.name for f in fields]} "
                         f"(+ the weights {[f.weight_column for f in fields if f.weighted]} of its weighted bags)")
    n = table.num_rows
    if missing == "error":
        for f in fields:
            k = count_missing(table.column(f.name), f.multi_valued)
            if k:
                raise ValueError(f"column {f.name!r} has {k} missing value(s) in {n} rows (missing policy 'error')")
    dense = not any(f.multi_valued for f in fields)
    weighted = any(f.weighted for f in fields)
    if dense:
        raw = np.empty((n, len(fields)), np.int64)
        miss = np.empty((n, len(fields)), bool)
        for i, f in enumerate(fields):
            raw[:, i], miss[:, i] = encode_values(table.column(f.name), f.value_type, salt, f.name)
        return RawInputs(rows=n, dense=True, raw=raw, missing=miss)
    values: List[np.ndarray] = []
    lengths: List[np.ndarray] = []
    misses: List[np.ndarray] = []
    weights: List[np.ndarray] = []
    for f in fields:
        col = _plain(table.column(f.name))
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            flat = pc.list_flatten(col)  # null bags contribute nothing: an empty bag, as in training
            lens = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        elif not f.multi_valued:  # one value per row; a null is a missing value, masked below
            flat, lens = col, np.ones(n, np.int64)
        else:  # a scalar column for a bag field: a bag of that one value; a null is an empty bag
            flat = col.drop_null() if col.null_count else col
            lens = (~col.is_null().to_numpy(zero_copy_only=False)).astype(np.int64) if col.null_count else \
                np.ones(n, np.int64)
        v, m = encode_values(flat, f.value_type, salt, f.name)
        values.append(v)
        misses.append(m)
        lengths.append(lens)
        if weighted:
            weights.append(_bag_weights(table.column(f.weight_column), lens, f) if f.weighted
                           else np.ones(len(v), np.float32))
    return RawInputs(rows=n, dense=False, values=np.concatenate(values), lengths=np.concatenate(lengths),
                     missing=np.concatenate(misses), weights=np.concatenate(weights) if weighted else None)


def _bag_weights(col: pa.Array, lens: np.ndarray, f: FieldInput) -> np.ndarray:
    """The flat float32 weights of a weighted bag column, checked against its bags' lengths (a null list of weights
    is accepted only for an empty or null bag)."""
    col = _plain(col)
    if not ((pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) and
            (pa.types.is_floating(col.type.value_type) or pa.types.is_integer(col.type.value_type))):
        raise ValueError(f"column {f.weight_column!r} has type {col.type}: the weights of bag field {f.name!r} must be "
                         "a list of numbers, one per value")
    wlens = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    bad = np.flatnonzero(wlens != lens)
    if len(bad):
        raise ValueError(f"row {int(bad[0])}: column {f.weight_column!r} has {int(wlens[bad[0]])} weight(s) for "
                         f"{int(lens[bad[0]])} value(s) of {f.name!r}; give exactly one weight per value")
    flat = pc.list_flatten(col)
    if flat.null_count:
        raise ValueError(f"column {f.weight_column!r} has {flat.null_count} null weight(s); give every value a weight")
    w = flat.cast(pa.float32()).to_numpy(zero_copy_only=False)
    if not np.isfinite(w).all():
        raise ValueError(f"column {f.weight_column!r} holds NaN or infinite weights")
    return w
