"""Raw inputs -> the partitioned Parquet shards + spec.json the trainer reads, plus report.json.

Two streaming passes over the input of any ``formats`` Source, memory bounded by one read block, one row group per
split and the vocabularies (inherent: O(distinct ids)):

1. scan: every row is read and checked (types, labels, malformed rows), assigned a split, the chain policy applied,
   and the values of the train rows counted per field. Nothing is written, so every input error surfaces before any
   output exists; empty inputs or splits are refused here.
2. write: the same rows again, each field encoded (vocabulary index, or hash bucket), written to
   ``<tmp>/{train,valid,test}/part-NNNNN.parquet``; then vocab/, spec.json, report.json, and the temporary folder is
   renamed to ``out_dir`` (an interrupted run leaves nothing that looks complete).

Splits: an input role 'test'/'valid' goes whole to that split; role 'train' is split into valid (a seeded random
``valid_fraction`` of rows, unless a 'valid' input is given) and train; role 'all' first sends to test the rows with
``time >= test_after`` (time split) or a seeded random ``test_fraction``. The random draws hash (seed, row ordinal), so
they do not depend on block sizes. Vocabulary and statistics come from the train split only (not valid), so the valid
OOV rate is an honest estimate of the test one.

Encoding: index 0 = unknown (a value seen fewer than ``min_count`` times in train, or never), so num_embeddings is
vocabulary size + 1; ``hash_buckets[field] = B`` hashes that field into 1..B instead (num_embeddings B + 1).

Chain violations (y_t = 1 while y_{t-1} = 0, e.g. purchase without click): ``drop`` the row (as AITM's preprocessing
does), ``fix`` it (y_t := y_t * y_{t-1} * ..., i.e. zero the later labels), or ``error``; the count is always
reported per split.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline.formats.common import BadRows, FieldDef, PrepareError, RawChunk, Source, parse_time_arg
from data_pipeline.shards import SplitWriter, atomic_output, check_out_dir, plan_rows_per_file
from data_pipeline.spec import WEIGHT_SUFFIX, DatasetSpec, FieldSpec
from data_pipeline.vocab import UNKNOWN, Counter, Hasher, Vocab, splitmix64

PREPARE_VERSION = 1
SPLITS = ("train", "valid", "test")
CHAIN_POLICIES = ("drop", "fix", "error")
REPORT_FILE = "report.json"


@dataclass
class PrepareConfig:
    min_count: int = 1  # keep values seen >= min_count times in train (AITM: > 10, i.e. 11)
    hash_buckets: Dict[str, int] = field(default_factory=dict)  # field -> buckets, instead of a vocabulary
    valid_fraction: float = 0.1  # of the train input, unless a valid input is given
    test_fraction: Optional[float] = None  # role 'all': seeded random test split
    test_after: Optional[str] = None  # role 'all': time split, test = rows with time >= this ISO date/time
    chain_violations: str = "drop"  # drop | fix | error
    max_bad_rows: int = 1000  # malformed rows skipped before giving up; negative: no limit
    rows_per_file: int = 1_000_000
    row_group_rows: int = 100_000
    min_files: int = 2  # every split gets at least min(min_files, rows) files (the reader gives each rank whole files)
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.chain_violations not in CHAIN_POLICIES:
            raise PrepareError(f"--chain-violations must be one of {CHAIN_POLICIES}, got {self.chain_violations!r}")
        if self.min_count < 1:
            raise PrepareError(f"--min-count must be >= 1, got {self.min_count}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise PrepareError(f"--valid-fraction must lie in [0, 1), got {self.valid_fraction}")
        if self.test_fraction is not None and not 0.0 < self.test_fraction < 1.0:
            raise PrepareError(f"--test-fraction must lie in (0, 1), got {self.test_fraction}")
        if self.test_fraction is not None and self.test_after is not None:
            raise PrepareError("give either a time split (--test-after) or --test-fraction, not both")
        if self.rows_per_file < 1 or self.row_group_rows < 1 or self.min_files < 1:
            raise PrepareError("--rows-per-file, --row-group-rows and --min-files must be >= 1")
        for f, b in self.hash_buckets.items():
            if int(b) < 1:
                raise PrepareError(f"--hash {f}={b}: the number of buckets must be >= 1")


# ---------------------------------------------------------------------------------------------------- helpers


def uniform(seed: int, stream: int, index: np.ndarray) -> np.ndarray:
    """(n,) floats in [0, 1), a fixed function of (seed, stream, row ordinal)."""
    salt = splitmix64(np.array([seed * 1_000_003 + stream], np.uint64))[0]
    z = splitmix64(index.astype(np.uint64) ^ salt)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def chain_violation(labels: np.ndarray) -> np.ndarray:
    """(n,) rows with y_t = 1 while y_{t-1} = 0 for some t."""
    return (labels[:, 1:] > labels[:, :-1]).any(axis=1)


def flat_values(arr: pa.Array) -> pa.Array:
    """The ids of a single-valued column, or all ids of a bag column (null bags are empty)."""
    return pc.list_flatten(arr) if pa.types.is_list(arr.type) else arr


def bag_offsets(arr: pa.Array) -> np.ndarray:
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
    out = np.zeros(len(arr) + 1, np.int32)
    np.cumsum(lengths, out=out[1:])
    return out


def safe_name(i: int, name: str) -> str:
    return f"{i:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:60]}"


class _Stats:
    """Counts of one pass."""

    def __init__(self, tasks: int):
        self.good_by_role: Dict[str, int] = {}
        self.kept = {s: 0 for s in SPLITS}
        self.chain = {s: 0 for s in SPLITS}
        self.dropped_chain = 0
        self.positives = {s: np.zeros(tasks, np.int64) for s in SPLITS}


# ---------------------------------------------------------------------------------------------------- prepare


class Preparer:
    """One run of ``prepare`` (see module docstring)."""

    def __init__(self, source: Source, cfg: PrepareConfig):
        self.src = source
        self.cfg = cfg
        self.roles: Dict[str, List[str]] = {}
        self.test_after_us: Optional[int] = None
        self.encoders: Dict[str, object] = {}
        self.fields: List[FieldDef] = []

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        cfg, src = self.cfg, self.src
        cfg.validate()
        src.check()
        self.fields = list(src.fields)
        self.roles = {r: fs for r, fs in src.roles().items() if fs}
        roles = set(self.roles)
        if "all" in roles:
            if (roles - {"all"}) - {"valid"}:
                raise PrepareError(f"input roles {sorted(roles)}: 'all' can only go with a valid input")
            if cfg.test_after is None and cfg.test_fraction is None:
                raise PrepareError("no test split: give --test-input, a time split (--time-column and --test-after) "
                                   "or --test-fraction")
        else:
            if "train" not in roles:
                raise PrepareError("no train input")
            if "test" not in roles:
                raise PrepareError("no test input: give --test-input, a time split or --test-fraction")
            if cfg.test_after is not None or cfg.test_fraction is not None:
                raise PrepareError("a test input is given: --test-after / --test-fraction do not apply")
        if cfg.test_after is not None:
            if not src.time_column:
                raise PrepareError("--test-after needs --time-column")
            self.test_after_us = parse_time_arg(cfg.test_after)
        elif src.time_column:
            raise PrepareError("--time-column is given without --test-after")
        names = [f.name for f in self.fields]
        unknown = sorted(set(cfg.hash_buckets) - set(names))
        if unknown:
            raise PrepareError(f"--hash names fields that are not features: {unknown} (features: {names})")
        if "valid" not in roles and cfg.valid_fraction <= 0.0:
            raise PrepareError("no validation split: --valid-fraction must be > 0 (or give --valid-input); the "
                               "trainer needs train, valid and test")

    # ------------------------------------------------------------------ passes

    def _bar(self, desc: str):
        from tqdm import tqdm

        return tqdm(total=self.src.input_bytes(), unit="B", unit_scale=True, unit_divisor=1024,
                    disable=not self.cfg.progress, file=sys.stderr, desc=desc, dynamic_ncols=True)

    def _assign(self, chunk: RawChunk, role: str) -> np.ndarray:
        """(n,) split codes 0 train / 1 valid / 2 test."""
        if role in ("test", "valid"):
            return np.full(chunk.n, SPLITS.index(role), np.int8)
        code = np.zeros(chunk.n, np.int8)
        test = np.zeros(chunk.n, bool)
        if role == "all":
            if self.test_after_us is not None:
                test = chunk.time >= self.test_after_us
            else:
                test = uniform(self.cfg.seed, 2, chunk.index) < self.cfg.test_fraction
            code[test] = 2
        if "valid" not in self.roles:
            valid = (uniform(self.cfg.seed, 1, chunk.index) < self.cfg.valid_fraction) & ~test
            code[valid] = 1
        return code

    def _iterate(self, bad: BadRows, stats: _Stats, bar):
        """Yield (split, chunk of that split after the chain policy) over all inputs; fills ``stats``."""
        for role in self.roles:
            bad.role = role
            for chunk in self.src.chunks(role, bad, bar.update):
                if not chunk.n:
                    continue
                stats.good_by_role[role] = stats.good_by_role.get(role, 0) + chunk.n
                split = self._assign(chunk, role)
                viol = chain_violation(chunk.labels)
                if viol.any():
                    if self.cfg.chain_violations == "error":
                        i = int(np.flatnonzero(viol)[0])
                        labs = dict(zip(self.src.labels, chunk.labels[i].tolist()))
                        raise PrepareError(
                            f"{chunk.file}: row {int(chunk.rows[i])}: labels {labs} "
                            f"break the chain {' -> '.join(self.src.labels)} (a later task positive while an earlier "
                            "one is 0); use --chain-violations drop or fix"
                        )
                    for s, name in enumerate(SPLITS):
                        stats.chain[name] += int((viol & (split == s)).sum())
                    if self.cfg.chain_violations == "fix":
                        chunk.labels = np.cumprod(chunk.labels, axis=1, dtype=np.int8)
                    else:
                        stats.dropped_chain += int(viol.sum())
                        chunk = chunk.take(~viol)
                        split = split[~viol]
                for s, name in enumerate(SPLITS):
                    m = split == s
                    k = int(m.sum())
                    if not k:
                        continue
                    part = chunk if k == chunk.n else chunk.take(m)
                    stats.kept[name] += k
                    stats.positives[name] += part.labels.sum(axis=0, dtype=np.int64)
                    yield name, part

    def scan(self) -> Tuple[BadRows, _Stats]:
        bad = BadRows(self.cfg.max_bad_rows)
        stats = _Stats(len(self.src.labels))
        counters = {f.name: Counter() for f in self.fields if f.name not in self.cfg.hash_buckets}
        with self._bar("pass 1/2 scan") as bar:
            for split, part in self._iterate(bad, stats, bar):
                if split != "train":
                    continue
                for name, counter in counters.items():
                    try:
                        counter.add(flat_values(part.features[name]))
                    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
                        raise PrepareError(f"{part.file}: column {name!r}: values of another type than in the "
                                           f"files before ({e})") from None
        bad.check()
        if sum(stats.good_by_role.values()) == 0:
            what = "malformed" if bad.total else "empty"
            files = ", ".join(f for fs in self.roles.values() for f in fs)
            raise PrepareError(f"no usable rows: the input is {what} ({files})")
        empty = [s for s in SPLITS if stats.kept[s] == 0]
        if empty:
            raise PrepareError(
                f"split(s) {empty} would be empty after filtering (rows kept: {stats.kept}; chain violations, "
                f"policy {self.cfg.chain_violations}: {stats.chain}); check the split options (--test-after, "
                "--test-fraction, --valid-fraction) and the inputs"
            )
        for f in self.fields:
            if f.name in self.cfg.hash_buckets:
                self.encoders[f.name] = Hasher(int(self.cfg.hash_buckets[f.name]), seed=self.cfg.seed)
            else:
                self.encoders[f.name] = counters[f.name].finish(self.cfg.min_count)
        return bad, stats

    def _schema(self) -> pa.Schema:
        cols = []
        for f in self.fields:
            cols.append((f.name, pa.list_(pa.int64()) if f.multi_valued else pa.int64()))
            if f.weighted:
                cols.append((f.name + WEIGHT_SUFFIX, pa.list_(pa.float32())))
        cols += [(lab, pa.int8()) for lab in self.src.labels]
        return pa.schema(cols)

    def _encode(self, part: RawChunk, oov: Dict[str, np.ndarray]) -> pa.Table:
        cols: Dict[str, pa.Array] = {}
        for f in self.fields:
            arr = part.features[f.name]
            enc = self.encoders[f.name]
            try:
                ids = enc.encode(flat_values(arr))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise PrepareError(f"{part.file}: column {f.name!r}: values of another type than in train ({e})") \
                    from None
            oov[f.name] += (len(ids), int((ids == UNKNOWN).sum()))
            if f.multi_valued:
                offsets = pa.array(bag_offsets(arr))
                cols[f.name] = pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int64()))
                if f.weighted:
                    w = pc.list_flatten(part.weights[f.name]).cast(pa.float32())
                    cols[f.name + WEIGHT_SUFFIX] = pa.ListArray.from_arrays(offsets, w)
            else:
                cols[f.name] = pa.array(ids, pa.int64())
        for t, lab in enumerate(self.src.labels):
            cols[lab] = pa.array(np.ascontiguousarray(part.labels[:, t]), pa.int8())
        return pa.table(cols)

    def write(self, root: str, stats1: _Stats) -> Tuple[Dict[str, List[str]], _Stats, Dict[str, Dict[str, np.ndarray]]]:
        cfg = self.cfg
        schema = self._schema()
        writers = {
            s: SplitWriter(root, s, schema, plan_rows_per_file(stats1.kept[s], cfg.rows_per_file, cfg.min_files),
                           cfg.row_group_rows)
            for s in SPLITS
        }
        oov = {s: {f.name: np.zeros(2, np.int64) for f in self.fields} for s in SPLITS}
        bad = BadRows(-1)
        stats = _Stats(len(self.src.labels))
        try:
            with self._bar("pass 2/2 write") as bar:
                for split, part in self._iterate(bad, stats, bar):
                    writers[split].write(self._encode(part, oov[split]))
            files = {s: w.close() for s, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        if stats.kept != stats1.kept or stats.good_by_role != stats1.good_by_role:
            raise PrepareError(f"the input changed between the two passes (rows per split {stats1.kept} then "
                               f"{stats.kept}); do not modify the input files while preparing")
        return files, stats, oov

    # ------------------------------------------------------------------ outputs

    def _write_vocab(self, root: str) -> Dict[str, str]:
        os.makedirs(os.path.join(root, "vocab"), exist_ok=True)
        out = {}
        for i, f in enumerate(self.fields):
            enc = self.encoders[f.name]
            if isinstance(enc, Vocab):
                rel = f"vocab/{safe_name(i, f.name)}.parquet"
                pq.write_table(enc.table(), os.path.join(root, rel))
                out[f.name] = rel
        return out

    def report(self, bad: BadRows, stats: _Stats, oov, seconds: Dict[str, float]) -> Dict[str, object]:
        tasks = self.src.labels
        read_by_role = {
            r: stats.good_by_role.get(r, 0) + sum(bad.by_role.get(r, {}).values()) for r in self.roles
        }
        dropped = {reason: 0 for reason in sorted(bad.counts)}
        for r in self.roles:
            for reason, n in bad.by_role.get(r, {}).items():
                dropped[reason] += n
        dropped = {k: v for k, v in dropped.items() if v}
        if stats.dropped_chain:
            dropped["chain_violation"] = stats.dropped_chain
        kept = dict(stats.kept)
        aux = {r: c for r, c in bad.by_role.items() if r not in self.roles}  # e.g. aliccp common-features rows
        report: Dict[str, object] = {
            "format": self.src.format,
            "rows_read": {**read_by_role, "total": sum(read_by_role.values())},
            "rows_kept": {**kept, "total": sum(kept.values())},
            "rows_dropped": {**dropped, "total": sum(dropped.values())},
            "rows_dropped_by_input": {r: dict(bad.by_role.get(r, {})) for r in self.roles},
            "bad_row_examples": dict(bad.examples),
            "chain_violations": {"policy": self.cfg.chain_violations, **stats.chain,
                                 "total": sum(stats.chain.values())},
            "positives": {s: {t: int(stats.positives[s][i]) for i, t in enumerate(tasks)} for s in SPLITS},
            "positive_rate": {s: {t: float(stats.positives[s][i]) / max(1, kept[s]) for i, t in enumerate(tasks)}
                              for s in SPLITS},
            "vocab_size": {f.name: int(self.encoders[f.name].size) for f in self.fields},
            "num_embeddings": {f.name: int(self.encoders[f.name].num_embeddings) for f in self.fields},
            "encoding": {f.name: self.encoders[f.name].describe(self.cfg.min_count) for f in self.fields},
            "oov_rate": {s: {f: float(c[1]) / c[0] if c[0] else 0.0 for f, c in oov[s].items()}
                         for s in ("valid", "test", "train")},
            "oov_note": "share of a split's ids (for bags: of all ids) encoded as the unknown index 0: values seen "
                        "fewer than min_count times in train (for hashed fields: missing values)",
            "source": self.src.describe(),
            "config": asdict(self.cfg),
            "seconds": seconds,
        }
        if aux:
            report["auxiliary_bad_rows"] = aux
        return report

    def run(self, out_dir: str) -> Dict[str, object]:
        out_dir = check_out_dir(out_dir)
        t0 = time.time()
        self.check()
        parent = os.path.dirname(out_dir)
        os.makedirs(parent, exist_ok=True)
        self.src.scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.scratch-", dir=parent)
        try:
            return self._run(out_dir, t0)
        finally:
            shutil.rmtree(self.src.scratch, ignore_errors=True)
            self.src.scratch = None

    def _run(self, out_dir: str, t0: float) -> Dict[str, object]:
        bad, stats1 = self.scan()
        t1 = time.time()
        with atomic_output(out_dir) as tmp:
            files, stats, oov = self.write(tmp, stats1)
            t2 = time.time()
            vocab_files = self._write_vocab(tmp)
            report = self.report(bad, stats, oov, {"scan": round(t1 - t0, 3), "write": round(t2 - t1, 3)})
            with open(os.path.join(tmp, REPORT_FILE), "w") as f:
                json.dump(report, f, indent=1, sort_keys=False)
            spec = DatasetSpec(
                fields=[FieldSpec(f.name, int(self.encoders[f.name].num_embeddings), f.multi_valued, f.weighted)
                        for f in self.fields],
                labels=list(self.src.labels),
                splits=files,
                rows=dict(stats.kept),
                meta={
                    "generator": "data_pipeline.prepare",
                    "prepare_version": PREPARE_VERSION,
                    "format": self.src.format,
                    "unknown_index": UNKNOWN,
                    "encoding": report["encoding"],
                    "vocab_files": vocab_files,
                    "weight_columns": {f.name: f.name + WEIGHT_SUFFIX for f in self.fields if f.weighted},
                    "label_rate": report["positive_rate"],
                    "chain_violations": report["chain_violations"],
                    "report": REPORT_FILE,
                    "config": asdict(self.cfg),
                },
            )
            spec.save(tmp)  # spec.json last inside the folder; the rename then publishes everything at once
        spec.root = out_dir
        report["out"] = out_dir
        return report


def prepare(source: Source, out_dir: str, cfg: Optional[PrepareConfig] = None) -> Dict[str, object]:
    """Convert ``source`` into a dataset folder at ``out_dir`` (must not exist, or be empty); return the report."""
    return Preparer(source, cfg or PrepareConfig()).run(out_dir)
