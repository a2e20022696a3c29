"""Raw Ali-CCP format (skeleton + common features, \\x01 \\x02 \\x03 separators) written here with known content:
every row comes back through the trainer's reader with exactly the expected ids and labels; malformed rows are
counted by reason and skipped; the bag field keeps its weights."""

import os
import random
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline.formats import AliccpSource, PrepareError
from data_pipeline.prepare import PrepareConfig, prepare, uniform
from data_pipeline.spec import DatasetSpec
from tests.prepare_util import read_split

A, B, C = "\x01", "\x02", "\x03"
SINGLE = ["101", "121", "122", "205", "206", "216", "301"]
BAG = "109_14"
N = {"train": 3000, "test": 1000}


def fl(entries):
    return A.join(f"{f}{B}{i}{C}{v}" for f, i, v in entries)


def write_raw(d, seed=0):
    """Write the four files; return per role the good rows as dicts (field -> id / None / [(id, weight)]) with
    their labels and row ordinals, and the malformed rows written (reason -> count)."""
    rng = random.Random(seed)
    os.makedirs(d, exist_ok=True)
    truth, bad = {}, {}
    for role, n in N.items():
        users = {}
        with open(os.path.join(d, f"common_features_{role}.csv"), "w") as f:
            for u in range(40):
                key = f"{rng.getrandbits(64):016x}"
                feats = {"101": 5000 + u, "121": rng.choice([7, 8, 9])}
                if u % 5:
                    feats["122"] = 30 + u % 3  # missing for every 5th user
                bag = [(rng.randint(0, 30), float(rng.randint(1, 9))) for _ in range(rng.randint(0, 4))]
                entries = [(k, v, "1.0") for k, v in feats.items()] + [(BAG, i, w) for i, w in bag]
                entries += [("150_14", 77, "2.0")]  # a field nobody asked for
                rng.shuffle(entries)
                users[key] = (feats, [(i, w) for fid, i, w in entries if fid == BAG])  # in file order
                f.write(f"{key},{len(entries)},{fl(entries)}\n")
        keys = sorted(users)
        rows, ordinal = [], 0
        bad[role] = Counter()
        with open(os.path.join(d, f"sample_skeleton_{role}.csv"), "w") as f:
            for k in range(n):
                if k in (100, 1700):  # malformed rows, at known places
                    f.write(f"9{k},0,0,{keys[0]},2,205{B}1{A}206{B}2{C}1.0\n")  # entry without \x03
                    f.write(f"8{k},0,0,feedfacedeadbeef,1,{fl([('205', 1, '1.0')])}\n")  # unknown common key
                    f.write(f"7{k},0,0\n")  # short row
                    f.write(f"6{k},0,0,{keys[0]},5,{fl([('205', 1, '1.0')])}\n")  # feature_num says 5, has 1
                    ordinal += 3  # the short row is not a parsed row
                    bad[role].update(["bad_feature_entry", "unknown_common_key", "wrong_column_count",
                                      "feature_num_mismatch"])
                user = rng.choice(keys)
                ad = {"205": rng.randint(0, 150), "206": rng.randint(0, 12), "301": rng.choice([1, 2, 3])}
                if rng.random() < 0.7:
                    ad["216"] = rng.randint(0, 40)
                click = int(rng.random() < 0.3)
                buy = int(click and rng.random() < 0.3)
                if k % 97 == 5:
                    click, buy = 0, 1  # chain violation
                entries = [(fid, v, "1.0") for fid, v in ad.items()]
                entries += [("210", rng.randint(0, 9), "1.0") for _ in range(rng.randint(0, 3))]  # unwanted
                rng.shuffle(entries)
                f.write(f"{k},{click},{buy},{user},{len(entries)},{fl(entries)}\n")
                feats, ubag = users[user]
                row = {fid: ad.get(fid, feats.get(fid)) for fid in SINGLE}
                row[BAG] = ubag
                rows.append((ordinal, [click, buy], row))
                ordinal += 1
        truth[role] = rows
    return truth, bad


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("raw"))
    truth, bad = write_raw(d)
    return d, truth, bad


