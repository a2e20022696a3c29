"""Bad input: each case stops with a message naming the file, column and row (or is counted and skipped), before any
output exists; the CLI turns errors into a clean message and exit code 2; interrupted runs leave nothing behind."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import shards
from data_pipeline.formats import CsvSource, PrepareError, TableSource
from data_pipeline.prepare import PrepareConfig, prepare
from tests.prepare_util import run_cli

HEADER = "day,user,item,click,buy\n"


def good_lines(n=60, start=0):
    return "".join(f"2024-01-{1 + (i % 28):02d},u{i % 7},i{i % 5},{i % 2},{(i % 4 == 1):d}\n"
                   for i in range(start, start + n))


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def cfg(**kw):
    base = dict(progress=False, test_fraction=0.3, valid_fraction=0.2)
    base.update(kw)
    return PrepareConfig(**base)


def run(tmp_path, src, **kw):
    """prepare() into tmp_path/out; on error check that nothing was written, then re-raise."""
    out = tmp_path / "out"
    try:
        return prepare(src, str(out), cfg(**kw))
    except BaseException:
        assert not out.exists()
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "temporary folders left behind"
        raise


def table(path, **kw):
    return TableSource({"all": path}, labels=kw.pop("labels", ["click", "buy"]), **kw)


# ------------------------------------------------------------------------------------------------ labels


def test_chain_violation_policies(tmp_path):
    lines = good_lines(40) + "2024-02-01,u1,i1,0,1\n" + good_lines(40, 40)
    p = write(tmp_path, "log.csv", HEADER + lines)
    with pytest.raises(PrepareError, match=r"log\.csv: row 41: labels \{'click': 0, 'buy': 1\} break the chain"):
        run(tmp_path, table(p), chain_violations="error")
    rep = run(tmp_path, table(p), chain_violations="drop")
    assert rep["chain_violations"]["total"] == 1 and rep["rows_dropped"]["chain_violation"] == 1
    assert rep["rows_kept"]["total"] == 80


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_label_outside_0_1(tmp_path, fmt):
    if fmt == "table":
        src = table(write(tmp_path, "log.csv", HEADER + good_lines(10) + "2024-01-11,u1,i1,2,0\n" + good_lines(10)))
    else:  # Ali-CCP-shaped: labels click, purchase, then integer ids
        src = CsvSource({"all": write(tmp_path, "log.csv", "click,purchase,205\n" + "0,0,3\n" * 10 + "2,0,3\n"
                                      + "1,1,4\n" * 10)})
    with pytest.raises(PrepareError, match=r"log\.csv: row 11 \(line 12\): label column 'click' has value 2\.0, "
                                           r"outside \{0, 1\}"):
        run(tmp_path, src)


def test_missing_label_and_feature_columns(tmp_path):
    p = write(tmp_path, "log.csv", HEADER + good_lines(20))
    with pytest.raises(PrepareError, match=r"log\.csv: missing label column 'conversion'"):
        run(tmp_path, table(p, labels=["click", "conversion"]))
    with pytest.raises(PrepareError, match=r"log\.csv: declared feature column 'region' does not exist"):
        run(tmp_path, table(p, features=["user", "region"]))
    with pytest.raises(PrepareError, match=r"log\.csv: time column 'ts' does not exist"):
        run(tmp_path, table(p, time_column="ts"), test_fraction=None, test_after="2024-01-10")


# ------------------------------------------------------------------------------------------------ types


def test_wrong_types_csv(tmp_path):
    p = write(tmp_path, "ids.csv", "click,purchase,101,205\n" + "0,0,1,5\n" * 6 + "0,0,1,abc\n" + "1,0,2,6\n" * 6)
    with pytest.raises(PrepareError, match=r"ids\.csv: column '205', row 7 \(line 8\): value 'abc' is not an integer"):
        run(tmp_path, CsvSource({"all": p}))
    q = write(tmp_path, "log.csv", HEADER + good_lines(5) + "2024-01-09,u1,i1,yes,0\n")
    with pytest.raises(PrepareError, match=r"log\.csv: column 'click', row 6 \(line 7\): value 'yes' is not a number"):
        run(tmp_path, table(q))
    r = write(tmp_path, "t.csv", HEADER + good_lines(5) + "soon,u1,i1,1,0\n")
    with pytest.raises(PrepareError, match=r"t\.csv: row 6 \(line 7\): time column 'day' has value 'soon'"):
        run(tmp_path, table(r, time_column="day"), test_fraction=None, test_after="2024-01-03")


def test_wrong_types_parquet(tmp_path):
    p = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"user": ["a", "b"], "price": [1.5, 2.0], "click": [1, 0], "buy": ["no", "no"]}), p)
    with pytest.raises(PrepareError, match=r"t\.parquet: label column 'buy' has type string"):
        run(tmp_path, table(p, features=["user"]))
    q = str(tmp_path / "u.parquet")
    pq.write_table(pa.table({"user": ["a", "b"], "price": [1.5, 2.0], "click": [1, 0], "buy": [0, 0]}), q)
    with pytest.raises(PrepareError, match=r"u\.parquet: feature column 'price' has type double; categorical"):
        run(tmp_path, table(q))  # features default to every other column


def test_schema_differs_between_files(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    pq.write_table(pa.table({"f": pa.array([[1], [2]]), "click": [1, 0], "buy": [0, 0]}), str(d / "a.parquet"))
    pq.write_table(pa.table({"f": [1, 2], "click": [1, 0], "buy": [0, 0]}), str(d / "b.parquet"))
    with pytest.raises(PrepareError, match=r"b\.parquet: column 'f' is int64 but list<element: int64> in .*a\.parquet"):
        run(tmp_path, table(str(d)))


# ------------------------------------------------------------------------------------------------ malformed rows


def test_short_rows_skipped_up_to_the_limit(tmp_path):
    lines = good_lines(30) + "2024-01-05,u1\n" + good_lines(30, 30) + "2024-01-05,u1,i1,0,0,extra\n" + good_lines(9)
    p = write(tmp_path, "log.csv", HEADER + lines)
    rep = run(tmp_path, table(p), max_bad_rows=2)
    assert rep["rows_dropped"]["wrong_column_count"] == 2 and rep["rows_read"]["total"] == 71
    assert rep["rows_kept"]["total"] == 69 and "log.csv" in rep["bad_row_examples"]["wrong_column_count"]
    os.rename(tmp_path / "out", tmp_path / "kept")
    with pytest.raises(PrepareError, match=r"2 malformed rows, more than --max-bad-rows=1 \(wrong_column_count: 2"):
        run(tmp_path, table(p), max_bad_rows=1)


# ------------------------------------------------------------------------------------------------ empty


def test_empty_input_and_empty_split(tmp_path):
    with pytest.raises(PrepareError, match="every input file is empty"):
        run(tmp_path, table(write(tmp_path, "empty.csv", "")))
    with pytest.raises(PrepareError, match=r"no usable rows: the input is empty .*header\.csv"):
        run(tmp_path, table(write(tmp_path, "header.csv", HEADER)))
    p = write(tmp_path, "log.csv", HEADER + good_lines(50))
    with pytest.raises(PrepareError, match=r"split\(s\) \['test'\] would be empty after filtering"):
        run(tmp_path, table(p, time_column="day"), test_fraction=None, test_after="2030-01-01")
    only_violations = HEADER + "".join(f"2024-01-0{1 + i % 9},u{i},i1,0,1\n" for i in range(20))
    with pytest.raises(PrepareError, match=r"would be empty after filtering"):
        run(tmp_path, table(write(tmp_path, "viol.csv", only_violations)))


def test_option_errors(tmp_path):
    p = write(tmp_path, "log.csv", HEADER + good_lines(50))
    with pytest.raises(PrepareError, match="--hash names fields that are not features: \\['nope'\\]"):
        run(tmp_path, table(p), hash_buckets={"nope": 10})
    with pytest.raises(PrepareError, match="no test split"):
        run(tmp_path, table(p), test_fraction=None)
    with pytest.raises(PrepareError, match="--test-after needs --time-column"):
        run(tmp_path, table(p), test_fraction=None, test_after="2024-01-10")


# ------------------------------------------------------------------------------------------------ output


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    p = write(tmp_path, "log.csv", HEADER + good_lines(200))
    calls = {"n": 0}
    real = shards.SplitWriter.write

    def flaky(self, t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if Ctrl-C mid-way through pass 2
        return real(self, t)

    monkeypatch.setattr(shards.SplitWriter, "write", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, table(p), rows_per_file=20, row_group_rows=10)
    monkeypatch.setattr(shards.SplitWriter, "write", real)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        prepare(table(p), str(tmp_path / "out"), cfg())


def test_cli_errors_are_clean_and_success_prints_summary(tmp_path):
    p = write(tmp_path, "log.csv", HEADER + good_lines(10) + "2024-01-11,u1,i1,7,0\n")
    out = str(tmp_path / "out")
    proc = run_cli(["launch/prepare_data.py", "table", "--input", p, "--labels", "click,buy", "--test-fraction",
                    "0.3", "--out", out])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error: " in proc.stderr and "log.csv: row 11 (line 12): label column 'click' has value 7" in proc.stderr
    assert not os.path.exists(out)

    q = write(tmp_path, "good.csv", HEADER + good_lines(120))
    proc = run_cli(["launch/prepare_data.py", "table", "--input", q, "--labels", "click,buy", "--time-column", "day",
                    "--test-after", "2024-01-20", "--hash", "user=16", "--rows-per-file", "30", "--out", out])
    assert proc.returncode == 0, proc.stderr
    assert "rows read 120" in proc.stdout and "pass 2/2" in proc.stderr  # summary; progress bar on stderr
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["encoding"]["user"] == {"kind": "hash", "key_type": "str", "buckets": 16, "size": 16,
                                       "num_embeddings": 17}
    assert rep["rows_kept"]["test"] == sum(1 for i in range(120) if 1 + i % 28 >= 20)

    proc = run_cli(["launch/prepare_data.py", "table", "--input", q, "--labels", "click,buy", "--hash", "user=x",
                    "--out", str(tmp_path / "o2")])
    assert proc.returncode == 2 and "--hash 'user=x': expected FIELD=BUCKETS" in proc.stderr
