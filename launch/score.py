"""Score a customer table with an exported model on Ray Data: one probability column per task, optionally the
ranked targeting list.

    python launch/score.py --model runs/pimm-... --input customers.parquet --out scores.parquet
    python launch/score.py --model runs/pimm-... --input customers/ --out scores.parquet --top-k 10000 \\
        --id-column customer_id --missing error

The input is a Parquet file or a folder of them (read with ``ray.data.read_parquet``), holding one column per model
field, named as in model.json, with the RAW values as in the table data preparation read (integers, strings, or
lists of them for bag fields); other columns are ignored except the id column, which is copied to the output.
Scoring runs in ``map_batches`` on a pool of actors (one CPU each; by default one per CPU of the cluster, less one
for reading), each loading ``model.pt`` once. The driver streams the results into ``--out`` (one Parquet file:
the id column, then ``p_<task>`` float32 per task in chain order), written to a temporary file and renamed at the
end, so an interrupted run leaves no partial output.

``--top-k N`` also writes ``<out>_top<N>.parquet`` (or ``--top-k-out``): the N rows with the highest final-task
probability, best first, with a ``rank`` column (1 = best; ties keep input order).

Missing values (nulls): ``--missing encode`` (default) scores them as training encoded a missing value (the
vocabulary's own index for "missing" when it was frequent in train, else the unknown index 0; a null bag is an empty
bag); ``--missing error`` refuses the input before scoring, naming each column with nulls and their count.

Ray: started in-process on this machine (``ray.init(num_cpus=...)``) unless RAY_ADDRESS names a cluster to join
(the input and output paths must then be visible to every node).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from data_pipeline.raw_inputs import MISSING_POLICIES, count_missing, fields_from_card, table_to_inputs  # noqa: E402

MODEL_FILE = "model.pt"
MODEL_CARD = "model.json"
PROB_PREFIX = "p_"
PARQUET_EXTS = (".parquet", ".pq")


class ScoreError(Exception):
    """A problem with the inputs, reported without a traceback."""


def load_card(model: str) -> tuple:
    """(path of model.pt, model.json as a dict) for a run folder or a model.pt path; the file's sha256 must match
    the card's."""
    pt = os.path.join(model, MODEL_FILE) if os.path.isdir(model) else model
    card_path = os.path.join(os.path.dirname(pt), MODEL_CARD)
    if not os.path.isfile(pt) or not os.path.isfile(card_path):
        raise ScoreError(f"--model {model}: expected {MODEL_FILE} and {MODEL_CARD} (run launch/export.py first)")
    with open(card_path) as f:
        card = json.load(f)
    if card.get("format_version", 1) < 2:
        raise ScoreError(f"{card_path}: format_version {card.get('format_version', 1)} predates raw-value inputs; "
                         "re-export the run with launch/export.py")
    want = card.get("files", {}).get(MODEL_FILE, {}).get("sha256")
    if want:
        h = hashlib.sha256()
        with open(pt, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != want:
            raise ScoreError(f"{pt} does not match the sha256 in {card_path}: the files are from different exports")
    return pt, card


def input_files(path: str) -> List[str]:
    if os.path.isfile(path):
        return [os.path.abspath(path)]
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if f.endswith(PARQUET_EXTS) and not f.startswith((".", "_")))
        if files:
            return [os.path.abspath(f) for f in files]
        raise ScoreError(f"--input {path}: no Parquet files in the folder")
    raise ScoreError(f"--input {path}: no such file or folder")


def pick_id_column(names: List[str], card: Dict[str, Any], given: Optional[str]) -> Optional[str]:
    """The given column, else the only input column that is neither a field nor a label; None when there is none."""
    fields = [f["name"] for f in card["fields"]]
    if given is not None:
        if given not in names:
            raise ScoreError(f"--id-column {given!r} is not in the input (columns: {names})")
        return given
    others = [n for n in names if n not in fields and n not in card["tasks"]]
    if len(others) > 1:
        raise ScoreError(f"several columns could be the id {others}: name it with --id-column")
    return others[0] if others else None


def check_missing(files: List[str], card: Dict[str, Any]) -> None:
    """--missing error: one streaming pass over the feature columns; names every column with nulls."""
    fields = fields_from_card(card)
    counts = {f.name: 0 for f in fields}
    rows = 0
    for path in files:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(columns=[f.name for f in fields], batch_size=65536):
            rows += batch.num_rows
            for f in fields:
                counts[f.name] += count_missing(batch.column(f.name), f.multi_valued)
    bad = {k: v for k, v in counts.items() if v}
    if bad:
        raise ScoreError(f"missing values in {', '.join(f'{k!r}: {v}' for k, v in bad.items())} (of {rows} rows); "
                         "fill them, or score them as training encoded missing values with --missing encode")


