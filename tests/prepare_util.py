"""Shared helpers of the tests/test_prepare_*.py files: read a prepared folder back through the trainer's reader."""

import os
import subprocess
import sys
from typing import Dict, List, Tuple

import numpy as np
import pyarrow.parquet as pq

from data_pipeline.reader import ShardReader
from data_pipeline.spec import DatasetSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# real Ali-CCP sample files as two public projects ship them (MIT / Apache-2.0; sources and licences in its
# SOURCES.md), kept in the repo so a fresh clone and CI test the real formats, never skipping them
SAMPLES = os.path.join(REPO, "tests", "data", "ali-ccp-samples")


def read_split(out: str, split: str, batch_size: int = 64) -> Tuple[Dict[str, list], np.ndarray]:
    """Every row of ``split`` through ShardReader.iter_eval: ({field: ids per row (int, or list for bags)}, (N, T)
    labels), in file order."""
    spec = DatasetSpec.load(out)
    reader = ShardReader(spec, spec.files(split), batch_size)
    ids: Dict[str, list] = {f: [] for f in spec.field_names}
    labels: List[np.ndarray] = []
    multi = {f.name: f.multi_valued for f in spec.fields}
    for b in reader.iter_eval(reader.num_padded_batches()):
        n = int(b.weights.sum())
        for f in spec.field_names:
            jt = b.features[f]
            lengths = jt.lengths().numpy()[:n]
            values = jt.values().numpy()[: lengths.sum()]
            if multi[f]:
                ends = np.cumsum(lengths)
                ids[f].extend(values[e - k: e].tolist() for e, k in zip(ends, lengths))
            else:
                assert (lengths == 1).all()
                ids[f].extend(values.tolist())
        labels.append(b.labels.numpy()[:n])
    return ids, np.concatenate(labels).astype(np.int64)


def vocab_of(out: str, field: str) -> Dict[object, int]:
    """raw value -> index from the vocabulary file of ``field`` (None = the missing value)."""
    spec = DatasetSpec.load(out)
    t = pq.read_table(os.path.join(out, spec.meta["vocab_files"][field]))
    return dict(zip(t.column("value").to_pylist(), t.column("index").to_pylist()))


def decode(out: str, field: str, ids: list) -> list:
    inv = {v: k for k, v in vocab_of(out, field).items()}
    return [inv.get(i, "<unk>") for i in ids]


def run_cli(args: List[str], timeout: int = 120) -> subprocess.CompletedProcess:
    """``python <args>`` from the repository root, output captured as text."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
