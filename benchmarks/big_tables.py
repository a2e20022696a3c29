"""Benchmark 5: a big table (issue #6: a field with 100 M ids, dim 16, trains sharded across 2 workers on this 24 GiB
machine; memory per worker and samples/s vs a 1 M-id table).

    python benchmarks/big_tables.py                        # 10 M ids vs 1 M ids, 1 rep, ~4 min on 2 cores
    python benchmarks/big_tables.py --ids 100000000        # the issue's size (~7 GB of table + state; slow)
    python benchmarks/big_tables.py --ids 3000000 --base-ids 300000 --rows 50000

The data: the default synthetic data set (--rows train rows, its 10 fields and chained labels) plus one extra field,
``--field`` (default "user"), whose ids are drawn uniformly from [0, ids) (a user-id-like field: nearly every row
touches a different row of the table, the worst case for the row-wise updates). Every field uses D = --dim (16).
The trainer: `launch/train.py`, --workers Ray workers (gloo, TorchRec planner, fused row-wise Adagrad), W&B off;
samples/s from metrics.json (evaluation excluded, median over the epochs after the first), peak RSS per worker = VmHWM
of each `ray::RayTrainWorker` process, the driver's peak (it exports the unsharded model, whole table included, at
the end), and the run folder's size (one DCP checkpoint per epoch + model.pt). The two sizes run interleaved.

The printed projection to 100 M ids extrapolates linearly from the two measured sizes; it is an estimate, not a
measurement: run with --ids 100000000 to measure it (nothing here depends on that run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common as C  # noqa: E402


def big_field_data(base: str, field: str, ids: int, cache_dir: str) -> str:
    """``base`` + a column ``field`` of uniform ids in [0, ids) (generated once per (base, field, ids), cached)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.spec import DatasetSpec, FieldSpec

    out = os.path.join(cache_dir, f"big-{os.path.basename(base)}-{field}-{ids}")
    if os.path.isfile(os.path.join(out, "spec.json")):
        return out
    spec = DatasetSpec.load(base)
    if field in spec.field_names or field in spec.labels:
        raise ValueError(f"--field {field!r} already exists in {base}")
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        for s_idx, (split, rels) in enumerate(sorted(spec.splits.items())):
            os.makedirs(os.path.join(tmp, split), exist_ok=True)
            for f_idx, rel in enumerate(rels):
                pf = pq.ParquetFile(os.path.join(base, rel))
                rng = np.random.default_rng([ids, s_idx, f_idx])
                schema = pf.schema_arrow.append(pa.field(field, pa.int64()))
                with pq.ParquetWriter(os.path.join(tmp, rel), schema) as w:
                    for g in range(pf.num_row_groups):
                        t = pf.read_row_group(g)
                        t = t.append_column(field, pa.array(rng.integers(0, ids, t.num_rows, dtype=np.int64)))
                        w.write_table(t, row_group_size=t.num_rows)
        new = DatasetSpec(fields=[*spec.fields, FieldSpec(field, int(ids))], labels=list(spec.labels),
                          splits=spec.splits, rows=spec.rows,
                          meta={**spec.meta, "big_field": {"name": field, "ids": int(ids), "distribution": "uniform",
                                                           "base": base}})
        new.save(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", type=int, default=10_000_000, help="ids of the big field (default 10 M)")
    ap.add_argument("--base-ids", type=int, default=1_000_000, help="ids of the comparison table (default 1 M)")
    ap.add_argument("--dim", type=int, default=16, help="embedding dim of every field (default 16)")
    ap.add_argument("--field", default="user", help="name of the extra field")
    ap.add_argument("--rows", type=int, default=200_000, help="train rows (default 200k)")
    ap.add_argument("--rows-eval", type=int, default=20_000)
    ap.add_argument("--cache-dir", default=None, help=f"data cache (default {C.BENCH_CACHE} for the big-field sets)")
    C.add_trainer_args(ap, epochs=2)
    ap.add_argument("--batch-size", type=int, default=None, help="per-worker batch (default: the config's)")
    ap.add_argument("--reps", type=int, default=1, help="interleaved repetitions (default 1)")
    ap.add_argument("--keep-run", action="store_true",
                    help="keep the last run folder of the biggest table (for benchmarks/export_memory.py)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    cfg = C.default_config()
    bs = args.batch_size or cfg.train.batch_size
    base = C.bench_data(args.rows, args.rows_eval, args.rows_eval, args.cache_dir)
    cache = args.cache_dir or C.BENCH_CACHE
    sizes = sorted({args.base_ids, args.ids})
    data = {n: big_field_data(base, args.field, n, cache) for n in sizes}
    bytes_per_id = args.dim * 4 + 4
    env = C.env_info()
    C.print_env(env)
    print(f"# base data {base} ({args.rows:,} train rows) + field {args.field!r}; D={args.dim}; {args.workers} "
          f"workers x batch {bs}; table + row-wise Adagrad state = {bytes_per_id} B/id", flush=True)

    runs = {n: [] for n in sizes}
    for rep in range(args.reps):
        for n in sizes:
            keep = args.keep_run and n == sizes[-1] and rep == args.reps - 1
            r = C.run_trainer(data[n], C.trainer_overrides(bs, args.workers, args.epochs,
                                                           [f"model.embedding_dim={args.dim}", *args.trainer_arg]),
                              keep_dir=keep)
            if keep:
                print(f"# kept the run folder {r['run_dir']}", flush=True)
            runs[n].append(r)
            print(f"# rep {rep + 1}/{args.reps} {n:,} ids: {r['samples_per_s']:,.0f} samples/s, workers "
                  f"{r['worker_peak_rss_mb']} MB, driver {r['driver_peak_rss_mb']} MB, run folder {r['run_dir_mb']} "
                  f"MB, wall {r['wall_s']:.0f} s, plan {r['sharding_plan'].get('t_' + args.field)}", flush=True)

    rows = []
    for n in sizes:
        rs = runs[n]
        rows.append({"ids": f"{n:,}", "table GB": n * bytes_per_id / 1e9,
                     "samples/s": C.median(r["samples_per_s"] for r in rs),
                     "vs base": C.median(r["samples_per_s"] for r in rs)
                     / C.median(r["samples_per_s"] for r in runs[args.base_ids]),
                     "peak RSS per worker MB": str(rs[-1]["worker_peak_rss_mb"]),
                     "driver MB": C.median(r["driver_peak_rss_mb"] for r in rs),
                     "run folder MB": C.median(r["run_dir_mb"] for r in rs),
                     "wall s": C.median(r["wall_s"] for r in rs),
                     "plan": rs[-1]["sharding_plan"].get("t_" + args.field)})
    C.print_table(rows, title=f"big table: field {args.field!r} with N ids, D={args.dim}, sharded over "
                              f"{args.workers} workers")
    results = {"runs": {str(n): runs[n] for n in sizes}, "bytes_per_id": bytes_per_id}
    if len(sizes) == 2 and sizes[1] < 100_000_000:  # at 100 M the table was measured: nothing to project
        lo, hi = sizes
        proj = {}
        for key, get in (("worker_max_mb", lambda r: max(r["worker_peak_rss_mb"])),
                         ("worker_sum_mb", lambda r: sum(r["worker_peak_rss_mb"])),
                         ("driver_mb", lambda r: r["driver_peak_rss_mb"]), ("run_dir_mb", lambda r: r["run_dir_mb"])):
            a, b = C.median(get(r) for r in runs[lo]), C.median(get(r) for r in runs[hi])
            slope = (b - a) / (hi - lo)
            proj[key] = {"per_million_ids_mb": slope * 1e6, "at_100M_mb": b + slope * (100_000_000 - hi)}
        results["projection_100M"] = proj
        print(f"\nprojection to 100 M ids (linear from {lo:,} and {hi:,}; an estimate, not a measurement): "
              f"largest worker {proj['worker_max_mb']['at_100M_mb'] / 1024:.1f} GiB, both workers together "
              f"{proj['worker_sum_mb']['at_100M_mb'] / 1024:.1f} GiB, driver (export) "
              f"{proj['driver_mb']['at_100M_mb'] / 1024:.1f} GiB, run folder "
              f"{proj['run_dir_mb']['at_100M_mb'] / 1024:.1f} GiB (table + state alone: "
              f"{100_000_000 * bytes_per_id / 2**30:.1f} GiB); machine {env['mem_total_gib']} GiB")
    load = C.print_load_end(env)
    C.write_json(args.json, "big_tables", args, env, load, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
