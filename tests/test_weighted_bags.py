"""Weighted bag fields (Ali-CCP's 109_14 history counts): the weights written by launch/prepare_data.py reach the
KJT, the weighted EmbeddingBagCollection pools to the weighted sum, and the exported model takes the same weights
(whole-split parity through export_run), from the raw file to the served probability."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec import KeyedJaggedTensor

from data_pipeline.formats import AliccpSource
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.raw_inputs import FieldInput, table_to_inputs
from data_pipeline.reader import ShardReader
from data_pipeline.spec import DatasetSpec, FieldSpec
from launch.export import export_run
from pimm_model.embedding import EmbeddingArch, make_tables
from tests.conftest import E2E_ARGS, run_cli
from tests.serving_util import eager_probs, fake_run
from tests.test_prepare_aliccp import BAG, SINGLE, write_raw


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("weighted")
    write_raw(str(root / "raw"), seed=3)
    out = str(root / "ds")
    prepare(AliccpSource(str(root / "raw"), fields=SINGLE, bag_fields=[BAG]), out,
            PrepareConfig(progress=False, min_count=1, rows_per_file=150, row_group_rows=64))
    return out


def _bags(jt):
    """Per row, the slice of a JaggedTensor's values and weights."""
    ends = np.cumsum(jt.lengths().numpy())
    v, w = jt.values().numpy(), jt.weights().numpy()
    return [v[e - k: e].tolist() for e, k in zip(ends, jt.lengths().numpy())], \
        [w[e - k: e].tolist() for e, k in zip(ends, jt.lengths().numpy())]


def test_spec_marks_the_bag_weighted_and_reader_puts_weights_in_the_kjt(prepared):
    spec = DatasetSpec.load(prepared)
    assert [f.name for f in spec.fields if f.weighted] == [BAG] and spec.weighted
    files = spec.files("valid")
    table = pq.read_table(files, columns=[BAG, BAG + "__weights"])
    want_ids, want_w = table.column(0).to_pylist(), table.column(1).to_pylist()
    assert any(len(b) > 1 for b in want_ids) and any(w != 1.0 for b in want_w for w in b)
    reader = ShardReader(spec, files, 64)
    ids, weights = [], []
    for b in reader.iter_eval(reader.num_padded_batches()):
        kjt = b.features
        n = int(b.weights.sum())
        bag_ids, bag_w = _bags(kjt[BAG])
        ids += bag_ids[:n]
        weights += bag_w[:n]
        assert bag_w[n:] == [[1.0]] * (64 - n)  # padding rows: one id 0 of weight 1
        for name in SINGLE:  # the other fields' ids weigh exactly 1
            assert bool((kjt[name].weights() == 1.0).all())
        assert kjt.weights().dtype == torch.float32 and kjt.weights().shape == kjt.values().shape
    assert ids == want_ids and [len(w) for w in weights] == [len(w) for w in want_w]
    assert [x for w in weights for x in w] == pytest.approx([x for w in want_w for x in w])


def test_legacy_spec_with_weight_columns_in_meta_only(prepared, tmp_path):
    raw = json.load(open(os.path.join(prepared, "spec.json")))
    for f in raw["fields"]:
        f.pop("weighted")
    legacy = tmp_path / "spec.json"
    for split, files in raw["splits"].items():
        raw["splits"][split] = [os.path.join(prepared, p) for p in files]
    legacy.write_text(json.dumps(raw))
    spec = DatasetSpec.load(str(legacy))
    assert [f.name for f in spec.fields if f.weighted] == [BAG]
    with pytest.raises(ValueError, match="'x' is weighted but not multi_valued"):
        DatasetSpec([FieldSpec("x", 3, False, True)], ["a", "b"], {}, {}).validate()


def _weighted_spec(tmp_path, table):
    pq.write_table(table, str(tmp_path / "p0.parquet"))
    spec = DatasetSpec([FieldSpec("tags", 20, True, True), FieldSpec("user", 10)], ["click", "conv"],
                       {"train": ["p0.parquet"]}, {"train": table.num_rows})
    spec.save(str(tmp_path))
    return spec


@pytest.mark.parametrize("weights, match", [
    (pa.array([[1.0], [2.0]], pa.list_(pa.float32())), r"\(row group 0\): row 1 has 2 id\(s\) in 'tags' but 1 "
                                                       r"weight\(s\) in 'tags__weights'"),
    (pa.array([[1.0], [float("nan"), 1.0]], pa.list_(pa.float32())), r"'tags__weights' holds NaN or infinite"),
    (pa.array([["a"], ["b", "c"]]), r"column 'tags__weights' has type list<element: string>, expected list<float>"),
])
def test_bad_weight_columns_name_file_and_column(tmp_path, weights, match):
    t = pa.table({"tags": pa.array([[1], [2, 3]]), "tags__weights": weights, "user": [1, 2], "click": [1, 0],
                  "conv": [0, 0]})
    spec = _weighted_spec(tmp_path, t)
    with pytest.raises(ValueError, match=match) as e:
        next(ShardReader(spec, spec.files("train"), 2).iter_train(0, 1))
    assert "p0.parquet" in str(e.value)


