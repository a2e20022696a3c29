"""Benchmark (not a test): raw Ali-CCP-format conversion throughput and peak memory as the input grows.

    python benchmarks/prepare_data.py                  # 5 M rows, then 1 M (5x fewer)
    python benchmarks/prepare_data.py --rows 1000000   # quicker

Generates ``--rows`` synthetic raw rows (half sample_skeleton_train, half sample_skeleton_test, with common_features
files for a fixed number of users) in a temporary folder, converts them with ``launch/prepare_data.py aliccp`` in a
fresh process (default 18 AITM fields plus one weighted bag, 109_14), and does the same at ``--ratio`` times fewer
rows. Peak memory is the converting process's maximum resident set size (``os.wait4`` rusage), so each run is measured
alone. The id spaces are fixed (as in the real data, where vocabularies saturate), so a flat peak shows that memory
does not grow with the number of rows; what it does hold is one read block, one row group per split, the
common-features index and the vocabularies. Below about 1 M rows the peak is still climbing to that plateau (the
row groups, the vocabularies and the allocator's pools are not full yet), so compare sizes from 1 M rows up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# field -> cardinality. Ad side (in the skeleton) and user side (in common_features), as in Ali-CCP.
AD_FIELDS = {"205": 200_000, "206": 5_000, "207": 100_000, "216": 50_000, "508": 5_000, "509": 20_000,
             "702": 20_000, "853": 20_000, "301": 3}
USER_FIELDS = {"121": 100, "122": 14, "124": 3, "125": 8, "126": 4, "127": 4, "128": 3, "129": 5}
OPTIONAL = {"508", "509", "702", "853"}  # absent from a share of the samples, as in the real data
CHUNK = 200_000
A, B, C = "\x01", "\x02", "\x03"


def _entries(field: str, ids: np.ndarray, values: pa.Array) -> pa.Array:
    """'field\\x02id\\x03value' strings."""
    kv = pc.binary_join_element_wise(pa.scalar(field), pc.cast(pa.array(ids), pa.string()), B)
    return pc.binary_join_element_wise(kv, values, C)


def _join_rows(parts: List[pa.Array], present: List[np.ndarray]) -> pa.Array:
    """Per row, the present entries joined by \\x01."""
    cols = [pc.if_else(pa.array(m), p, pa.nulls(len(p), pa.string())) for p, m in zip(parts, present)]
    return pc.binary_join_element_wise(*cols, A, null_handling="skip")


def _write_lines(f, cols: List[pa.Array]) -> None:
    line = pc.binary_join_element_wise(*cols, ",")
    f.write(("\n".join(line.to_pylist()) + "\n").encode())


def _zipf_ids(rng: np.random.Generator, card: int, n: int) -> np.ndarray:
    """Heavy-tailed ids in a fixed space of ``card`` values (a few popular ads, a long tail)."""
    return np.minimum((rng.pareto(1.2, n) * card / 20).astype(np.int64), card - 1) * 7 + 1000


def generate(raw_dir: str, rows: int, users: int, seed: int = 0) -> Dict[str, int]:
    """Write the four raw files for ``rows`` samples (half train, half test) and ``users`` common-feature rows per
    split; vectorised with Arrow string kernels (about 10 s per 5 M rows)."""
    os.makedirs(raw_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    for role, n_rows in (("train", rows - rows // 2), ("test", rows // 2)):
        with open(os.path.join(raw_dir, f"common_features_{role}.csv"), "wb") as f:
            for start in range(0, users, CHUNK):
                n = min(CHUNK, users - start)
                keys = pc.cast(pa.array(np.arange(start, start + n)), pa.string())
                parts, present = [], []
                ones = pa.array(["1.0"] * n)
                parts.append(_entries("101", np.arange(start, start + n) + 10_000_000, ones))
                present.append(np.ones(n, bool))
                for field, card in USER_FIELDS.items():
                    parts.append(_entries(field, rng.integers(0, card, n) + 2_000 * int(field), ones))
                    present.append(rng.random(n) < 0.95)
                for j in range(8):  # a history bag of up to 8 items (109_14), values are counts
                    cnt = pc.cast(pa.array(rng.integers(1, 20, n)), pa.string())
                    parts.append(_entries("109_14", rng.integers(0, 10_000, n) + 40_000_000, cnt))
                    present.append(rng.random(n) < 0.6 ** (j + 1) * 1.5)
                fl = _join_rows(parts, present)
                num = pc.cast(pa.array(np.sum(present, axis=0)), pa.string())
                _write_lines(f, [keys, num, fl])
        with open(os.path.join(raw_dir, f"sample_skeleton_{role}.csv"), "wb") as f:
            for start in range(0, n_rows, CHUNK):
                n = min(CHUNK, n_rows - start)
                ones = pa.array(["1.0"] * n)
                sid = pc.cast(pa.array(np.arange(start, start + n)), pa.string())
                click = rng.random(n) < 0.04
                buy = click & (rng.random(n) < 0.1)
                buy |= rng.random(n) < 0.0002  # a few chain violations, as in the real data
                user = pc.cast(pa.array(rng.integers(0, users, n)), pa.string())
                parts, present = [], []
                for field, card in AD_FIELDS.items():
                    parts.append(_entries(field, _zipf_ids(rng, card, n) + 1_000_000 * int(field), ones))
                    present.append(rng.random(n) < 0.6 if field in OPTIONAL else np.ones(n, bool))
                fl = _join_rows(parts, present)
                num = pc.cast(pa.array(np.sum(present, axis=0)), pa.string())
                _write_lines(f, [sid, pc.cast(pa.array(click.astype(np.int8)), pa.string()),
                                 pc.cast(pa.array(buy.astype(np.int8)), pa.string()), user, num, fl])
    return {"bytes": sum(os.path.getsize(os.path.join(raw_dir, x)) for x in os.listdir(raw_dir))}


def convert(raw_dir: str, out: str, extra: List[str]) -> Dict[str, float]:
    cmd = [sys.executable, os.path.join(REPO, "launch", "prepare_data.py"), "aliccp", "--raw-dir", raw_dir,
           "--bag-fields", "109_14", "--out", out, "--no-progress", *extra]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.time() - t0
    err = proc.stderr.read().decode()
    proc.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"conversion failed:\n{err}")
    rss_mb = usage.ru_maxrss / 1024  # Linux: KiB
    return {"seconds": seconds, "peak_rss_mb": rss_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=5_000_000, help="rows of the large run (default 5M)")
    p.add_argument("--ratio", type=int, default=5, help="the small run has rows / ratio rows (default 5)")
    p.add_argument("--users", type=int, default=100_000, help="common-features rows (fixed, default 100k)")
    p.add_argument("--dir", help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("extra", nargs="*", help="extra prepare_data.py options, after --")
    args = p.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="pimm-prepare-bench-")
    results = []
    try:
        for rows in (args.rows, args.rows // args.ratio):
            raw = os.path.join(work, f"raw-{rows}")
            t0 = time.time()
            info = generate(raw, rows, args.users)
            gen_s = time.time() - t0
            r = convert(raw, os.path.join(work, f"out-{rows}"), args.extra)
            r.update(rows=rows, input_mb=info["bytes"] / 2**20, gen_s=gen_s)
            # what the conversion has to hold grows with the distinct values seen in train (the vocabularies), not
            # with the rows: print it, so a peak that moves can be told apart from one that scales with the input
            with open(os.path.join(work, f"out-{rows}", "report.json")) as f:
                encoding = json.load(f)["encoding"]
            r["train_distinct"] = sum(int(e.get("train_distinct", 0)) for e in encoding.values())
            results.append(r)
            print(f"  {rows:>10,} rows: generated {r['input_mb']:.0f} MiB in {gen_s:.0f} s, converted in "
                  f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB", file=sys.stderr)
            shutil.rmtree(raw, ignore_errors=True)
            shutil.rmtree(os.path.join(work, f"out-{rows}"), ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    big, small = results
    print(f"\nraw Ali-CCP-format conversion ({args.users:,} users, 18 AITM fields + 109_14 bag; two passes)\n")
    print("| rows | input MiB | seconds | rows/s | peak RSS MiB | distinct train values (all fields) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['input_mb']:.0f} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['train_distinct']:,} |")
    ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    print(f"| ratio {args.ratio}x rows | | {big['seconds'] / small['seconds']:.2f}x | | {ratio:.3f}x "
          f"({'flat, within 10%' if abs(ratio - 1) <= 0.10 else 'NOT flat'}) | "
          f"{big['train_distinct'] / max(small['train_distinct'], 1):.2f}x |")


if __name__ == "__main__":
    main()
