"""Benchmark 4: memory and scaling (issue #6; targets: peak RSS per worker grows < 10% from 1x to 10x the rows, wall
time at 10x <= 11x the time at 1x; and 1 vs 2 workers).

    python benchmarks/memory_scaling.py                  # 1x = 200k train rows, 10x = 2M; 1 rep, ~3.5 min
    python benchmarks/memory_scaling.py --rows 50000 --reps 2
    python benchmarks/memory_scaling.py --skip-trainer   # only the single-process stand-in (no Ray, ~1 min)

Every split scales with --scale (valid and test are --eval-frac of train), so evaluation, whose AUC keeps every
prediction of the split, scales too. Two measurements, interleaved per repetition:

  trainer   `launch/train.py` (Ray) with 2 workers at 1x and at 10x, and 1 worker at 1x (with --one-worker-cpus
            cores as intra-op threads, default 1). Peak RSS per worker = VmHWM of each `ray::RayTrainWorker`
            process, polled from /proc every 0.5 s until it exits (VmHWM is the kernel's own high-water mark; polling
            only misses what a worker allocates in its last half second). Training time = the sum of metrics.json's
            epoch_seconds (evaluation excluded); wall = the whole command (Ray start, evaluation, checkpoints,
            export).
  stand-in  NOT the trainer: one plain process that runs what one worker runs locally (its reader on rank 0's
            share + the fused-embedding model, 1 thread, no process group) for --epochs epochs; peak RSS =
            ru_maxrss of that child process (getrusage). Shows the reader + model alone, without Ray's share.

The cleanest figure would be the trainer recording each rank's peak RSS itself (metrics.json "peak_rss_mb" per rank,
from resource.getrusage(RUSAGE_SELF).ru_maxrss at the end of the worker loop); run_trainer picks it up when present.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common as C  # noqa: E402

TARGET_RSS_GROWTH = 0.10
TARGET_TIME_RATIO = 11.0


def standin_child(data: str, epochs: int, batch_size: int, workers: int) -> None:
    """Runs in a fresh process: reader (rank 0's share) + fused model, one thread; prints JSON."""
    import torch

    from data_pipeline.reader import ShardReader, shard_files_for_rank
    from data_pipeline.spec import DatasetSpec

    torch.set_num_threads(1)
    spec = DatasetSpec.load(data)
    cfg = C.default_config()
    module, opts = C.build_single_process(cfg.model, spec, "fused", cfg.train.lr, cfg.train.sparse_lr)
    reader = ShardReader(spec, shard_files_for_rank(spec.files("train"), 0, workers), batch_size, shuffle=True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    elapsed = C.timer()
    rows = 0
    for epoch in range(epochs):
        for batch in reader.iter_train(epoch, reader.num_full_batches()):
            C.train_step(module, opts, batch)
            rows += batch.batch_size
    seconds = elapsed()
    print(json.dumps({"seconds": seconds, "rows": rows, "samples_per_s": rows / seconds,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_rss_after_setup_mb": rss_before / 1024}))


def run_standin(data: str, epochs: int, batch_size: int, workers: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_standin", data, "--epochs", str(epochs),
           "--batch-size", str(batch_size), "--workers", str(workers)]
    elapsed = C.timer()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"stand-in failed: {proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = elapsed()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="train rows at 1x (default 200k)")
    ap.add_argument("--scale", type=int, default=10, help="the large size is this many times the rows (default 10)")
    ap.add_argument("--eval-frac", type=float, default=0.1, help="valid and test rows as a fraction of train")
    ap.add_argument("--rows-per-file", type=int, default=None)
    ap.add_argument("--row-group-rows", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--epochs", type=int, default=1, help="epochs of every run (default 1)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--one-worker-cpus", type=int, default=1,
                    help="cpus_per_worker (= intra-op threads) of the 1-worker run (default 1: the same per-worker "
                         "resources as in the 2-worker run, so the ratio is the scaling from adding a worker)")
    ap.add_argument("--batch-size", type=int, default=None, help="per-worker batch (default: the config's)")
    ap.add_argument("--reps", type=int, default=1, help="interleaved repetitions (default 1)")
    ap.add_argument("--skip-trainer", action="store_true", help="only the single-process stand-in")
    ap.add_argument("--skip-standin", action="store_true", help="only the trainer")
    ap.add_argument("--trainer-arg", action="append", default=[], help="extra key=value for launch/train.py")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--_standin", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    bs = args.batch_size or C.default_config().train.batch_size
    if args._standin:
        standin_child(args._standin, args.epochs, bs, args.workers)
        return 0

    sizes = {"1x": args.rows, f"{args.scale}x": args.rows * args.scale}
    # the same file layout at both sizes, with at least 2 files per split at 1x (each worker reads whole files)
    rpf = args.rows_per_file or min(10_000, max(1, int(args.rows * args.eval_frac) // 2))
    rgr = args.row_group_rows or min(5_000, rpf)
    data = {k: C.bench_data(n, max(int(n * args.eval_frac), 1), max(int(n * args.eval_frac), 1), args.cache_dir,
                            rpf, rgr) for k, n in sizes.items()}
    big = f"{args.scale}x"
    env = C.env_info()
    C.print_env(env)
    print(f"# 1x = {args.rows:,} train rows, {big} = {sizes[big]:,}; valid/test = {args.eval_frac} of train each; "
          f"{rpf} rows/file, {rgr} rows/row group; {args.epochs} epoch(s); batch {bs} per worker", flush=True)

    runs = {}  # name -> list of results
    plan = []
    if not args.skip_standin:
        plan += [("stand-in 1x", "standin", "1x", None), (f"stand-in {big}", "standin", big, None)]
    if not args.skip_trainer:
        plan += [(f"trainer {args.workers}w 1x", "trainer", "1x", args.workers),
                 (f"trainer {args.workers}w {big}", "trainer", big, args.workers),
                 (f"trainer 1w 1x ({args.one_worker_cpus} threads)", "trainer", "1x", 1)]
    for rep in range(args.reps):
        for name, kind, size, workers in plan:
            if kind == "standin":
                r = run_standin(data[size], args.epochs, bs, args.workers)
            else:
                extra = [f"train.cpus_per_worker={args.one_worker_cpus}"] if workers == 1 else []
                r = C.run_trainer(data[size], C.trainer_overrides(bs, workers, args.epochs,
                                                                  extra + args.trainer_arg))
            runs.setdefault(name, []).append(r)
            peak = r.get("peak_rss_mb") or max(r.get("worker_peak_rss_mb") or [float("nan")])
            print(f"# rep {rep + 1}/{args.reps} {name}: {r['samples_per_s']:,.0f} samples/s, peak RSS "
                  f"{r.get('worker_peak_rss_mb') or round(peak, 1)} MB, wall {r['wall_s']:.1f} s", flush=True)

    def peak_of(r):  # the largest worker's peak (trainer) or the process's peak (stand-in)
        return r["peak_rss_mb"] if "peak_rss_mb" in r else max(r["worker_peak_rss_mb"] or [float("nan")])

    def train_s(r):
        return r["seconds"] if "seconds" in r else r["train_seconds"]

    rows = []
    for name, rs in runs.items():
        row = {"run": name, "samples/s": C.median(r["samples_per_s"] for r in rs),
               "peak RSS/worker MB (max)": C.median(peak_of(r) for r in rs),
               "train s": C.median(train_s(r) for r in rs), "wall s": C.median(r["wall_s"] for r in rs)}
        if "worker_peak_rss_mb" in rs[0]:
            row["all workers MB"] = str(rs[-1]["worker_peak_rss_mb"])
            row["driver MB"] = C.median(r["driver_peak_rss_mb"] for r in rs)
        rows.append(row)
    C.print_table(rows, title="memory and scaling (medians over repetitions)")
    results = {"sizes": sizes, "runs": runs, "verdicts": {}}
    for who, small, large in (("stand-in", "stand-in 1x", f"stand-in {big}"),
                              ("trainer", f"trainer {args.workers}w 1x", f"trainer {args.workers}w {big}")):
        if small not in runs or large not in runs:
            continue
        p1, p10 = (C.median(peak_of(r) for r in runs[k]) for k in (small, large))
        t1, t10 = (C.median(train_s(r) for r in runs[k]) for k in (small, large))
        w1, w10 = (C.median(r["wall_s"] for r in runs[k]) for k in (small, large))
        growth = p10 / p1 - 1
        v = {"rss_growth": growth, "train_time_ratio": t10 / t1, "wall_ratio": w10 / w1,
             "rss_met": growth < TARGET_RSS_GROWTH, "time_met": t10 / t1 <= TARGET_TIME_RATIO}
        results["verdicts"][who] = v
        label = "STAND-IN (single process, not the trainer)" if who == "stand-in" else "TRAINER"
        print(f"{label}: peak RSS per worker {p1:,.0f} -> {p10:,.0f} MB ({growth:+.1%}; target < "
              f"{TARGET_RSS_GROWTH:.0%}: {'MET' if v['rss_met'] else 'MISSED'}); training time x{t10 / t1:.2f} "
              f"(target <= {TARGET_TIME_RATIO:.0f}x: {'MET' if v['time_met'] else 'MISSED'}); wall x{w10 / w1:.2f}")
    one = next((k for k in runs if k.startswith("trainer 1w")), None)
    two = f"trainer {args.workers}w 1x"
    if one and two in runs:
        s1, s2 = (C.median(r["samples_per_s"] for r in runs[k]) for k in (one, two))
        m1, m2 = (C.median(peak_of(r) for r in runs[k]) for k in (one, two))
        print(f"{args.workers} workers vs 1: samples/s x{s2 / s1:.2f}; peak RSS per worker {m2:,.0f} vs {m1:,.0f} MB")
        results["workers"] = {"speedup": s2 / s1, "rss_per_worker": {"1": m1, str(args.workers): m2}}
    load = C.print_load_end(env)
    C.write_json(args.json, "memory_scaling", args, env, load, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
