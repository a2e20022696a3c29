"""``csv``: the preprocessed Ali-CCP CSV layouts people share, and any CSV of the same shape.

    prepare_data.py csv --input train.csv --test-input test.csv --out data/aliccp

Layouts (see tests/data/ali-ccp-samples/SOURCES.md), told apart by the first line of each file:
- a header line (any token that is not a number), e.g. torch-rechub's ``click,purchase,101,...,301,109_14,...,D853``
  or PaddleRec AITM's ``click,purchase,101,...,301``: columns by name.
- no header (every token a number), as PaddleRec AITM's test.csv: the names come from --columns, else from the header
  of another input of the same run with as many columns (AITM: train.csv has one), else from a known layout with that
  many columns (20: AITM, 33: torch-rechub).
- PaddleRec ESMM ``sample_id,click,purchase,field:id,field:id,...`` (a ':' in the 4th token): a variable number of
  features per row, read like the raw release (fields default to the AITM 18; --bag-fields for multi-valued ones).
Labels default to ``click,purchase``; features to every other column except the dense ``D<field>`` columns (the
trainer takes sparse ids only) and the time column. Feature values must be integer ids (use ``table`` for strings).
"""

from __future__ import annotations

import re
from typing import Dict, Iterator, List, Optional, Sequence

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
    first_line,
    first_true,
    is_number,
    labels_matrix,
    parse_feature_list,
    row_words,
    stream_csv,
)
from data_pipeline.formats.table import TableSource

AITM_FIELDS = ["101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "216", "508",
               "509", "702", "853", "301"]
ALICCP_LABELS = ["click", "purchase"]
KNOWN_LAYOUTS = {
    20: ALICCP_LABELS + AITM_FIELDS,  # PaddleRec AITM sample_data
    33: ALICCP_LABELS + ["101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "210",
                         "216", "508", "509", "702", "853", "301", "109_14", "110_14", "127_14", "150_14", "D109_14",
                         "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853"],  # torch-rechub
}
DENSE = re.compile(r"^D\d")
ESMM_ENTRY = re.compile(r"^[^:,]+:[^:,]*$")


def is_esmm_line(line: str) -> bool:
    toks = line.split(",", 4)
    return len(toks) >= 4 and all(is_number(t) for t in toks[:3]) and ESMM_ENTRY.match(toks[3]) is not None


