"""table format: string categoricals, time split, Parquet (dictionary, list/bag columns), hashing, OOV rates on a
hand-made case, seeded random splits that do not depend on block sizes."""

import csv
import json
import os
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.formats import TableSource
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.vocab import Hasher
from tests.prepare_util import decode, read_split, vocab_of

TASKS = ["click", "conversion", "core_conversion"]


def _cfg(**kw):
    base = dict(progress=False, rows_per_file=300, row_group_rows=128)
    base.update(kw)
    return PrepareConfig(**base)


def campaign_rows(n=1200, seed=0):
    """Rows of a campaign log: ts (ISO), customer/channel strings, fund ints, 3 chained labels (a few broken)."""
    rng = np.random.default_rng(seed)
    t0 = datetime(2024, 2, 1)
    rows = []
    for i in range(n):
        ts = t0 + timedelta(hours=int(i * 48 * 24 / n))  # 48 days, in order
        c = int(rng.random() < 0.4)
        v = int(c and rng.random() < 0.5)
        k = int(v and rng.random() < 0.5)
        if i % 101 == 7:
            c, v, k = 1, 0, 1  # broken chain
        rows.append({"ts": ts.strftime("%Y-%m-%d %H:%M:%S"), "customer": f"cust{int(rng.integers(0, 60)):03d}",
                     "channel": ["web", "app", "branch"][int(rng.integers(0, 3))], "fund": int(rng.integers(0, 25)),
                     "click": c, "conversion": v, "core_conversion": k})
    return rows


def write_csv(path, rows, header=True):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if header:
            w.writeheader()
        w.writerows(rows)


def test_csv_string_categoricals_time_split(tmp_path):
    rows = campaign_rows()
    path = str(tmp_path / "log.csv")
    write_csv(path, rows)
    out = str(tmp_path / "ds")
    src = TableSource({"all": path}, labels=TASKS, time_column="ts")
    rep = prepare(src, out, _cfg(test_after="2024-03-10", chain_violations="fix"))
    assert [f.name for f in src.fields] == ["customer", "channel", "fund"]  # all but labels and time
    cut = datetime(2024, 3, 10)
    is_test = [datetime.fromisoformat(r["ts"]) >= cut for r in rows]
    assert rep["rows_kept"]["test"] == sum(is_test)
    assert rep["rows_kept"]["train"] + rep["rows_kept"]["valid"] == len(rows) - sum(is_test)
    assert 0.05 < rep["rows_kept"]["valid"] / (len(rows) - sum(is_test)) < 0.16
    # fix: y_t := y_t * y_{t-1}; counted per split
    broken = [r for r in rows if r["core_conversion"] > r["conversion"]]
    assert rep["chain_violations"]["total"] == len(broken) and rep["rows_dropped"]["total"] == 0
    test_rows = [r for r, t in zip(rows, is_test) if t]
    ids, labels = read_split(out, "test")
    fixed = np.cumprod([[r[t] for t in TASKS] for r in test_rows], axis=1)
    np.testing.assert_array_equal(labels, fixed)
    assert rep["positives"]["test"] == {t: int(fixed[:, i].sum()) for i, t in enumerate(TASKS)}
    # string values decode back (CSV categoricals are read as strings: fund "7" is the string "7")
    for field in ("customer", "channel", "fund"):
        got = decode(out, field, ids[field])
        want = [str(r[field]) for r in test_rows]
        assert all(g == w for g, w in zip(got, want) if g != "<unk>")
    assert vocab_of(out, "channel").keys() == {"web", "app", "branch"}


