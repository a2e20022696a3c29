"""Synthetic generator and DatasetSpec: chain labels, determinism, layout, rates, oracle AUC, atomicity, spec errors."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline import synthetic
from data_pipeline.spec import SPEC_FILE, DatasetSpec, FieldSpec
from data_pipeline.synthetic import SyntheticConfig, ensure_dataset, generate, rank_auc

SMALL = dict(
    fields={"customer": 500, "fund": 40, "channel": 6, "device": 3},
    rows_train=12000,
    rows_valid=5000,
    rows_test=1500,
    rows_per_file=5000,
    row_group_rows=1500,
    seed=7,
)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cfg = SyntheticConfig(**SMALL)
    return cfg, generate(cfg, str(tmp_path_factory.mktemp("gen") / "ds"), progress=False)


def _read(spec, split):
    return [pq.read_table(f) for f in spec.files(split)]


def test_layout_files_and_row_groups(small):
    cfg, spec = small
    assert spec.rows == {"train": 12000, "valid": 5000, "test": 1500}
    assert spec.labels == cfg.tasks and [f.name for f in spec.fields] == list(cfg.fields)
    assert spec.splits["train"] == [f"train/part-0000{i}.parquet" for i in range(3)]
    rgs = [pq.ParquetFile(f).metadata.num_row_groups for f in spec.files("train")]
    assert rgs == [4, 4, 2]  # 5000 = 3x1500 + 500, then 2000 = 1500 + 500
    assert sum(pq.read_metadata(f).num_rows for f in spec.files("train")) == 12000
    schema = pq.read_schema(spec.files("valid")[0])
    assert str(schema.field("customer").type) == "int64"
    assert str(schema.field("click").type) == "int8"
    assert str(schema.field("oracle_core_conversion").type) == "float"


def test_chain_ids_and_rates(small):
    cfg, spec = small
    tables = [t for s in spec.splits for t in _read(spec, s)]
    y = np.concatenate([np.stack([t.column(k).to_numpy() for k in cfg.tasks], 1) for t in tables]).astype(int)
    # chain: y_t = 1 only if y_{t-1} = 1
    assert np.all(y[:, 1:] <= y[:, :-1])
    for name, card in cfg.fields.items():
        ids = np.concatenate([t.column(name).to_numpy() for t in tables])
        assert ids.min() >= 0 and ids.max() < card
    # conditional rates P(y_t=1 | y_{t-1}=1) near base_rates (~18.5k rows: ~400 rows behind the last rate)
    cond = [y[:, 0].mean()] + [y[y[:, t - 1] == 1, t].mean() for t in range(1, y.shape[1])]
    np.testing.assert_allclose(cond, cfg.base_rates, atol=0.06)
    # Zipf-like: the most frequent customer id is far above uniform (1/500), and it is not simply id 0
    counts = np.bincount(np.concatenate([t.column("customer").to_numpy() for t in tables]), minlength=500)
    assert counts.max() / counts.sum() > 10 / 500
    assert sorted(np.argsort(-counts)[:5]) != [0, 1, 2, 3, 4]


def test_oracle_auc_well_above_chance(small):
    cfg, spec = small
    for split in spec.splits:
        for task in cfg.tasks:
            assert spec.meta["oracle_auc"][split][task] > 0.65, (split, task)
    # the stored AUC is the AUC of the stored oracle column
    t = _read(spec, "valid")
    y = np.concatenate([x.column("conversion").to_numpy() for x in t])
    s = np.concatenate([x.column("oracle_conversion").to_numpy() for x in t])
    assert rank_auc(y, s) == pytest.approx(spec.meta["oracle_auc"]["valid"]["conversion"])
    # oracle is the marginal: non-increasing along the chain
    o = np.stack([t[0].column(f"oracle_{k}").to_numpy() for k in cfg.tasks], 1)
    assert np.all(np.diff(o, axis=1) <= 0)


def test_rank_auc_matches_pairwise_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = rng.integers(0, 10, 300).astype(float)  # many ties
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert rank_auc(y, s) == pytest.approx(brute)
    assert np.isnan(rank_auc(np.zeros(5), np.arange(5)))


def test_same_seed_byte_identical(tmp_path, small):
    cfg, spec = small
    spec2 = generate(SyntheticConfig(**SMALL), str(tmp_path / "again"), progress=False)
    for split in spec.splits:
        for a, b in zip(spec.files(split), spec2.files(split)):
            assert open(a, "rb").read() == open(b, "rb").read()
    other = generate(SyntheticConfig(**{**SMALL, "seed": 8}), str(tmp_path / "other"), progress=False)
    assert open(other.files("test")[0], "rb").read() != open(spec.files("test")[0], "rb").read()


def test_spec_round_trip(small, tmp_path):
    _, spec = small
    assert DatasetSpec.load(spec.root) == spec
    assert DatasetSpec.load(os.path.join(spec.root, SPEC_FILE)) == spec
    assert spec.meta["config"]["seed"] == SMALL["seed"]
    assert "root" not in json.load(open(os.path.join(spec.root, SPEC_FILE)))
    assert all(os.path.isabs(f) for f in spec.files("train"))


def test_atomic_write_on_failure(tmp_path, monkeypatch):
    real, calls = synthetic._write_row_group, []

    def failing(writer, table):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        real(writer, table)

    monkeypatch.setattr(synthetic, "_write_row_group", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(SyntheticConfig(**SMALL), str(tmp_path / "ds"), progress=False)
    assert os.listdir(tmp_path) == []  # neither out_dir nor a leftover temporary folder


def test_generate_refuses_non_empty_out_dir(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        generate(SyntheticConfig(**SMALL), str(tmp_path / "ds"), progress=False)


def test_ensure_dataset_caches(tmp_path, monkeypatch):
    cfg = SyntheticConfig(**{**SMALL, "rows_train": 2000, "rows_valid": 500, "rows_test": 0})
    path = ensure_dataset(cfg, str(tmp_path))
    assert os.path.basename(path).startswith("synthetic-")
    assert set(DatasetSpec.load(path).splits) == {"train", "valid"}  # 0-row splits are left out

    def boom(*a, **k):
        raise AssertionError("regenerated")

    monkeypatch.setattr(synthetic, "generate", boom)
    assert ensure_dataset(cfg, str(tmp_path)) == path
    assert synthetic.config_hash(cfg) != synthetic.config_hash(SyntheticConfig(**{**SMALL, "seed": 1}))


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="tasks"):
        generate(SyntheticConfig(tasks=["click"]), str(tmp_path / "a"), progress=False)
    with pytest.raises(ValueError, match="base_rates"):
        generate(SyntheticConfig(base_rates=[0.0]), str(tmp_path / "b"), progress=False)


# ---------------------------------------------------------------- spec load errors


def _write_spec(root, **over):
    spec = DatasetSpec(
        fields=[FieldSpec("a", 10), FieldSpec("b", 5, multi_valued=True)],
        labels=["click", "conversion"],
        splits={"train": ["train/p.parquet"]},
        rows={"train": 1},
    )
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    open(os.path.join(root, "train", "p.parquet"), "wb").close()
    d = spec.to_dict()
    d.update(over)
    with open(os.path.join(root, SPEC_FILE), "w") as f:
        json.dump(d, f)
    return str(root)


def test_spec_load_ok_and_unknown_split(tmp_path):
    spec = DatasetSpec.load(_write_spec(tmp_path))
    assert spec.fields[1].multi_valued and spec.root == str(tmp_path)
    with pytest.raises(ValueError, match=r"unknown split 'valid'.*\['train'\]"):
        spec.files("valid")


@pytest.mark.parametrize(
    "over, match",
    [
        ({"labels": ["click"]}, "at least 2 labels"),
        ({"fields": [{"name": "a", "num_embeddings": 0}]}, "'a' has num_embeddings=0"),
        ({"fields": [{"name": "a", "num_embeddings": 3}, {"name": "a", "num_embeddings": 3}]}, r"duplicate.*'a'"),
        ({"labels": ["a", "click"]}, r"duplicate.*'a'"),
        ({"splits": {"train": ["train/missing.parquet"]}}, "missing: .*missing.parquet"),
        ({"fields": [{"name": "a", "cardinality": 3}]}, "bad field entry"),
    ],
)
def test_spec_load_errors(tmp_path, over, match):
    root = _write_spec(tmp_path, **over)
    with pytest.raises(ValueError, match=match) as e:
        DatasetSpec.load(root)
    assert SPEC_FILE in str(e.value)  # names the file


def test_spec_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no spec.json in .*point data.path at a folder written by"):
        DatasetSpec.load(str(tmp_path))