class Scorer:
    """The map_batches callable: loads model.pt once per actor, scores pyarrow batches."""

    def __init__(self, model_path: str, card: Dict[str, Any], id_column: Optional[str], missing: str,
                 threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = torch.jit.load(model_path)
        self.fields = fields_from_card(card)
        self.tasks: List[str] = list(card["tasks"])
        self.salt = bytes.fromhex(card["string_key"]["key_hex"])
        self.id_column = id_column
        self.missing = missing

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols: Dict[str, pa.Array] = {}
        if self.id_column is not None:
            cols[self.id_column] = batch.column(self.id_column)
        if batch.num_rows == 0:
            probs = {t: np.zeros(0, np.float32) for t in self.tasks}
        else:
            inputs = table_to_inputs(batch, self.fields, self.salt, self.missing)
            with self.torch.no_grad():
                out = self.model(*inputs.torch_args()) if inputs.dense else \
                    self.model.forward_raw_jagged(*inputs.torch_args())
            probs = {t: out[t].numpy() for t in self.tasks}
        for t in self.tasks:
            cols[PROB_PREFIX + t] = pa.array(probs[t], pa.float32())
        return pa.table(cols)


class TopK:
    """The k rows with the highest ``key`` column seen so far; ties keep arrival order. Batches are buffered and
    merged when the buffer outgrows max(k, 65536) rows, so the cost stays O(rows log k) amortised."""

    def __init__(self, k: int, key: str):
        self.k, self.key = k, key
        self.top: Optional[pa.Table] = None
        self.pending: List[pa.Table] = []
        self.pending_rows = 0
        self.seen = 0

    def add(self, t: pa.Table) -> None:
        t = t.append_column("_seq", pa.array(np.arange(self.seen, self.seen + t.num_rows, dtype=np.int64)))
        self.seen += t.num_rows
        self.pending.append(t)
        self.pending_rows += t.num_rows
        if self.pending_rows > max(self.k, 65536):
            self._merge()

    def _merge(self) -> None:
        parts = ([self.top] if self.top is not None else []) + self.pending
        self.pending, self.pending_rows = [], 0
        if not parts:
            return
        cand = pa.concat_tables(parts, promote_options="permissive")
        order = np.lexsort((cand.column("_seq").to_numpy(), -cand.column(self.key).to_numpy().astype(np.float64)))
        self.top = cand.take(pa.array(order[: self.k]))

    def result(self) -> Optional[pa.Table]:
        self._merge()
        if self.top is None:
            return None
        top = self.top.drop_columns(["_seq"])
        return pa.table({"rank": pa.array(np.arange(1, top.num_rows + 1, dtype=np.int64)),
                         **{n: top.column(n) for n in top.column_names}})


def _write_atomic(table: pa.Table, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _init_ray(num_cpus: Optional[int]):
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # a cluster (or `ray job submit`): join it as it is
            ray.init()
        else:
            # at least 2 logical CPUs: one scoring actor plus the read tasks (one core is then shared)
            ray.init(num_cpus=max(2, num_cpus or os.cpu_count() or 1), include_dashboard=False)
    return ray


def score(model: str, input_path: str, out: str, top_k: Optional[int] = None, top_k_out: Optional[str] = None,
          id_column: Optional[str] = None, missing: str = "encode", batch_size: int = 4096,
          actors: Optional[int] = None, num_cpus: Optional[int] = None, progress: bool = True) -> Dict[str, Any]:
    """Scores ``input_path`` into ``out`` (see the module docstring); returns a summary (rows, seconds, rows/s)."""
    if missing not in MISSING_POLICIES:
        raise ScoreError(f"--missing must be one of {MISSING_POLICIES}")
    if top_k is not None and top_k < 1:
        raise ScoreError("--top-k must be >= 1")
    pt, card = load_card(model)
    files = input_files(input_path)
    names = pq.read_schema(files[0]).names
    fields = [f["name"] for f in card["fields"]]
    weight_cols = [f["weight_column"] for f in card["fields"] if f.get("weighted")]
    absent = [f for f in fields + weight_cols if f not in names]
    if absent:
        raise ScoreError(f"{files[0]}: no column(s) {absent}; the model needs {fields} (model.json)"
                         + (f" and the per-value weights {weight_cols} of its weighted bags" if weight_cols else ""))
    id_col = pick_id_column([n for n in names if n not in weight_cols], card, id_column)
    if missing == "error":
        check_missing(files, card)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if top_k is not None and top_k_out is None:
        top_k_out = f"{out[:-8] if out.endswith('.parquet') else out}_top{top_k}.parquet"

    ray = _init_ray(num_cpus)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output rows in input order
    ctx.enable_progress_bars = progress
    # actors hold one CPU each for the whole run; the read tasks need the rest (an actor on every CPU stalls)
    most = max(1, int(ray.cluster_resources().get("CPU", 2)) - 1)
    if actors is not None and actors > most:
        print(f"[pimm] --actors {actors} lowered to {most}: the reads need a CPU of the {most + 1}", file=sys.stderr)
    pool = min(actors or most, most)
    ds = ray.data.read_parquet(files, columns=([id_col] if id_col else []) + fields + weight_cols)
    scored = ds.map_batches(Scorer, fn_constructor_kwargs={"model_path": pt, "card": card, "id_column": id_col,
                                                            "missing": missing},
                            batch_format="pyarrow", batch_size=batch_size, concurrency=pool, num_cpus=1)
    final = PROB_PREFIX + card["tasks"][-1]
    top = TopK(top_k, final) if top_k else None
    tmp = f"{out}.tmp-{os.getpid()}"
    writer: Optional[pq.ParquetWriter] = None
    rows = 0
    start = time.perf_counter()
    try:
        for t in scored.iter_batches(batch_format="pyarrow", batch_size=None):
            if writer is None:
                writer = pq.ParquetWriter(tmp, t.schema)
            t = t.cast(writer.schema)  # an id column typed differently in another file
            writer.write_table(t)
            rows += t.num_rows
            if top is not None:
                top.add(t)
        if writer is None:  # no rows at all: an empty file with the output schema
            id_type = pq.read_schema(files[0]).field(id_col).type if id_col else None
            schema = pa.schema(([(id_col, id_type)] if id_col else []) +
                               [(PROB_PREFIX + t, pa.float32()) for t in card["tasks"]])
            writer = pq.ParquetWriter(tmp, schema)
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    seconds = time.perf_counter() - start
    summary = {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / max(seconds, 1e-9), 1),
               "actors": pool, "out": out, "id_column": id_col, "missing": missing}
    if top is not None:
        ranked = top.result()
        if ranked is None:
            ranked = pq.read_table(out).slice(0, 0)
            ranked = ranked.add_column(0, "rank", pa.array([], pa.int64()))
        _write_atomic(ranked, top_k_out)
        summary["top_k"] = {"k": top_k, "rows": ranked.num_rows, "out": top_k_out, "by": final}
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="run folder (model.pt + model.json) or the model.pt path")
    ap.add_argument("--input", required=True, help="a Parquet file or a folder of Parquet files")
    ap.add_argument("--out", required=True, help="output Parquet file (written atomically)")
    ap.add_argument("--top-k", type=int, help="also write the N best rows by final-task probability")
    ap.add_argument("--top-k-out", help="where the top-k list goes (default: <out>_top<N>.parquet)")
    ap.add_argument("--id-column", help="column copied to the output (default: the only non-feature, non-label "
                                        "column, if there is exactly one)")
    ap.add_argument("--missing", choices=MISSING_POLICIES, default="encode",
                    help="nulls: 'encode' as training encoded missing values (default), 'error' refuses the input")
    ap.add_argument("--batch-size", type=int, default=4096, help="rows per model call (default 4096)")
    ap.add_argument("--actors", type=int, help="scoring actors (default and most: the cluster's CPUs less one)")
    ap.add_argument("--num-cpus", type=int, help="CPUs of the in-process Ray (default: all of this machine's)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        summary = score(args.model, args.input, args.out, args.top_k, args.top_k_out, args.id_column, args.missing,
                        args.batch_size, args.actors, args.num_cpus, not args.no_progress)
    except (ScoreError, ValueError) as e:
        print(f"score error: {e}", file=sys.stderr)
        return 2
    print(f"[pimm] scored {summary['rows']} rows in {summary['seconds']:.1f}s ({summary['rows_per_s']:,.0f} rows/s, "
          f"{summary['actors']} actor(s)) -> {summary['out']}", flush=True)
    if "top_k" in summary:
        print(f"[pimm] top {summary['top_k']['k']} by {summary['top_k']['by']} -> {summary['top_k']['out']}",
              flush=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