class CsvSource(TableSource):
    format = "csv"
    csv_feature_type = pa.int64()

    def __init__(self, inputs: Dict[str, str], labels: Optional[Sequence[str]] = None,
                 features: Optional[Sequence[str]] = None, bag_fields: Sequence[str] = (), **kw):
        super().__init__(inputs, labels or ALICCP_LABELS, features, **kw)
        self.bag_fields = list(bag_fields)
        self._esmm: Dict[str, bool] = {}
        self._headers: List[List[str]] = []
        self.layouts_seen: Dict[str, str] = {}

    def default_features(self, names: List[str]) -> List[str]:
        return [n for n in super().default_features(names) if not DENSE.match(n)]

    def check(self) -> None:
        self._expand()
        files = [f for fs in self._files.values() for f in fs]
        esmm = {f: is_esmm_line(first_line(f)) for f in files}
        if any(esmm.values()):
            if not all(esmm.values()):
                raise PrepareError("mixing the ESMM 'sample_id,click,purchase,field:id,...' layout with plain CSV "
                                   f"files: {sorted(f for f in files if not esmm[f])}")
            self._check_esmm(files)
            return
        # headers of all files first, so a headerless file can borrow the names of a headed one
        for f in files:
            line = first_line(f)
            toks = [t.strip().strip('"') for t in line.split(self.delimiter)]
            if line and not all(is_number(t) for t in toks):
                self._headers.append(toks)
        super().check()
        for f in files:
            lay = self._layouts.get(f)
            if lay is not None:
                self.layouts_seen[f] = "header" if lay.header else "no header"

    def csv_layout(self, path: str, names_hint: Optional[List[str]]) -> CsvLayout:
        line = first_line(path)
        if not line:
            return CsvLayout([], header=False, delimiter=self.delimiter)
        toks = [t.strip().strip('"') for t in line.split(self.delimiter)]
        if not all(is_number(t) for t in toks):
            if self.columns and toks != self.columns:
                raise PrepareError(f"{path}: header {toks} differs from --columns {self.columns}")
            return CsvLayout(toks, header=True, delimiter=self.delimiter)
        n = len(toks)
        if self.columns:
            if len(self.columns) != n:
                raise PrepareError(f"{path}: --columns names {len(self.columns)} columns but the file has {n}")
            return CsvLayout(list(self.columns), header=False, delimiter=self.delimiter)
        for h in self._headers:
            if len(h) == n:
                return CsvLayout(list(h), header=False, delimiter=self.delimiter)
        if n in KNOWN_LAYOUTS:
            return CsvLayout(list(KNOWN_LAYOUTS[n]), header=False, delimiter=self.delimiter)
        raise PrepareError(f"{path}: no header line and {n} columns, not a known Ali-CCP layout; name the columns "
                           "with --columns")

    # ------------------------------------------------------------------ ESMM layout

    def _check_esmm(self, files: List[str]) -> None:
        if len(self.labels) != 2:
            raise PrepareError(f"the ESMM layout has 2 labels (click, purchase), got --labels {self.labels}")
        if self.time_column:
            raise PrepareError("the ESMM layout has no time column; use --test-input or --test-fraction")
        names = list(self.feature_names or AITM_FIELDS)
        self.fields = [FieldDef(n) for n in names if n not in self.bag_fields]
        self.fields += [FieldDef(b, multi_valued=True) for b in self.bag_fields]
        self.feature_names = [f.name for f in self.fields]
        for f in files:
            self._esmm[f] = True
            self.layouts_seen[f] = "esmm"

    def chunks(self, role: str, bad: BadRows, progress: Optional[Progress]) -> Iterator[RawChunk]:
        if not self._esmm:
            yield from super().chunks(role, bad, progress)
            return
        offset = 0
        for path in self._files[role]:
            layout = CsvLayout(["line"], header=False, delimiter="\x1f", quoting=False)
            word = row_words(path, False)
            seen = 0
            for before, batch in stream_csv(path, layout, {"line": pa.string()}, bad, progress, self.block_bytes):
                yield from self._esmm_chunk(path, batch.column(0), before, offset, bad, word)
                seen = before + batch.num_rows
            offset += seen

    def _esmm_chunk(self, path: str, lines: pa.Array, before: int, offset: int, bad: BadRows, word):
        n = len(lines)
        rows = np.arange(before + 1, before + n + 1, dtype=np.int64)
        parts = pc.split_pattern(lines, ",", max_splits=3)
        short = pc.less(pc.list_value_length(parts), 4).to_numpy(zero_copy_only=False)
        if short.any():
            i = first_true(short)
            bad.add("short_row", word(int(rows[i])), lines[i].as_py(), n=int(short.sum()))
            bad.check()
            keep = np.flatnonzero(~short)
            parts, rows, lines = parts.take(pa.array(keep)), rows[keep], lines.take(pa.array(keep))
        labs = []
        for k in (1, 2):
            col = pc.list_element(parts, k)
            try:
                labs.append(pc.cast(col, pa.float64()))
            except pa.ArrowInvalid:
                vals = col.to_pylist()
                i = next(i for i, v in enumerate(vals) if not is_number(v))
                raise PrepareError(f"{word(int(rows[i]))}: label column {self.labels[k - 1]!r} has value {vals[i]!r}, "
                                   "not a number") from None
        labels = labels_matrix(labs, self.labels, path, rows, word)
        feats, _, _, bad_entry, bad_id = parse_feature_list(pc.list_element(parts, 3), self.fields, ",", ":", None)
        for reason, mask in (("bad_feature_entry", bad_entry), ("bad_feature_id", bad_id & ~bad_entry)):
            if mask.any():
                i = first_true(mask)
                bad.add(reason, word(int(rows[i])), lines[i].as_py(), n=int(mask.sum()))
        bad.check()
        ok = ~(bad_entry | bad_id)
        chunk = RawChunk(file=path, rows=rows, index=rows - 1 + offset, labels=labels, features=feats)
        yield chunk if ok.all() else chunk.take(ok)

    def describe(self) -> Dict[str, object]:
        d = super().describe()
        d["layouts"] = self.layouts_seen
        return d
