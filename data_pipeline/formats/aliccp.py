"""``aliccp``: the raw Ali-CCP release (Ma et al., ESMM, SIGIR'18), as the AITM paper (KDD'21) used it.

    prepare_data.py aliccp --raw-dir ali-ccp/ --min-count 11 --out data/aliccp   # AITM: ids seen more than 10 times

``--raw-dir`` holds ``sample_skeleton_{train,test}.csv`` and ``common_features_{train,test}.csv`` (or ``.csv.gz``):
- sample_skeleton: no header; sample_id, click, purchase, common_feature_index, feature_num, feature_list
- common_features: no header; common_feature_index, feature_num, feature_list (the user-side fields)
- feature_list: entries joined by \\x01, each ``field_id \\x02 feature_id \\x03 value``.

Each sample is joined with the user-side features of its common_feature_index. The common-features table of the split
being read is indexed in memory (key -> row, plus only the wanted fields: 9 int64 per user for the AITM fields); the
skeleton is streamed block by block. Fields default to the 18 single-valued AITM fields; ``bag_fields`` adds
multi-valued ones (e.g. 109_14) as weighted bags whose weights are the entry values. A field absent from a sample is
a missing value. The official test set is the test split; validation is drawn from train by ``prepare``.

Malformed rows are counted by reason and skipped (up to --max-bad-rows): a row with the wrong number of columns, an
entry without its \\x02/\\x03 separators, a non-integer id or non-numeric bag value, feature_num disagreeing with the
number of entries (a truncated line), a common_feature_index missing from the common-features file.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.formats.common import (
    BadRows,
    CsvLayout,
    FieldDef,
    PrepareError,
    Progress,
    RawChunk,
    Source,
    file_size,
    first_true,
    labels_matrix,
    parse_feature_list,
    row_words,
    stream_csv,
)
from data_pipeline.formats.csvfmt import AITM_FIELDS, ALICCP_LABELS

SKELETON = ["sample_id", "click", "purchase", "common_feature_index", "feature_num", "feature_list"]
COMMON = ["common_feature_index", "feature_num", "feature_list"]
ENTRY, KV, VAL = "\x01", "\x02", "\x03"


def raw_file(raw_dir: str, stem: str) -> str:
    for ext in (".csv", ".csv.gz"):
        p = os.path.join(raw_dir, stem + ext)
        if os.path.isfile(p):
            return p
    return os.path.join(raw_dir, stem + ".csv")


class CommonIndex:
    """common_feature_index -> row, and per wanted field the values of every row (single: int64 with nulls; bag:
    list<int64> with list<float32> weights)."""

    def __init__(self) -> None:
        self.rows: Dict[str, int] = {}
        self.features: Dict[str, pa.Array] = {}
        self.weights: Dict[str, pa.Array] = {}
        self.n = 0
        self.duplicates = 0


class AliccpSource(Source):
    format = "aliccp"

    def __init__(self, raw_dir: str, fields: Optional[Sequence[str]] = None, bag_fields: Sequence[str] = (),
                 block_mb: float = 4.0):
        self.raw_dir = raw_dir
        self.labels = list(ALICCP_LABELS)
        names = list(fields) if fields else list(AITM_FIELDS)
        self.fields: List[FieldDef] = [FieldDef(n) for n in names if n not in bag_fields]
        self.fields += [FieldDef(b, multi_valued=True, weighted=True) for b in bag_fields]
        self.block_bytes = max(1 << 16, int(block_mb * (1 << 20)))
        self.files = {
            role: (raw_file(raw_dir, f"sample_skeleton_{role}"), raw_file(raw_dir, f"common_features_{role}"))
            for role in ("train", "test")
        }
        self.common_stats: Dict[str, Dict[str, int]] = {}

    def roles(self) -> Dict[str, List[str]]:
        return {role: [skel] for role, (skel, _) in self.files.items()}

    def input_bytes(self) -> int:
        return sum(file_size(f) for pair in self.files.values() for f in pair)

    def check(self) -> None:
        if not os.path.isdir(self.raw_dir):
            raise PrepareError(f"--raw-dir {self.raw_dir}: no such folder")
        missing = [p for pair in self.files.values() for p in pair if not os.path.isfile(p)]
        if missing:
            raise PrepareError(
                f"{self.raw_dir}: missing {', '.join(os.path.basename(m) for m in missing)}; --raw-dir must hold "
                "sample_skeleton_{train,test}.csv and common_features_{train,test}.csv (the extracted Ali-CCP release)"
            )
        if not self.fields:
            raise PrepareError("no fields selected; give --fields")
        dup = sorted({f.name for f in self.fields if [g.name for g in self.fields].count(f.name) > 1})
        if dup:
            raise PrepareError(f"fields listed twice: {dup}")

    # ------------------------------------------------------------------ common features

    def _load_common(self, role: str, bad: BadRows, progress: Optional[Progress]) -> CommonIndex:
        """The index of common_features_<role>: parsed from the CSV on the first pass (and saved to the scratch
        folder as an Arrow file, when one is set), memory-mapped from that file on the second."""
        path = self.files[role][1]
        cache = os.path.join(self.scratch, f"common_{role}.arrow") if self.scratch else None
        if cache and os.path.isfile(cache):
            table = pa.ipc.open_file(pa.memory_map(cache)).read_all()
            if progress is not None:
                progress(file_size(path))
        else:
            table = self._parse_common(role, path, bad, progress)
            if cache:
                with pa.OSFile(cache, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                    w.write_table(table)
        idx = CommonIndex()
        for k, v in idx_items(table.column("__key").to_pylist(), 0):
            if k in idx.rows:
                idx.duplicates += 1
            else:
                idx.rows[k] = v
        idx.n = table.num_rows
        for fd in self.fields:
            idx.features[fd.name] = table.column(fd.name).combine_chunks()
            if fd.weighted:
                idx.weights[fd.name] = table.column(fd.name + "__w").combine_chunks()
        self.common_stats.setdefault(role, {}).update(
            {"rows": idx.n, "distinct_keys": len(idx.rows), "duplicate_keys": idx.duplicates})
        return idx

    def _parse_common(self, role: str, path: str, bad: BadRows, progress: Optional[Progress]) -> pa.Table:
        """Table of the good rows of common_features_<role>: __key, one column per field (+ <bag>__w weights)."""
        word = row_words(path, False)
        layout = CsvLayout(COMMON, header=False, quoting=False)
        types = {c: pa.string() for c in COMMON}
        cols: Dict[str, List[pa.Array]] = {"__key": []}
        for fd in self.fields:
            cols[fd.name] = []
            if fd.weighted:
                cols[fd.name + "__w"] = []
        prev_role, bad.role = bad.role, f"{role}:common_features"
        try:
            for before, batch in stream_csv(path, layout, types, bad, progress, self.block_bytes):
                rows = np.arange(before + 1, before + batch.num_rows + 1, dtype=np.int64)
                f, w, entries, bad_entry, bad_id = parse_feature_list(batch.column("feature_list"), self.fields,
                                                                     ENTRY, KV, VAL)
                ok = self._row_checks(batch, entries, bad_entry, bad_id, bad, word, rows)
                keep = pa.array(np.flatnonzero(ok))
                cols["__key"].append(batch.column("common_feature_index").take(keep))
                for fd in self.fields:
                    cols[fd.name].append(f[fd.name].take(keep))
                    if fd.weighted:
                        cols[fd.name + "__w"].append(w[fd.name].take(keep))
        finally:
            bad.role = prev_role
        types_out = {"__key": pa.string()}
        for fd in self.fields:
            types_out[fd.name] = self._type(fd.name)
            if fd.weighted:
                types_out[fd.name + "__w"] = pa.list_(pa.float32())
        return pa.table({k: _concat(v, types_out[k]) for k, v in cols.items()})

    def _type(self, name: str) -> pa.DataType:
        f = next(f for f in self.fields if f.name == name)
        return pa.list_(pa.int64()) if f.multi_valued else pa.int64()

    @staticmethod
    def _row_checks(batch: pa.RecordBatch, entries: np.ndarray, bad_entry: np.ndarray, bad_id: np.ndarray,
                    bad: BadRows, word, rows: np.ndarray, unknown: Optional[np.ndarray] = None) -> np.ndarray:
        """Count the malformed rows of a block (each once, under its first reason) and return the good-row mask."""
        fnum_txt = batch.column("feature_num")
        num_ok = pc.utf8_is_digit(fnum_txt).to_numpy(zero_copy_only=False)
        fnum = np.full(len(num_ok), -1, np.int64)
        if num_ok.any():
            fnum[num_ok] = pc.cast(fnum_txt.filter(pa.array(num_ok)), pa.int64()).to_numpy()
        checks: List[Tuple[str, np.ndarray]] = [
            ("bad_feature_entry", bad_entry),
            ("bad_feature_id", bad_id),
            ("feature_num_mismatch", ~num_ok | (fnum != entries)),
        ]
        if unknown is not None:
            checks.append(("unknown_common_key", unknown))
        seen = np.zeros(len(entries), bool)
        text = batch.column("feature_list")
        for reason, mask in checks:
            new = mask & ~seen
            if new.any():
                i = first_true(new)
                bad.add(reason, word(int(rows[i])), _row_text(batch, i, text), n=int(new.sum()))
            seen |= mask
        bad.check()
        return ~seen

    # ------------------------------------------------------------------ samples

    def chunks(self, role: str, bad: BadRows, progress: Optional[Progress]) -> Iterator[RawChunk]:
        common = self._load_common(role, bad, progress)
        path = self.files[role][0]
        word = row_words(path, False)
        layout = CsvLayout(SKELETON, header=False, quoting=False)
        types = {"click": pa.float64(), "purchase": pa.float64(), "common_feature_index": pa.string(),
                 "feature_num": pa.string(), "feature_list": pa.string()}
        seen_rows = 0
        for before, batch in stream_csv(path, layout, types, bad, progress, self.block_bytes):
            n = batch.num_rows
            rows = np.arange(before + 1, before + n + 1, dtype=np.int64)
            labels = labels_matrix([batch.column("click"), batch.column("purchase")], self.labels, path, rows, word)
            f, w, entries, bad_entry, bad_id = parse_feature_list(batch.column("feature_list"), self.fields, ENTRY,
                                                                 KV, VAL)
            keys = batch.column("common_feature_index").dictionary_encode()
            pos_u = np.fromiter((common.rows.get(k, -1) for k in keys.dictionary.to_pylist()), np.int64,
                                len(keys.dictionary))
            pos = pos_u[keys.indices.to_numpy(zero_copy_only=False)] if len(pos_u) else np.zeros(n, np.int64)
            ok = self._row_checks(batch, entries, bad_entry, bad_id, bad, word, rows, unknown=pos < 0)
            take = pa.array(np.where(pos < 0, 0, pos)) if common.n else None
            feats: Dict[str, pa.Array] = {}
            wts: Dict[str, pa.Array] = {}
            for fd in self.fields:
                own = f[fd.name]
                if take is None:
                    feats[fd.name] = own
                    if fd.weighted:
                        wts[fd.name] = w[fd.name]
                    continue
                theirs = common.features[fd.name].take(take)
                if not fd.multi_valued:
                    feats[fd.name] = pc.coalesce(own, theirs) if own.null_count else own
                    continue
                use_common = pc.equal(pc.list_value_length(own), 0)
                feats[fd.name] = pc.if_else(use_common, theirs, own)
                wts[fd.name] = pc.if_else(use_common, common.weights[fd.name].take(take), w[fd.name])
            chunk = RawChunk(file=path, rows=rows, index=rows - 1, labels=labels, features=feats, weights=wts)
            yield chunk if ok.all() else chunk.take(ok)
            seen_rows = before + n
        self.common_stats.setdefault(role, {})["skeleton_rows"] = seen_rows

    def describe(self) -> Dict[str, object]:
        return {
            "format": self.format,
            "raw_dir": os.path.abspath(self.raw_dir),
            "inputs": {r: [os.path.abspath(p) for p in pair] for r, pair in self.files.items()},
            "labels": self.labels,
            "fields": [f.name for f in self.fields],
            "bag_fields": [f.name for f in self.fields if f.multi_valued],
            "common_features": self.common_stats,
        }


def idx_items(keys: List[str], base: int):
    return zip(keys, range(base, base + len(keys)))


def _concat(parts: List[pa.Array], t: pa.DataType) -> pa.Array:
    parts = [p for p in parts if len(p)]
    return pa.concat_arrays(parts) if parts else pa.array([], t)


def _row_text(batch: pa.RecordBatch, i: int, text: pa.Array) -> str:
    """The row as text for a message (without sample_id, which is not read), separators shown as ^A ^B ^C."""
    cells = []
    for c in batch.schema.names:
        v = batch.column(c)[i].as_py() if c != "feature_list" else text[i].as_py()
        cells.append(f"{v:g}" if isinstance(v, float) else str(v))
    return ",".join(cells).replace(ENTRY, "^A").replace(KV, "^B").replace(VAL, "^C")
