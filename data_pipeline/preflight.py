"""Checks a data folder before any worker starts, from Parquet footers only (no row data is read): every shard
opens (not corrupt or truncated), has the spec's columns with usable types, holds ids inside each table's range
(from row-group statistics), and each split has at least as many files as workers (each worker reads whole files).

Errors name the file, column and what to do; the reader re-checks ids per row group at read time for files whose
writer stored no statistics.
"""

from __future__ import annotations

from typing import Dict, List

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.reader import ShardReader
from data_pipeline.spec import DatasetSpec


class DataError(ValueError):
    pass


def _id_range_from_stats(meta: pq.FileMetaData, column: str):
    """(min, max) over row groups from footer statistics, or None when any row group lacks them."""
    idx = meta.schema.to_arrow_schema().get_field_index(column)
    if idx < 0:
        return None
    lo = hi = None
    for g in range(meta.num_row_groups):
        # a list<int64> column's leaf is a different column index; only flat int columns are checked here
        col = meta.row_group(g).column(idx)
        st = col.statistics
        if col.path_in_schema != column or st is None or not st.has_min_max:
            return None
        lo = st.min if lo is None else min(lo, st.min)
        hi = st.max if hi is None else max(hi, st.max)
    return lo, hi


def preflight(spec: DatasetSpec, world_size: int, splits=("train", "valid", "test")) -> Dict[str, int]:
    """Returns the number of files per split; raises DataError on the first problem found."""
    counts: Dict[str, int] = {}
    card = {f.name: f.num_embeddings for f in spec.fields}
    for split in splits:
        files: List[str] = spec.files(split)
        if len(files) < world_size:
            raise DataError(f"split {split!r} has {len(files)} shard file(s) but train.num_workers={world_size}: "
                            "each worker reads whole files, so write more shards (smaller rows_per_file) or use "
                            "fewer workers")
        for f in files:
            try:
                meta = pq.read_metadata(f)
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{f}: cannot read it as Parquet ({e}); the file is corrupt or truncated: "
                                "re-write this shard") from None
            for name, n in card.items():
                rng = _id_range_from_stats(meta, name)
                if rng is not None and (rng[0] < 0 or rng[1] >= n):
                    raise DataError(f"{f}: column {name!r} holds ids in [{rng[0]}, {rng[1]}], outside the table's "
                                    f"[0, {n}) (num_embeddings in spec.json): fix the ids or the spec")
        try:
            ShardReader(spec, files, batch_size=1)  # schema checks (columns present, types), footers only
        except ValueError as e:
            raise DataError(str(e)) from None
        counts[split] = len(files)
    return counts
