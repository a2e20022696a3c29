"""Benchmark 3: the input pipeline, Parquet shards -> Batch (KJT + labels), per worker, vs pyarrow's raw read of the
same files (issue #6; targets: >= 50% of the raw read rate, and >= 10x what the trainer consumes per worker).

    python benchmarks/input_pipeline.py                                   # 200k rows, 5 interleaved reps, ~1 min
    python benchmarks/input_pipeline.py --trainer-json results/roofline.json   # the 10x target from benchmark 1's JSON
    python benchmarks/input_pipeline.py --trainer-rate 35000              # ... or from a figure (samples/s per worker)

One worker's share: the files ``shard_files_for_rank(train files, --rank, --workers)`` gives that rank, read in this
process with torch.set_num_threads(1) (a worker's intra-op threads in the default config; pyarrow keeps its own
thread pool, as in the worker). Variants, each a full pass over those files, repeated --passes times per
measurement, interleaved:

  raw_dataset      pyarrow.dataset(files).to_batches(columns=spec columns, batch_size=B): decode only
  raw_iter         pq.ParquetFile(f).iter_batches(batch_size=B, columns=...) per file: decode only
  raw_row_groups   pq.ParquetFile(f).read_row_group(g, columns=..., use_threads=False) for every row group: decode
                   only (the fastest raw read on row groups of a few thousand rows: the limit)
  reader_train     ShardReader(shuffle=True).iter_train, ONE reader for all passes, as the trainer keeps one for
                   all epochs: per-row-group shuffle, KJT + labels + weights (validation ran in the warm-up pass)
  reader_first     the same with a new ShardReader per pass: a first epoch (schema checks, footers, null /
                   id-range / weight checks of every row group)
  reader_noshuffle ShardReader(shuffle=False).iter_train, one reader: the same without the permutation

The limit is the fastest raw variant's median.

Rates are rows/s of that worker. The trainer consumes (trainer samples/s) / workers rows/s per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common as C  # noqa: E402

TARGET_RAW = 0.5
TARGET_CONSUME = 10.0


def raw_dataset(files, columns, batch_size: int) -> int:
    import pyarrow.dataset as ds

    n = 0
    for rb in ds.dataset(files, format="parquet").to_batches(columns=columns, batch_size=batch_size):
        n += rb.num_rows
    return n


def raw_iter(files, columns, batch_size: int) -> int:
    import pyarrow.parquet as pq

    n = 0
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
            n += rb.num_rows
    return n


def raw_row_groups(files, columns) -> int:
    import pyarrow.parquet as pq

    n = 0
    for f in files:
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            n += pf.read_row_group(g, columns=columns, use_threads=False).num_rows
    return n


def reader_pass(spec, files, batch_size: int, shuffle: bool, epoch: int, reader=None) -> int:
    from data_pipeline.reader import ShardReader

    reader = reader or ShardReader(spec, files, batch_size, shuffle=shuffle, seed=0)
    n = 0
    for batch in reader.iter_train(epoch, reader.num_full_batches()):
        n += batch.batch_size
    return n


def _profile(one_pass, passes: int, top: int = 8) -> list:
    """cProfile of `passes` calls of one_pass(epoch); prints and returns the top functions by own time, with their
    share of the profiled total."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for ep in range(passes):
        one_pass(100 + ep)
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt
    rows = sorted(({"function": f"{os.path.basename(fn)}:{line}({name})", "calls": nc, "own s": tt,
                    "share": tt / total} for (fn, line, name), (_, nc, tt, _, _) in stats.stats.items()),
                  key=lambda r: -r["own s"])[:top]
    C.print_table(rows, title=f"reader_train: cProfile of {passes} passes, {total:.3f} s in all, by own time")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_data_args(ap, rows=200_000)
    ap.add_argument("--workers", type=int, default=2, help="workers the files are split over (default 2)")
    ap.add_argument("--rank", type=int, default=0, help="whose share to read (default 0)")
    ap.add_argument("--batch-size", type=int, default=None, help="per-worker batch (default: the config's)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as a worker)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    ap.add_argument("--passes", type=int, default=5, help="passes over the files per measurement (default 5)")
    ap.add_argument("--variants", default="raw_dataset,raw_iter,raw_row_groups,reader_train,reader_first,"
                                          "reader_noshuffle")
    ap.add_argument("--trainer-rate", type=float, default=None,
                    help="the trainer's training samples/s PER WORKER, for the 10x target")
    ap.add_argument("--trainer-json", default=None,
                    help="benchmark 1's --json output: its trainer samples/s per worker is used for the 10x target")
    ap.add_argument("--profile", action="store_true",
                    help="after the table: cProfile of --passes reader_train passes, by own time (where it goes)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import torch

    from data_pipeline.reader import ShardReader, shard_files_for_rank
    from data_pipeline.spec import DatasetSpec

    torch.set_num_threads(args.threads)
    data = C.data_from_args(args)
    spec = DatasetSpec.load(data)
    bs = args.batch_size or C.default_config().train.batch_size
    files = shard_files_for_rank(spec.files("train"), args.rank, args.workers)
    columns = spec.field_names + list(spec.labels)
    env = C.env_info()
    C.print_env(env)
    print(f"# data {data}: rank {args.rank} of {args.workers} reads {len(files)} file(s); batch {bs}; "
          f"{len(columns)} columns", flush=True)

    kept = {True: ShardReader(spec, files, bs, shuffle=True, seed=0), False: ShardReader(spec, files, bs)}
    funcs = {
        "raw_dataset": lambda ep: raw_dataset(files, columns, bs),
        "raw_iter": lambda ep: raw_iter(files, columns, bs),
        "raw_row_groups": lambda ep: raw_row_groups(files, columns),
        "reader_train": lambda ep: reader_pass(spec, files, bs, True, ep, kept[True]),
        "reader_first": lambda ep: reader_pass(spec, files, bs, True, ep),
        "reader_noshuffle": lambda ep: reader_pass(spec, files, bs, False, ep, kept[False]),
    }
    variants = [v for v in args.variants.split(",") if v]
    bad = sorted(set(variants) - set(funcs))
    if bad:
        ap.error(f"unknown variants {bad}; choose from {sorted(funcs)}")
    for v in variants:  # untimed warm-up: page cache, imports, allocator
        funcs[v](0)
    rates = {v: [] for v in variants}
    rows = {}
    for rep in range(args.reps):
        for v in variants:
            elapsed = C.timer()
            n = sum(funcs[v](rep * args.passes + p) for p in range(args.passes))
            rates[v].append(n / max(elapsed(), 1e-9))
            rows[v] = n // args.passes
        print(f"# rep {rep + 1}/{args.reps}: rows/s " + " ".join(f"{v}={rates[v][-1]:,.0f}" for v in variants),
              flush=True)

    med = {v: C.median(r) for v, r in rates.items()}
    raws = [v for v in variants if v.startswith("raw")]
    limit = max(raws, key=lambda v: med[v]) if raws else None
    consume = args.trainer_rate
    if consume is None and args.trainer_json:
        with open(args.trainer_json) as f:
            consume = json.load(f)["results"]["trainer_samples_per_s_per_worker"]
    table = []
    for v in variants:
        row = {"variant": v, "rows/pass": rows[v], "rows/s (median)": med[v], "min..max": C.spread(rates[v]),
               "vs raw limit": med[v] / med[limit] if limit else float("nan")}
        if consume:
            row["vs trainer consumption"] = med[v] / consume
        table.append(row)
    C.print_table(table, title=f"input pipeline, one worker's share (rank {args.rank}/{args.workers}), rows/s")
    results = {"rates": rates, "medians": med, "limit": limit, "files": len(files), "batch_size": bs,
               "trainer_rate_per_worker": consume, "verdicts": {}}
    if limit and "reader_train" in med:
        r = med["reader_train"] / med[limit]
        paired = C.median([a / b for a, b in zip(rates["reader_train"], rates[limit])])
        best = max(rates["reader_train"]) / max(rates[limit])
        print(f"reader_train / {limit}: medians {r:.2f} (the verdict), paired {paired:.2f}, best-of-{args.reps} "
              f"{best:.2f}; target >= {TARGET_RAW}: "
              + ("MET" if r >= TARGET_RAW else f"MISSED ({r / TARGET_RAW:.0%} of the target)"))
        results["verdicts"]["raw"] = {"ratio": r, "paired": paired, "best_of_n": best, "target": TARGET_RAW,
                                      "met": r >= TARGET_RAW}
    if consume and "reader_train" in med:
        r = med["reader_train"] / consume
        print(f"reader_train / trainer consumption per worker ({consume:,.0f} samples/s) = {r:.1f}x; target >= "
              f"{TARGET_CONSUME:.0f}x: " + ("MET" if r >= TARGET_CONSUME else f"MISSED ({r / TARGET_CONSUME:.0%})"))
        results["verdicts"]["consume"] = {"ratio": r, "target": TARGET_CONSUME, "met": r >= TARGET_CONSUME}
    if args.profile:
        results["profile"] = _profile(lambda ep: reader_pass(spec, files, bs, True, ep, kept[True]), args.passes)
    load = C.print_load_end(env)
    C.write_json(args.json, "input_pipeline", args, env, load, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