def expected(truth, min_count, seed=0, valid_fraction=0.1):
    """Per split the (row, labels) kept, and the vocabulary each field should have (independent re-derivation)."""
    splits = {"train": [], "valid": [], "test": []}
    for role, rows in truth.items():
        for ordinal, labels, row in rows:
            if labels[1] > labels[0]:
                continue  # chain violation, dropped
            if role == "test":
                splits["test"].append((labels, row))
            else:
                u = uniform(seed, 1, np.array([ordinal]))[0]
                splits["valid" if u < valid_fraction else "train"].append((labels, row))
    vocab = {}
    for fid in SINGLE + [BAG]:
        cnt = Counter()
        for _, row in splits["train"]:
            if fid == BAG:
                cnt.update(i for i, _ in row[BAG])
            else:
                cnt[row[fid]] += 1
        keys = sorted((k for k in cnt if k is not None and cnt[k] >= min_count), key=lambda k: (-cnt[k], k))
        v = {k: i + 1 for i, k in enumerate(keys)}
        if cnt.get(None, 0) >= min_count and None in cnt:
            v[None] = len(keys) + 1
        vocab[fid] = v
    return splits, vocab


@pytest.mark.parametrize("min_count", [1, 20])
def test_raw_round_trip_exact_ids(raw, tmp_path, min_count):
    d, truth, bad = raw
    out = str(tmp_path / "out")
    src = AliccpSource(d, fields=SINGLE, bag_fields=[BAG])
    cfg = PrepareConfig(progress=False, min_count=min_count, rows_per_file=700, row_group_rows=256)
    rep = prepare(src, out, cfg)
    splits, vocab = expected(truth, min_count)
    spec = DatasetSpec.load(out)
    assert spec.labels == ["click", "purchase"] and spec.field_names == SINGLE + [BAG]
    for f in spec.fields:
        assert f.num_embeddings == len(vocab[f.name]) + 1 and f.multi_valued == (f.name == BAG)
    assert len(spec.splits["train"]) > 2  # several files
    for split, rows in splits.items():
        assert spec.rows[split] == len(rows) == rep["rows_kept"][split]
        ids, labels = read_split(out, split)
        np.testing.assert_array_equal(labels, [lab for lab, _ in rows])
        for fid in SINGLE:
            assert ids[fid] == [vocab[fid].get(r[fid], 0) for _, r in rows], (split, fid)
        assert ids[BAG] == [[vocab[BAG].get(i, 0) for i, _ in r[BAG]] for _, r in rows]
        # weights: the bag's values, aligned with its ids (a column the reader leaves alone)
        w = pq.read_table(spec.files(split), columns=[BAG + "__weights"]).column(0).to_pylist()
        assert w == [[wt for _, wt in r[BAG]] for _, r in rows]
    # accounting: read = kept + dropped, malformed rows by reason
    for role in N:
        assert rep["rows_read"][role] == N[role] + sum(bad[role].values())
    assert rep["rows_read"]["total"] == rep["rows_kept"]["total"] + rep["rows_dropped"]["total"]
    for reason in ("bad_feature_entry", "unknown_common_key", "wrong_column_count", "feature_num_mismatch"):
        assert rep["rows_dropped"][reason] == bad["train"][reason] + bad["test"][reason] == 3
        assert reason in rep["bad_row_examples"]
    n_viol = sum(1 for rows in truth.values() for _, lab, _ in rows if lab[1] > lab[0])
    assert rep["chain_violations"]["total"] == rep["rows_dropped"]["chain_violation"] == n_viol
    assert rep["source"]["common_features"]["train"]["rows"] == 40
    enc = rep["encoding"]["205"]
    if min_count > 1:  # rare ids fall back to the unknown index, in train too
        assert enc["size"] < enc["train_distinct"] and rep["oov_rate"]["train"]["205"] > 0
    else:
        assert enc["size"] == enc["train_distinct"] and rep["oov_rate"]["train"]["205"] == 0


def test_raw_too_many_bad_rows_is_an_error_before_output(raw, tmp_path):
    d, _, _ = raw
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=r"malformed rows, more than --max-bad-rows=5.*bad_feature_entry"):
        prepare(AliccpSource(d, fields=SINGLE), str(out), PrepareConfig(progress=False, max_bad_rows=5))
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_raw_missing_files(tmp_path):
    (tmp_path / "sample_skeleton_train.csv").write_text("")
    with pytest.raises(PrepareError, match="missing common_features_train.csv"):
        prepare(AliccpSource(str(tmp_path)), str(tmp_path / "out"), PrepareConfig(progress=False))
