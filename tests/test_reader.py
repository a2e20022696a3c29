"""ShardReader / shard_files_for_rank: exact contents, padding, bags, rank balance, shuffle determinism, errors."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.reader import ShardReader, shard_files_for_rank
from data_pipeline.spec import DatasetSpec, FieldSpec
from data_pipeline.synthetic import SyntheticConfig, generate

# train: files of 2600, 2600, 1300 rows (uneven), row groups of 700 (so batches straddle row groups and files)
CFG = SyntheticConfig(
    fields={"customer": 300, "fund": 30, "device": 3},
    rows_train=6500,
    rows_valid=2100,
    rows_test=0,
    rows_per_file=2600,
    row_group_rows=700,
    seed=1,
)


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return generate(CFG, str(tmp_path_factory.mktemp("reader") / "ds"), progress=False)


def _expected(spec, files):
    """(F, N) ids and (N, T) labels of the files, in order, read directly with pyarrow."""
    t = pa.concat_tables([pq.read_table(f) for f in files])
    ids = np.stack([t.column(f.name).to_numpy() for f in spec.fields])
    labels = np.stack([t.column(k).to_numpy() for k in spec.labels], 1).astype(np.float32)
    return ids, labels


def _unpack(batch, keys):
    """(F, B) ids from a single-valued KJT, checking layout and lengths."""
    kjt = batch.features
    assert kjt.keys() == keys and kjt.stride() == batch.batch_size
    assert kjt.values().dtype == torch.int64
    assert bool((kjt.lengths() == 1).all())
    ids = kjt.values().numpy().reshape(len(keys), batch.batch_size)
    for i, k in enumerate(keys):  # per-key view agrees with the key-major layout
        assert np.array_equal(kjt[k].values().numpy(), ids[i])
    return ids


def test_train_batches_equal_parquet_rows(spec):
    files, bs = spec.files("train"), 256
    r = ShardReader(spec, files, bs)
    assert r.num_rows() == 6500 and r.num_full_batches() == 25 and r.num_padded_batches() == 26
    ids, labels = _expected(spec, files)
    batches = list(r.iter_train(epoch=0, num_batches=25))
    assert len(batches) == 25
    for i, b in enumerate(batches):
        assert b.batch_size == bs and b.labels.shape == (bs, 3) and b.labels.dtype.is_floating_point
        np.testing.assert_array_equal(_unpack(b, spec.field_names), ids[:, i * bs : (i + 1) * bs])
        np.testing.assert_array_equal(b.labels.numpy(), labels[i * bs : (i + 1) * bs])
        assert bool((b.weights == 1).all())


def test_eval_covers_rows_and_pads(spec):
    files, bs = spec.files("valid"), 500
    r = ShardReader(spec, files, bs)
    ids, labels = _expected(spec, files)
    batches = list(r.iter_eval(num_batches=r.num_padded_batches() + 2))  # 5 real (last one partial) + 2 padding
    assert len(batches) == 7 and all(b.batch_size == bs for b in batches)
    got_ids = np.concatenate([_unpack(b, spec.field_names) for b in batches], axis=1)
    got_labels = np.concatenate([b.labels.numpy() for b in batches])
    w = np.concatenate([b.weights.numpy() for b in batches])
    n = 2100
    assert w.sum() == n and np.all(w[:n] == 1) and np.all(w[n:] == 0)
    np.testing.assert_array_equal(got_ids[:, :n], ids)
    np.testing.assert_array_equal(got_labels[:n], labels)
    assert np.all(got_ids[:, n:] == 0) and np.all(got_labels[n:] == 0)
    # fewer batches than needed just stops early (a probe batch), identical to the first full run's batches
    probe = list(r.iter_eval(num_batches=2))
    assert len(probe) == 2 and torch.equal(probe[1].features.values(), batches[1].features.values())
    pad = r.padding_batch()
    assert pad.batch_size == bs and float(pad.weights.sum()) == 0


def test_too_many_train_batches_raises(spec):
    r = ShardReader(spec, spec.files("train"), 256)
    with pytest.raises(ValueError, match="26 train batches .* 25 full batches"):
        next(r.iter_train(0, 26))


def test_uneven_shards_two_ranks(spec):
    files, bs = spec.files("train"), 300
    owned = [shard_files_for_rank(list(reversed(files)), r, 2) for r in range(2)]
    assert sorted(owned[0] + owned[1]) == sorted(files) and not set(owned[0]) & set(owned[1])
    # sorted, then fewest rows so far (ties -> lower rank): 2600 -> r0, 2600 -> r1, 1300 -> r0 (tie)
    assert owned == [[files[0], files[2]], [files[1]]]
    readers = [ShardReader(spec, o, bs, shuffle=True, seed=3) for o in owned]
    assert [r.num_full_batches() for r in readers] == [13, 8]
    n = min(r.num_full_batches() for r in readers)
    for r in readers:
        for epoch in range(2):
            got = list(r.iter_train(epoch, n))
            assert len(got) == n and all(b.batch_size == bs and b.features.stride() == bs for b in got)
    # eval: equal batch counts, every row once across ranks
    evals = [ShardReader(spec, o, bs) for o in owned]
    m = max(r.num_padded_batches() for r in evals)
    total = 0.0
    for r, o in zip(evals, owned):
        got = list(r.iter_eval(m))
        assert len(got) == m
        w = np.concatenate([b.weights.numpy() for b in got])
        ids = np.concatenate([_unpack(b, spec.field_names) for b in got], axis=1)[:, w == 1]
        np.testing.assert_array_equal(ids, _expected(spec, o)[0])
        total += w.sum()
    assert total == spec.rows["train"]


def test_too_few_files_for_ranks(spec):
    with pytest.raises(ValueError, match="3 shard file.*4 workers.*more shards"):
        shard_files_for_rank(spec.files("train"), 0, 4)


def _rows(batches, keys):
    ids = np.concatenate([_unpack(b, keys) for b in batches], axis=1)
    labels = np.concatenate([b.labels.numpy() for b in batches]).T
    return np.concatenate([ids, labels]).T  # (N, F + T)


def test_shuffle_deterministic_and_per_epoch(spec):
    files, bs, keys = spec.files("train"), 250, spec.field_names  # 6500 = 26 x 250: every row is read

    def run(seed, epoch):
        return _rows(list(ShardReader(spec, files, bs, shuffle=True, seed=seed).iter_train(epoch, 26)), keys)

    a, b, c, d = run(0, 0), run(0, 0), run(0, 1), run(1, 0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    plain = _rows(list(ShardReader(spec, files, bs).iter_train(0, 26)), keys)
    assert not np.array_equal(a, plain)
    # a permutation of the same rows
    srt = lambda x: x[np.lexsort(x.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(srt(a), srt(plain))
    np.testing.assert_array_equal(srt(c), srt(plain))


# ---------------------------------------------------------------- hand-written files


def _bag_spec(tmp_path, tables, **field_over):
    rels = []
    for i, t in enumerate(tables):
        rel = f"p{i}.parquet"
        pq.write_table(t, tmp_path / rel, row_group_size=4)
        rels.append(rel)
    spec = DatasetSpec(
        fields=[FieldSpec("tags", 20, multi_valued=True), FieldSpec("user", 10)],
        labels=["click", "conv"],
        splits={"train": rels},
        rows={"train": sum(t.num_rows for t in tables)},
    )
    spec.save(str(tmp_path))
    return spec


def test_multi_valued_bags(tmp_path):
    bags = [[1, 2], [3], [], [4, 5, 6], [7], [8, 9], [10], [11, 12, 13, 14], [15], [16, 0]]
    full = pa.array(bags + [[19], [18, 17]], type=pa.list_(pa.int64()))
    sliced = full.slice(2, 10)  # a sliced ListArray: its .values still holds the first two bags
    assert sliced.values.to_pylist()[:2] == [1, 2]
    t0 = pa.table({"tags": sliced, "user": pa.array(range(10), pa.int32()), "click": [1] * 10, "conv": [0] * 10})
    t1 = pa.table({"tags": pa.array([[5], [6, 7]]), "user": [3, 4], "click": [True, False], "conv": [1.0, 0.0]})
    spec = _bag_spec(tmp_path, [t0, t1])
    rows = bags[2:] + [[19], [18, 17], [5], [6, 7]]
    users = list(range(10)) + [3, 4]
    for bs in (2, 3, 5, 16):  # batches inside one row group (sliced arrays), straddling row groups and files
        r = ShardReader(spec, spec.files("train"), batch_size=bs)
        batches = list(r.iter_eval(r.num_padded_batches()))
        n_pad = len(batches) * bs - 12
        assert n_pad < bs
        got_rows, got_users = [], []
        for b in batches:
            d = b.features.to_dict()
            tags, user = d["tags"], d["user"]
            got_rows += [tags.values()[s : s + n].tolist() for s, n in zip(tags.offsets()[:-1], tags.lengths())]
            got_users += user.values().tolist()
            assert user.lengths().tolist() == [1] * bs and b.features.stride() == bs
        w = np.concatenate([b.weights.numpy() for b in batches])
        assert w.tolist() == [1] * 12 + [0] * n_pad
        assert got_rows == rows + [[0]] * n_pad  # padding rows: one id 0
        assert got_users == users + [0] * n_pad
        labels = np.concatenate([b.labels.numpy() for b in batches])
        assert labels[:12].tolist() == [[1, 0]] * 10 + [[1, 1], [0, 0]]
    # train, shuffled: the same bags, permuted (rows keep their user id)
    pairs = set()
    for b in ShardReader(spec, spec.files("train"), 4, shuffle=True, seed=5).iter_train(0, 3):
        d = b.features.to_dict()
        tags = [d["tags"].values()[s : s + n].tolist() for s, n in zip(d["tags"].offsets()[:-1], d["tags"].lengths())]
        pairs |= {(u, tuple(t)) for u, t in zip(d["user"].values().tolist(), tags)}
    assert pairs == {(u, tuple(t)) for u, t in zip(users, rows)}


def test_missing_or_bad_column_raises(tmp_path):
    t = pa.table({"tags": pa.array([[1]]), "user": [1], "click": [1]})  # no "conv"
    with pytest.raises(ValueError, match=r"p0.parquet: missing column 'conv'"):
        ShardReader(_bag_spec(tmp_path, [t]), [str(tmp_path / "p0.parquet")], 2)
    t = pa.table({"tags": [1], "user": [1], "click": [1], "conv": [0]})  # tags not a list
    with pytest.raises(ValueError, match=r"p0.parquet: column 'tags' has type int64, expected list<integer>"):
        ShardReader(_bag_spec(tmp_path, [t]), [str(tmp_path / "p0.parquet")], 2)
    t = pa.table({"tags": pa.array([[1]]), "user": ["x"], "click": [1], "conv": [0]})
    with pytest.raises(ValueError, match=r"column 'user' has type string, expected integer"):
        ShardReader(_bag_spec(tmp_path, [t]), [str(tmp_path / "p0.parquet")], 2)


def test_out_of_range_id_raises(tmp_path):
    t = pa.table({"tags": pa.array([[1], [25]]), "user": [1, 2], "click": [1, 0], "conv": [0, 0]})
    r = ShardReader(_bag_spec(tmp_path, [t]), [str(tmp_path / "p0.parquet")], 2)
    with pytest.raises(ValueError, match=r"'tags' has ids in \[1, 25\], outside \[0, 20\)"):
        next(r.iter_train(0, 1))


def test_shuffle_permutes_row_groups_and_rows(tmp_path):
    t = pa.table(
        {"tags": pa.array([[i % 20] for i in range(40)]), "user": range(40), "click": [0] * 40, "conv": [0] * 40}
    )
    pq.write_table(t, tmp_path / "p.parquet", row_group_size=4)
    spec = DatasetSpec(
        [FieldSpec("tags", 20, True), FieldSpec("user", 40)], ["click", "conv"], {"t": ["p.parquet"]}, {"t": 40}
    )
    spec.save(str(tmp_path))
    users = [
        b.features["user"].values().tolist() for b in ShardReader(spec, spec.files("t"), 4, True, 9).iter_train(0, 10)
    ]
    # batch = row group here: each batch holds exactly one row group's rows ...
    assert sorted(tuple(sorted(u)) for u in users) == [tuple(range(4 * g, 4 * g + 4)) for g in range(10)]
    assert [min(u) for u in users] != list(range(0, 40, 4))  # ... row groups in a permuted order
    assert any(u != sorted(u) for u in users)  # ... and rows permuted inside them


def test_batch_to_keeps_contents(spec):
    from torchrec.streamable import Pipelineable

    b = ShardReader(spec, spec.files("valid"), 64).padding_batch()
    c = b.to(torch.device("cpu"), non_blocking=True)
    assert isinstance(c, Pipelineable) and c.batch_size == 64
    assert torch.equal(c.features.values(), b.features.values()) and torch.equal(c.labels, b.labels)
    assert c.features.lengths().dtype == torch.int32 and c.weights.shape == (64,)