def test_parquet_folder_dictionary_bags_int_time(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "pq"
    d.mkdir()
    n = 400
    all_tags = []
    for part in range(3):
        tags = [[f"t{int(x)}" for x in rng.integers(0, 9, int(rng.integers(0, 4)))] for _ in range(n)]
        all_tags.append(tags)
        click = rng.random(n) < 0.5
        t = pa.table({
            "epoch_ms": pa.array(1_700_000_000_000 + np.arange(part * n, (part + 1) * n) * 60_000, pa.int64()),
            "segment": pa.array([["a", "b", "c"][i % 3] for i in range(n)]).dictionary_encode(),
            "product": pa.array(rng.integers(0, 50, n), pa.int32()),
            "tags": pa.array(tags, pa.list_(pa.string())),
            "click": pa.array(click),
            "buy": pa.array((click & (rng.random(n) < 0.3)).astype(np.int8)),
        })
        pq.write_table(t, str(d / f"part-{part}.parquet"), row_group_size=150)
    out = str(tmp_path / "ds")
    after = datetime.fromtimestamp(1_700_000_000 + 1000 * 60, tz=timezone.utc).replace(tzinfo=None).isoformat()
    src = TableSource({"all": str(d)}, labels=["click", "buy"], time_column="epoch_ms", time_unit="ms")
    rep = prepare(src, out, _cfg(test_after=after, min_files=3))
    assert rep["rows_kept"]["test"] == 3 * n - 1000
    spec = json.load(open(os.path.join(out, "spec.json")))
    assert {f["name"]: f["multi_valued"] for f in spec["fields"]} == {"segment": False, "product": False, "tags": True}
    assert len(spec["splits"]["test"]) == 3
    ids, _ = read_split(out, "test")
    test_tags = [tags for part in all_tags for tags in part][1000:]
    known = vocab_of(out, "tags")
    assert [decode(out, "tags", b) for b in ids["tags"]] == [[t if t in known else "<unk>" for t in b]
                                                             for b in test_tags]
    assert any(len(b) == 0 for b in ids["tags"]) and any(len(b) > 1 for b in ids["tags"])
    assert decode(out, "segment", ids["segment"]) == [["a", "b", "c"][i % 3] for i in range(1000 - 2 * n, n)]


def test_hashing_and_oov_rates_hand_made(tmp_path):
    train = [("a", "x"), ("a", "y"), ("a", "x"), ("b", "z"), (None, "x"), ("a", None)] * 2  # a:8, b:2, null:2
    valid = [("a", "x"), ("c", "x")]
    test = [("a", "q"), ("b", "x"), ("c", "x"), (None, "y")]

    def write(name, pairs):
        p = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.table({"f": pa.array([p[0] for p in pairs], pa.string()),
                                 "h": pa.array([p[1] for p in pairs], pa.string()),
                                 "y1": [1] * len(pairs), "y2": [0] * len(pairs)}), p)
        return p

    inputs = {"train": write("train", train), "valid": write("valid", valid), "test": write("test", test)}
    out = str(tmp_path / "ds")
    rep = prepare(TableSource(inputs, labels=["y1", "y2"]), out,
                  _cfg(min_count=3, hash_buckets={"h": 8}, seed=5))
    # f: a (8 times) kept; b (2) and missing (2) below min_count 3 -> unknown
    assert rep["vocab_size"]["f"] == 1 and rep["num_embeddings"]["f"] == 2
    assert rep["oov_rate"]["valid"]["f"] == pytest.approx(1 / 2)  # c
    assert rep["oov_rate"]["test"]["f"] == pytest.approx(3 / 4)  # b, c, missing
    assert rep["oov_rate"]["train"]["f"] == pytest.approx(4 / 12)
    ids, _ = read_split(out, "test")
    assert ids["f"] == [1, 0, 0, 0]
    # h: hashed into 1..8, same value -> same bucket in every split, missing -> 0, independent of the vocabulary
    assert rep["num_embeddings"]["h"] == 9 and rep["encoding"]["h"]["kind"] == "hash"
    h = Hasher(8, seed=5)
    want = h.encode(pa.array(["q", "x", "x", "y"])).tolist()
    assert ids["h"] == want and all(1 <= i <= 8 for i in want)
    assert read_split(out, "train")[0]["h"][5] == 0  # the missing value
    assert rep["oov_rate"]["test"]["h"] == 0.0
    # the vocabulary file says what each index means
    assert vocab_of(out, "f") == {"a": 1}


def test_hash_is_stable_for_ints_and_strings():
    h = Hasher(1000, seed=0)
    a = h.encode(pa.array([1, 2, 3, 2**40, None], pa.int64()))
    assert a[-1] == 0 and a[1] == Hasher(1000, seed=0).encode(pa.array([2], pa.int64()))[0]
    assert not np.array_equal(a[:4], Hasher(1000, seed=1).encode(pa.array([1, 2, 3, 2**40], pa.int64())))
    s = Hasher(1000, seed=0).encode(pa.array(["a", "b", "a", None]))
    assert s[0] == s[2] and s[0] != s[1] and s[3] == 0 and all(1 <= x <= 1000 for x in s[:3])


def test_random_test_split_is_seeded_and_block_independent(tmp_path):
    rows = campaign_rows(n=2000, seed=3)
    path = str(tmp_path / "log.csv")
    write_csv(path, rows)
    reps, firsts = [], []
    for i, (block, seed) in enumerate([(0.0625, 0), (1.0, 0), (1.0, 1)]):
        out = str(tmp_path / f"o{i}")
        src = TableSource({"all": path}, labels=TASKS, features=["customer", "fund"], block_mb=block)
        reps.append(prepare(src, out, _cfg(test_fraction=0.25, seed=seed)))
        firsts.append(read_split(out, "test")[1])
    assert reps[0]["rows_kept"] == reps[1]["rows_kept"]  # 64 KiB blocks or one block: the same rows
    np.testing.assert_array_equal(firsts[0], firsts[1])
    assert reps[2]["rows_kept"] != reps[0]["rows_kept"]  # another seed, another split
    kept = reps[0]["rows_kept"]
    assert 0.2 < kept["test"] / kept["total"] < 0.3
    assert reps[0]["source"]["ignored_columns"] == ["ts", "channel"]
