"""The real Ali-CCP sample files (tests/data/ali-ccp-samples, with their sources and licences) through the csv
format: row counts, label rates, chain violations as they are in the files, header vs no header, ids that decode back
to the file's values."""

import csv
import json
import os

import numpy as np
import pytest

from data_pipeline.formats import AITM_FIELDS, CsvSource
from data_pipeline.prepare import PrepareConfig, prepare
from tests.prepare_util import SAMPLES, decode, read_split

AITM_TRAIN = os.path.join(SAMPLES, "paddlerec_aitm", "train.csv")
AITM_TEST = os.path.join(SAMPLES, "paddlerec_aitm", "test.csv")



def _rows(path, header):
    """The file read by hand: (header names or None, rows of strings)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return (rows[0], rows[1:]) if header else (None, rows)


def _cfg(**kw):
    base = dict(progress=False, min_files=2, rows_per_file=1000, row_group_rows=16)
    base.update(kw)
    return PrepareConfig(**base)


def test_aitm_sample_header_and_no_header_chain_dropped(tmp_path):
    names, train = _rows(AITM_TRAIN, header=True)
    _, test = _rows(AITM_TEST, header=False)
    assert names == ["click", "purchase"] + AITM_FIELDS and len(train) == 48 and len(test) == 50
    viol = lambda rows: sum(r[0] == "0" and r[1] == "1" for r in rows)  # noqa: E731
    assert viol(train) == 2 and viol(test) == 3  # as SOURCES.md says

    out = str(tmp_path / "aitm")
    src = CsvSource({"train": AITM_TRAIN, "test": AITM_TEST})
    rep = prepare(src, out, _cfg())
    assert src.layouts_seen == {AITM_TRAIN: "header", AITM_TEST: "no header"}
    assert [f.name for f in src.fields] == AITM_FIELDS
    assert rep["rows_read"] == {"train": 48, "test": 50, "total": 98}
    cv = rep["chain_violations"]
    assert cv["policy"] == "drop" and cv["train"] + cv["valid"] == 2 and cv["test"] == 3 and cv["total"] == 5
    assert rep["rows_dropped"] == {"chain_violation": 5, "total": 5}
    kept = rep["rows_kept"]
    assert kept["train"] + kept["valid"] == 46 and kept["test"] == 47
    # positives, from the file: clicks untouched by dropping purchase-without-click rows
    good_train = [r for r in train if not (r[0] == "0" and r[1] == "1")]
    good_test = [r for r in test if not (r[0] == "0" and r[1] == "1")]
    pos = rep["positives"]
    assert pos["train"]["click"] + pos["valid"]["click"] == sum(int(r[0]) for r in good_train) == 3
    assert pos["train"]["purchase"] + pos["valid"]["purchase"] == sum(int(r[1]) for r in good_train) == 1
    assert pos["test"] == {"click": 3, "purchase": 0}
    assert rep["positive_rate"]["test"]["click"] == pytest.approx(3 / 47)

    # the test split, read back by the trainer's reader, decodes to the file's values (unknown -> index 0)
    ids, labels = read_split(out, "test")
    np.testing.assert_array_equal(labels, [[int(r[0]), int(r[1])] for r in good_test])
    for j, field in enumerate(AITM_FIELDS):
        want = [int(r[2 + j]) for r in good_test]
        got = decode(out, field, ids[field])
        assert [g for g, w in zip(got, want) if g != "<unk>"] == [w for g, w in zip(got, want) if g != "<unk>"]
        oov = sum(g == "<unk>" for g in got) / len(got)
        assert rep["oov_rate"]["test"][field] == pytest.approx(oov)
    assert rep["oov_rate"]["test"]["101"] == 1.0  # train and test users differ in this sample


def test_aitm_sample_fix_policy_keeps_rows(tmp_path):
    rep = prepare(CsvSource({"train": AITM_TRAIN, "test": AITM_TEST}), str(tmp_path / "o"),
                  _cfg(chain_violations="fix"))
    assert rep["rows_kept"]["total"] == 98 and rep["rows_dropped"]["total"] == 0
    assert rep["chain_violations"]["total"] == 5  # still counted
    pos = rep["positives"]
    assert pos["train"]["purchase"] + pos["valid"]["purchase"] == 1 and pos["test"]["purchase"] == 0
    assert pos["train"]["click"] + pos["valid"]["click"] == 3


def test_torch_rechub_sample_with_valid_input(tmp_path):
    files = {s: os.path.join(SAMPLES, f"ali_ccp_{s}_sample.csv") for s in ("train", "val", "test")}
    names, rows = _rows(files["train"], header=True)
    src = CsvSource({"train": files["train"], "valid": files["val"], "test": files["test"]})
    out = str(tmp_path / "rechub")
    rep = prepare(src, out, _cfg())
    dense = [n for n in names if n.startswith("D")]
    sparse = [n for n in names[2:] if n not in dense]
    assert [f.name for f in src.fields] == sparse and len(sparse) == 23
    assert rep["source"]["ignored_columns"] == dense
    assert rep["rows_kept"] == {"train": 100, "valid": 50, "test": 50, "total": 200}
    assert rep["chain_violations"]["total"] == 0
    for split, key in (("train", "train"), ("valid", "val"), ("test", "test")):
        _, r = _rows(files[key], header=True)
        for t, task in enumerate(("click", "purchase")):
            assert rep["positive_rate"][split][task] == pytest.approx(np.mean([int(x[t]) for x in r]))
    assert rep["vocab_size"]["101"] == 1  # field 101 has a single value in this sample
    ids, labels = read_split(out, "train")
    assert labels[:, 0].sum() == 7 and labels[:, 1].sum() == 1
    for field in ("205", "150_14"):
        j = names.index(field)
        assert decode(out, field, ids[field]) == [int(r[j]) for r in rows]


def test_paddlerec_esmm_small_txt(tmp_path):
    train = os.path.join(SAMPLES, "paddlerec_esmm", "train", "small.txt")
    test = os.path.join(SAMPLES, "paddlerec_esmm", "test", "small.txt")
    src = CsvSource({"train": train, "test": test}, bag_fields=["150_14", "210"])
    out = str(tmp_path / "esmm")
    rep = prepare(src, out, _cfg(valid_fraction=0.3))
    assert set(src.layouts_seen.values()) == {"esmm"}
    assert rep["rows_read"] == {"train": 10, "test": 10, "total": 20}
    lines = [ln.rstrip("\n").split(",") for ln in open(test)]
    clicks, buys = sum(int(x[1]) for x in lines), sum(int(x[2]) for x in lines)
    assert rep["positives"]["test"] == {"click": clicks, "purchase": buys}
    spec = json.load(open(os.path.join(out, "spec.json")))
    assert {f["name"]: f["multi_valued"] for f in spec["fields"]}["210"] is True
    ids, _ = read_split(out, "test")
    # bags: as many ids as the row has entries of the field; single fields: the row's value or missing
    for row, bag in zip(lines, ids["150_14"]):
        assert len(bag) == sum(tok.startswith("150_14:") for tok in row[3:])
    miss = [not any(tok.startswith("508:") for tok in row[3:]) for row in lines]
    got = decode(out, "508", ids["508"])
    for m, g in zip(miss, got):
        assert (g is None) == m or g == "<unk>"
