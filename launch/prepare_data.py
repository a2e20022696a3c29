"""Turn real data into the Parquet shards + spec.json the trainer reads (``data.path=DIR``), with a report.

    python launch/prepare_data.py aliccp --raw-dir ali-ccp/ --min-count 11 --out data/aliccp
    python launch/prepare_data.py csv --input train.csv --test-input test.csv --out data/aliccp-sample
    python launch/prepare_data.py table --input logs/ --labels click,conversion,core_conversion \\
        --time-column ts --test-after 2024-03-01 --hash customer=1000000 --out data/campaign

Writes DIR/{train,valid,test}/part-*.parquet, DIR/spec.json, DIR/vocab/*.parquet and DIR/report.json (rows read,
kept and dropped by reason, chain violations, positives per task and split, vocabulary sizes, OOV rates). Bad input
stops with a message naming the file, column and row and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.formats import AITM_FIELDS, AliccpSource, CsvSource, PrepareError, TableSource  # noqa: E402
from data_pipeline.prepare import CHAIN_POLICIES, PrepareConfig, prepare  # noqa: E402


def _names(s: Optional[str]) -> Optional[List[str]]:
    if s is None:
        return None
    out = [x.strip() for x in s.split(",") if x.strip()]
    return out or None


def _hash(items: List[str]) -> Dict[str, int]:
    out = {}
    for item in items or []:
        name, sep, buckets = item.rpartition("=")
        if not sep or not name or not buckets.isdigit() or int(buckets) < 1:
            raise PrepareError(f"--hash {item!r}: expected FIELD=BUCKETS with BUCKETS a positive integer")
        out[name] = int(buckets)
    return out


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("output and encoding")
    g.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    g.add_argument("--min-count", type=int, default=1,
                   help="keep ids seen at least this often in train, others -> unknown index 0 (default 1: every "
                        "id seen in train; AITM used ids seen more than 10 times: --min-count 11)")
    g.add_argument("--hash", action="append", default=[], metavar="FIELD=BUCKETS",
                   help="hash FIELD into BUCKETS buckets instead of a vocabulary (repeatable)")
    g.add_argument("--chain-violations", choices=CHAIN_POLICIES, default="drop",
                   help="rows where a later task is positive while an earlier one is not: drop (default, as AITM), "
                        "fix (zero the later labels) or error; counted in the report either way")
    g.add_argument("--max-bad-rows", type=int, default=1000,
                   help="malformed rows to count and skip before stopping (default 1000; -1: no limit)")
    g.add_argument("--rows-per-file", type=int, default=1_000_000, help="max rows per shard file (default 1M)")
    g.add_argument("--row-group-rows", type=int, default=100_000, help="rows per Parquet row group (default 100k)")
    g.add_argument("--min-files", type=int, default=2,
                   help="at least this many files per split (capped by its rows), so that many workers can read it "
                        "(default 2, the trainer's default worker count)")
    g.add_argument("--block-mb", type=float, default=4.0,
                   help="CSV read block in MiB (default 4; memory grows with it)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random splits and of hashing (default 0)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = common.add_argument_group("splits")
    s.add_argument("--valid-fraction", type=float, default=0.1,
                   help="seeded random share of the train input used for validation (default 0.1)")
    s.add_argument("--valid-input", help="a separate validation input instead (csv, table)")

    p = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="format", required=True)

    a = sub.add_parser("aliccp", parents=[common], help="the raw Ali-CCP release (skeleton + common features)")
    a.add_argument("--raw-dir", required=True,
                   help="folder with sample_skeleton_{train,test}.csv and common_features_{train,test}.csv")
    a.add_argument("--fields", help=f"comma-separated single-valued fields (default the AITM 18: "
                                    f"{','.join(AITM_FIELDS)})")
    a.add_argument("--bag-fields", help="comma-separated multi-valued fields kept as weighted bags, e.g. 109_14,110_14")

    for name, helptext in (("csv", "preprocessed Ali-CCP CSV layouts (header or not; ESMM small.txt)"),
                           ("table", "your own Parquet or CSV table (file or folder)")):
        t = sub.add_parser(name, parents=[common], help=helptext)
        t.add_argument("--input", required=True, help="file or folder (train input; all rows without --test-input)")
        t.add_argument("--test-input", help="separate test input (file or folder)")
        t.add_argument("--time-column", help="timestamp column for a time split (with --test-after)")
        t.add_argument("--test-after", metavar="DATE",
                       help="time split: test = rows with time >= DATE (ISO date or date-time, UTC)")
        t.add_argument("--time-unit", choices=("s", "ms", "us"), default="s",
                       help="unit of a numeric time column since 1970-01-01 (default s)")
        t.add_argument("--test-fraction", type=float, help="seeded random test share of the input")
        t.add_argument("--labels", required=(name == "table"),
                       help="comma-separated label columns in chain order" +
                            (" (default click,purchase)" if name == "csv" else ""))
        t.add_argument("--features", help="comma-separated feature columns (default: all other columns" +
                                          (", except dense D* columns)" if name == "csv" else ")"))
        t.add_argument("--columns", help="comma-separated column names for files without a header line")
        t.add_argument("--delimiter", default=",", help="CSV delimiter (default ',')")
        if name == "csv":
            t.add_argument("--bag-fields", help="ESMM layout: comma-separated multi-valued fields kept as bags")
    return p


def make_source(args: argparse.Namespace):
    if args.format == "aliccp":
        if args.valid_input:
            raise PrepareError("--valid-input does not apply to aliccp (validation is drawn from train)")
        return AliccpSource(args.raw_dir, fields=_names(args.fields), bag_fields=_names(args.bag_fields) or [],
                            block_mb=args.block_mb)
    inputs = {"train" if args.test_input else "all": args.input}
    if args.test_input:
        inputs["test"] = args.test_input
    if args.valid_input:
        inputs["valid"] = args.valid_input
    kw = dict(features=_names(args.features), time_column=args.time_column, time_unit=args.time_unit,
              columns=_names(args.columns), delimiter=args.delimiter, block_mb=args.block_mb)
    if args.format == "csv":
        return CsvSource(inputs, labels=_names(args.labels), bag_fields=_names(args.bag_fields) or [], **kw)
    labels = _names(args.labels)
    if not labels:
        raise PrepareError("--labels must name the label columns in chain order, e.g. click,conversion")
    return TableSource(inputs, labels=labels, **kw)


def summary(report: Dict[str, object]) -> str:
    kept, read, dropped = report["rows_kept"], report["rows_read"], report["rows_dropped"]
    lines = [f"wrote {report['out']}",
             f"rows read {read['total']:,}  kept {kept['total']:,} (train {kept['train']:,}, valid {kept['valid']:,}, "
             f"test {kept['test']:,})  dropped {dropped['total']:,}"
             + (" (" + ", ".join(f"{k} {v:,}" for k, v in dropped.items() if k != "total") + ")" if dropped["total"]
                else "")]
    cv = report["chain_violations"]
    lines.append(f"chain violations ({cv['policy']}): train {cv['train']}, valid {cv['valid']}, test {cv['test']}")
    for split in ("train", "valid", "test"):
        rates = ", ".join(f"{t} {r:.4f}" for t, r in report["positive_rate"][split].items())
        lines.append(f"positive rate {split}: {rates}")
    sizes = report["vocab_size"]
    lines.append("vocabulary: " + ", ".join(f"{f} {n:,}" for f, n in sizes.items()))
    for split in ("valid", "test"):
        worst = sorted(report["oov_rate"][split].items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"OOV {split} (highest): " + ", ".join(f"{f} {r:.2%}" for f, r in worst))
    lines.append(f"report: {os.path.join(report['out'], 'report.json')}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = PrepareConfig(
            min_count=args.min_count,
            hash_buckets=_hash(args.hash),
            valid_fraction=args.valid_fraction,
            test_fraction=getattr(args, "test_fraction", None),
            test_after=getattr(args, "test_after", None),
            chain_violations=args.chain_violations,
            max_bad_rows=args.max_bad_rows,
            rows_per_file=args.rows_per_file,
            row_group_rows=args.row_group_rows,
            min_files=args.min_files,
            seed=args.seed,
            progress=not args.no_progress,
        )
        report = prepare(make_source(args), args.out, cfg)
    except (PrepareError, FileExistsError) as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare_data.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