def test_weighted_embedding_is_the_weighted_sum():
    torch.manual_seed(0)
    tables = make_tables([("tags", 30), ("user", 10)], 5)
    arch = EmbeddingArch(tables, device=torch.device("cpu"), dim=5, weighted=True)
    kjt = KeyedJaggedTensor(keys=["tags", "user"], values=torch.tensor([3, 4, 7, 9, 1, 2]),
                            lengths=torch.tensor([2, 1, 1, 1, 1, 0]),
                            weights=torch.tensor([0.5, 3.0, 2.0, 4.0, 1.0, 1.0]), stride=3)
    out = arch(kjt)  # (3, 2*5)
    t = arch.ebc.embedding_bags["t_tags"].weight[:, :5]
    u = arch.ebc.embedding_bags["t_user"].weight[:, :5]
    want = torch.stack([
        torch.cat([0.5 * t[3] + 3.0 * t[4], 1.0 * u[1]]),
        torch.cat([2.0 * t[7], 1.0 * u[2]]),
        torch.cat([4.0 * t[9], torch.zeros(5)]),
    ])
    torch.testing.assert_close(out, want)


def test_export_takes_the_weights(prepared, tmp_path):
    """export_run's whole-split parity feeds the KJT weights; model.pt's weighted entry equals the eager weighted
    model, and dropping the weights changes the scores (so they are really used)."""
    run_dir = fake_run(prepared, str(tmp_path / "run"))
    card = export_run(run_dir, progress=False)
    bag = next(f for f in card["fields"] if f["name"] == BAG)
    assert bag["weighted"] and bag["weight_column"] == BAG + "__weights"
    assert card["parity"]["rows"] == DatasetSpec.load(prepared).rows["test"]
    assert max(card["parity"]["max_abs_diff"].values()) <= 1e-6
    model = torch.jit.load(os.path.join(run_dir, "model.pt"))
    spec = DatasetSpec.load(prepared)
    reader = ShardReader(spec, spec.files("test"), 4096)
    got, unweighted = [], []
    with torch.no_grad():
        for b in reader.iter_eval(reader.num_padded_batches()):
            k, keep = b.features, b.weights > 0
            got.append(model.forward_jagged(k.values(), k.lengths().long(), k.weights())[keep].numpy())
            unweighted.append(model.forward_jagged(k.values(), k.lengths().long())[keep].numpy())
    expected = eager_probs(run_dir)
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-6)
    assert np.abs(np.concatenate(unweighted) - expected).max() > 1e-3


def test_raw_inputs_need_the_weight_column():
    fields = [FieldInput("tags", "int64", True, True), FieldInput("user")]
    t = pa.table({"tags": pa.array([[1, 2], [3]]), "user": [1, 2]})
    with pytest.raises(ValueError, match=r"no column\(s\) \['tags__weights'\]"):
        table_to_inputs(t, fields, b"01234567")
    bad = t.append_column("tags__weights", pa.array([[1.0], [2.0]]))
    with pytest.raises(ValueError, match=r"row 0: column 'tags__weights' has 1 weight\(s\) for 2 value\(s\)"):
        table_to_inputs(bad, fields, b"01234567")
    ok = t.append_column("tags__weights", pa.array([[0.5, 2.0], [3.0]]))
    inputs = table_to_inputs(ok, fields, b"01234567")
    assert inputs.weights.tolist() == [0.5, 2.0, 3.0, 1.0, 1.0] and len(inputs.torch_args()) == 4


def test_two_worker_run_trains_and_exports_weighted_bags(prepared, tmp_path):
    """The real trainer (2 Ray workers, sharded weighted EBC) on the prepared data; its export compares the SHARDED
    model on a reference batch with weights, and the whole test split through the artifact's weighted entries."""
    run_dir = str(tmp_path / "run")
    args = [a for a in E2E_ARGS if not a.startswith(("train.epochs", "train.batch_size"))]
    proc = run_cli(["launch/train.py", f"data.path={prepared}", f"run.dir={run_dir}", "train.epochs=1",
                    "train.batch_size=128", "run.export_parity_rows=0", *args])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    card = json.load(open(os.path.join(run_dir, "model.json")))
    assert card["export_max_abs_diff"] <= 1e-6  # the sharded model's probabilities on a weighted batch
    assert next(f for f in card["fields"] if f["name"] == BAG)["weighted"]
    assert card["parity"]["rows"] == DatasetSpec.load(prepared).rows["test"]
    assert card["training"]["metrics"]["world_size"] == 2


def test_shuffle_keeps_each_weight_with_its_id_and_row(tmp_path):
    rng = np.random.default_rng(0)
    users = np.arange(300)
    bags = [rng.integers(0, 20, int(rng.integers(0, 5))).tolist() for _ in users]
    weights = [[float(u * 100 + i) for i in b] for u, b in zip(users, bags)]  # the weight encodes (row, id)
    t = pa.table({"tags": pa.array(bags, pa.list_(pa.int64())), "tags__weights": pa.array(weights, pa.list_(
        pa.float32())), "user": users % 10, "click": users % 2, "conv": np.zeros(300, np.int64)})
    pq.write_table(t, str(tmp_path / "p0.parquet"), row_group_size=70)
    spec = DatasetSpec([FieldSpec("tags", 20, True, True), FieldSpec("user", 10)], ["click", "conv"],
                       {"train": ["p0.parquet"]}, {"train": 300})
    spec.save(str(tmp_path))
    reader = ShardReader(spec, spec.files("train"), 32, shuffle=True, seed=4)
    for epoch in (0, 1):
        seen = []
        for b in reader.iter_train(epoch, reader.num_full_batches()):
            ids, w = _bags(b.features["tags"])
            users_b = b.features["user"].values().numpy()
            for j, (u, bag_ids, bag_w) in enumerate(zip(users_b, ids, w)):
                assert [x % 100 for x in bag_w] == bag_ids  # every weight still sits with its own id
                if bag_w:  # ... and with its own row: that row's user and label
                    row = int(bag_w[0]) // 100
                    assert row % 10 == u and b.labels[j, 0] == row % 2
                    seen.append(row)
        assert len(set(seen)) == len(seen) and seen != sorted(seen)  # rows once each, permuted
